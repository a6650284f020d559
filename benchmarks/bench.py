"""What every row of the benchmark shares (`Bench`): both frameworks, the mesh, the
benchmark's model on each side in the dtype of the rows that follow, the test
batches every row attacks, and the helpers that measure and judge a row."""

import argparse
from typing import Any

from benchmarks.harness import MatmulCeiling
from benchmarks.model import InDtype, load_data, torch_in_dtype, trained_model


def jnp_argmax(jnp: Any, logits: Any) -> Any:
  """The predicted class of each row of `logits`."""
  return jnp.argmax(logits, axis=-1)


class Bench:
  """Everything the rows share: model, weights, data, both frameworks, the mesh."""

  def __init__(
    self,
    args: argparse.Namespace,
    jax: Any,
    jnp: Any,
    np: Any,
    torch: Any,
    torchattacks: Any,
    jr: Any,
    torch_models: Any,
  ) -> None:
    self.args, self.jax, self.jnp, self.np = args, jax, jnp, np
    self.torch, self.torchattacks, self.jr, self.tm = torch, torchattacks, jr, torch_models
    self.mesh = jr.parallel.mesh()
    self.devices = self.mesh.devices.size
    self.batch = args.batch_size
    if self.batch % self.devices:
      raise SystemExit(
        f"--batch-size {self.batch} is not divisible by the "
        f"{self.devices} devices; choose a multiple of {self.devices}"
      )
    self.torch_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    self.notes: list[str] = []

  def setup(self) -> None:
    """Loads the data, trains (or restores) the model, and prepares the test batches."""
    jax, jr, np = self.jax, self.jr, self.np
    train, test, self.data_description = load_data(self.args, jr)
    self.train_set, self.test_set = train, test
    self.model, variables, self.model_description = trained_model(
      self.args, jax, jr, train, self.data_description
    )
    self.variables = jax.device_put(variables, jr.parallel.replicated(self.mesh))
    self.input_hw = tuple(test.x.shape[1:3])
    self.float32_net = self.tm.to_torch(self.model, variables, self.input_hw).to(self.torch_device)
    for p in self.float32_net.parameters():
      p.requires_grad_(False)  # attacks need input gradients only
    batch_spec = jr.parallel.batch_sharding(self.mesh)
    self.batch_spec = batch_spec
    # Agreement is judged by the float32 model, whatever dtype attacked it.
    self.predict = jax.jit(lambda v, x: jnp_argmax(self.jnp, self.model.apply(v, x, train=False)))
    self.use_dtype("float32")
    # Test batches: batch i of every row is the same images for both sides.
    n_batches = self.args.repeats + 1
    need = n_batches * self.batch
    idx = np.random.default_rng(0).permutation(len(test.x))
    idx = np.resize(idx, need)  # wraps around on a small test set
    self.x = test.x[idx].reshape(n_batches, self.batch, *test.x.shape[1:])
    self.y = test.y[idx].reshape(n_batches, self.batch)
    self.x_dev = [jax.device_put(x, batch_spec) for x in self.x]
    self.y_dev = [jax.device_put(y, batch_spec) for y in self.y]
    self.x_torch = [self.tm.nhwc_to_nchw(x).to(self.torch_device) for x in self.x]
    self.y_torch = [self.torch.from_numpy(y.astype(np.int64)).to(self.torch_device) for y in self.y]
    self.clean_correct = np.concatenate(
      [np.asarray(self.predict(self.variables, x)) == y for x, y in zip(self.x_dev, self.y)]
    )
    self.ceiling = MatmulCeiling(jax, self.jnp, self.mesh)
    self.forward_flops, self.step_flops = self.flops_per_image(self.apply, variables, self.batch)

  def use_dtype(self, dtype: str) -> None:
    """The rows that follow compute in `dtype` (`in_dtype`): `self.apply` and
    `self.net`, the benchmark's model on each side."""
    self.dtype = dtype
    model = self.in_dtype(self.model)
    self.apply = lambda v, x: model.apply(v, x, train=False)
    self.net = self.torch_in_dtype(self.float32_net)

  def in_dtype(self, model: Any) -> Any:
    """`model` computing in the rows' dtype."""
    return model if self.dtype == "float32" else InDtype(model, getattr(self.jnp, self.dtype))

  def torch_in_dtype(self, net: Any) -> Any:
    """`net` computing in the rows' dtype."""
    if self.dtype == "float32":
      return net
    return torch_in_dtype(self.torch, net, getattr(self.torch, self.dtype))

  def flops_per_image(self, apply: Any, variables: Any, batch: int) -> tuple[float, float]:
    """XLA's count of (one forward pass, one forward and input-gradient pass)
    per image, at the per-device share of `batch`."""
    jax, np = self.jax, self.np
    per = batch // self.devices
    x1 = jax.ShapeDtypeStruct((per, *self.test_set.x.shape[1:]), np.float32)
    forward = jax.jit(apply).lower(variables, x1).cost_analysis()
    grad = (
      jax.jit(lambda v, x: jax.grad(lambda x: apply(v, x).sum())(x))
      .lower(variables, x1)
      .cost_analysis()
    )
    return float(forward["flops"]) / per, float(grad["flops"]) / per

  def example_keys(self, key: Any, n: int) -> Any:
    """Key i of `n`: `fold_in(key, i)`."""
    return self.jax.vmap(self.jax.random.fold_in, (None, 0))(key, self.jnp.arange(n))

  def sharded_attack(self, attack: Any) -> Any:
    """jit(x, y, key -> x_adv) over the mesh, example i with key fold_in(key, i)."""
    jax, jr = self.jax, self.jr
    P = jax.sharding.PartitionSpec
    batch = P(jr.parallel.BATCH_AXIS)
    apply = self.apply

    def device_attack(variables: Any, x: Any, y: Any, keys: Any) -> Any:
      return attack(lambda xb: apply(variables, xb), x, y, keys)

    mapped = jr.parallel.data_parallel(
      device_attack, self.mesh, in_specs=(P(), batch, batch, batch), out_specs=batch
    )
    return jax.jit(lambda v, x, y, key: mapped(v, x, y, self.example_keys(key, x.shape[0])))

  def accuracy_of(self, x_advs: Any, nchw: bool = False) -> float:
    """Accuracy of the model (jaxrobust's, the same weights) on adversarial batches 0..R."""
    np = self.np
    correct = []
    for i, x_adv in enumerate(x_advs):
      if nchw:
        x_adv = self.tm.nchw_to_nhwc(x_adv)
      pred = np.asarray(
        self.predict(
          self.variables, self.jax.device_put(np.asarray(x_adv, np.float32), self.batch_spec)
        )
      )
      correct.append(pred == self.y[i])
    return float(np.mean(np.concatenate(correct)))

  def max_perturbation(self, x_advs: Any, norm: str, nchw: bool = False) -> float:
    """The largest `norm` distance of an adversarial batch from its clean batch."""
    np = self.np
    worst = 0.0
    for i, x_adv in enumerate(x_advs):
      x_adv = self.tm.nchw_to_nhwc(x_adv) if nchw else np.asarray(x_adv)
      d = (x_adv - self.x[i]).reshape(self.batch, -1)
      worst = max(
        worst, float(np.abs(d).max() if norm == "linf" else np.sqrt((d**2).sum(-1)).max())
      )
    return worst

  def row_model(self, name: str) -> tuple[Any, Any]:
    """(model, variables) of architecture `name`: the benchmark's trained model
    when `--model` is `name`, else a freshly initialised one (speed does not
    depend on the weights; agreement then compares near-chance accuracies)."""
    jax, jr, np = self.jax, self.jr, self.np
    if self.args.model == name:
      return self.model, jax.device_get(self.variables)
    mean, std = jr.data.channel_stats(self.train_set.x)
    model = jr.models.create(
      name,
      num_classes=self.test_set.num_classes,
      mean=tuple(map(float, mean)),
      std=tuple(map(float, std)),
    )
    x1 = np.zeros((1, *self.test_set.x.shape[1:]), np.float32)
    return model, jax.device_get(model.init(jax.random.key(0), x1))
