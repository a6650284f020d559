"""The fast-path rows: PGD on models jaxrobust did not write (a plain Flax CNN) and on
its own architectures, each with and without jaxrobust's CPU fast path
(`jaxrobust.fastpath`), against torchattacks, timed alternately in one run."""

import contextlib
from collections.abc import Callable
from typing import Any

from benchmarks.bench import Bench, jnp_argmax
from benchmarks.harness import (
  LINF_EPS,
  Row,
  format_rate,
  make_row,
  median,
  time_in_turn,
  torch_synchronize,
)

ALPHA = 2 / 255


def user_model(b: Bench) -> Row:
  """PGD-10 L-inf (8/255, step 2/255) on a plain Flax CNN a user would write
  (`nn.Conv` 3x3 32-32-64-64, `nn.max_pool` 2x2 after each pair, dense 256,
  10 classes; random weights, copied into the PyTorch twin below), batch 256:
  jaxrobust with and without its CPU fast path against torchattacks."""
  jax, np = b.jax, b.np
  model = UserCNN(num_classes=b.test_set.num_classes)
  variables = model.init(jax.random.key(0), np.zeros((1, *b.test_set.x.shape[1:]), np.float32))
  net = user_torch_cnn(b.torch, variables).to(b.torch_device)
  return _fast_path_row(
    b,
    "user_model",
    "PGD-10 L-inf, plain Flax CNN (nn.Conv, nn.max_pool), batch 256",
    lambda v, x: model.apply(v, x),
    variables,
    net,
    steps=10,
    batch=256,
    images=b.args.user_images,
  )


def seed_network(b: Bench) -> Row:
  """PGD-20 L-inf (8/255, step 2/255) on `seed_cnn` (5x5
  convolutions 3->6->16 channels), batches of 500 (1,000 images a run by
  default): jaxrobust with and without its CPU fast path against
  torchattacks (`row_model`)."""
  return _architecture_row(
    b,
    "seed_network",
    "seed_cnn",
    "PGD-20 L-inf, seed_cnn (5x5 convs 3->6->16), batch 500",
    steps=20,
    batch=500,
    images=b.args.seed_images,
  )


def preact_resnet18(b: Bench) -> Row:
  """PGD-10 L-inf (8/255, step 2/255) on PreAct ResNet-18 (BatchNorm in
  inference mode; `row_model`), batches of 64: jaxrobust with and without its
  CPU fast path against torchattacks."""
  return _architecture_row(
    b,
    "preact_resnet18",
    "preact_resnet18",
    "PGD-10 L-inf, PreAct ResNet-18 (BatchNorm inference), batch 64",
    steps=10,
    batch=64,
    images=b.args.preact_images,
  )


def _architecture_row(
  b: Bench, name: str, architecture: str, label: str, *, steps: int, batch: int, images: int
) -> Row:
  """`_fast_path_row` on jaxrobust's model `architecture` (`row_model`) in
  inference mode and its PyTorch twin."""
  model, variables = b.row_model(architecture)
  net = b.tm.to_torch(model, variables, b.input_hw).to(b.torch_device)
  return _fast_path_row(
    b,
    name,
    label,
    lambda v, x: model.apply(v, x, train=False),
    variables,
    net,
    steps=steps,
    batch=batch,
    images=images,
  )


def _jax_pgd_side(
  b: Bench, apply: Any, variables: Any, xs: list, ys: list, *, steps: int, fast: bool
) -> Callable[[int], Any]:
  """run(i): jaxrobust's PGD on the batches `xs`, traced with the fast path on
  (`fast`) or inside `jaxrobust.fastpath.disabled()`; built anew per side, so
  that no trace is shared."""
  jax, jr, np = b.jax, b.jr, b.np
  P = jax.sharding.PartitionSpec
  spec = P(jr.parallel.BATCH_AXIS)
  attack = jr.attacks.pgd(norm="linf", eps=LINF_EPS, step_size=ALPHA, steps=steps)
  mapped = jr.parallel.data_parallel(
    lambda v, xb, yb, keys: attack(lambda z: apply(v, z), xb, yb, keys),
    b.mesh,
    in_specs=(P(), spec, spec, spec),
    out_specs=spec,
  )
  program = jax.jit(lambda v, xb, yb, key: mapped(v, xb, yb, b.example_keys(key, xb.shape[0])))

  def run(i: int) -> Any:
    context = contextlib.nullcontext() if fast else jr.fastpath.disabled()
    with context:  # only the first call traces
      outs = [
        program(variables, xb, yb, jax.random.fold_in(jax.random.key(i), j))
        for j, (xb, yb) in enumerate(zip(xs, ys))
      ]
    return np.concatenate([np.asarray(o) for o in outs])

  return run


def _torch_pgd_side(
  b: Bench, net: Any, x: Any, y: Any, *, steps: int, batch: int, n: int
) -> Callable[[int], Any]:
  """run(i): torchattacks' PGD on `net`, on the first `n` of `x` in batches of `batch`."""
  np, torch = b.np, b.torch
  attack = b.torchattacks.PGD(net, eps=LINF_EPS, alpha=ALPHA, steps=steps, random_start=True)
  xs_t = [b.tm.nhwc_to_nchw(x[s : s + batch]).to(b.torch_device) for s in range(0, n, batch)]
  ys_t = [
    torch.from_numpy(y[s : s + batch].astype(np.int64)).to(b.torch_device)
    for s in range(0, n, batch)
  ]

  def run(i: int) -> Any:
    torch.manual_seed(i)
    outs = [attack(xb, yb) for xb, yb in zip(xs_t, ys_t)]
    torch_synchronize()
    return np.concatenate([b.tm.nchw_to_nhwc(o) for o in outs])

  return run


def _accuracy_under(b: Bench, apply: Any, variables: Any, y: Any, batch: int, n: int) -> Any:
  """accuracy(x_adv): the accuracy of `apply` on the first `n` of `x_adv`, in batches of `batch`."""
  jax, np = b.jax, b.np
  predict = jax.jit(lambda v, xb: jnp_argmax(b.jnp, apply(v, xb)))

  def accuracy(x_adv: Any) -> float:
    batches = [
      np.asarray(predict(variables, jax.device_put(x_adv[s : s + batch], b.batch_spec)))
      for s in range(0, n, batch)
    ]
    return float(np.mean(np.concatenate(batches) == y))

  return accuracy


def _pgd_flops(
  b: Bench, apply: Any, variables: Any, x: Any, *, steps: int, batch: int, n: int
) -> float:
  """XLA's count of the FLOPs of PGD-`steps` on `x`: one forward and input-gradient
  pass per step and image on `n` images, at the per-device share of `batch`."""
  jax, np = b.jax, b.np
  per = batch // b.devices
  x1 = jax.ShapeDtypeStruct((per, *x.shape[1:]), np.float32)
  grad_cost = (
    jax.jit(lambda v, z: jax.grad(lambda z: apply(v, z).sum())(z))
    .lower(jax.device_get(variables), x1)
    .cost_analysis()
  )
  return steps * float(grad_cost["flops"]) / per * n


def _fast_path_row(
  b: Bench,
  name: str,
  label: str,
  apply: Any,
  variables: Any,
  net: Any,
  *,
  steps: int,
  batch: int,
  images: int,
) -> Row:
  """Times three sides alternately on the same images: jaxrobust's PGD (the
  fast path on, its default), the same PGD traced inside
  `jaxrobust.fastpath.disabled()`, and torchattacks' PGD on `net`."""
  jax, jr = b.jax, b.jr
  for p in net.parameters():
    p.requires_grad_(False)
  batch = batch - batch % b.devices
  n = max(batch, images // batch * batch)
  x, y = b.test_set.x[:n], b.test_set.y[:n]
  variables = jax.device_put(variables, jr.parallel.replicated(b.mesh))
  xs = [jax.device_put(x[s : s + batch], b.batch_spec) for s in range(0, n, batch)]
  ys = [jax.device_put(y[s : s + batch], b.batch_spec) for s in range(0, n, batch)]
  sides = {
    "fast": _jax_pgd_side(b, apply, variables, xs, ys, steps=steps, fast=True),
    "no_fast": _jax_pgd_side(b, apply, variables, xs, ys, steps=steps, fast=False),
    "torch": _torch_pgd_side(b, net, x, y, steps=steps, batch=batch, n=n),
  }
  first, times, outputs, ceilings = time_in_turn(sides, b.args.repeats, b.ceiling)
  accuracy = _accuracy_under(b, apply, variables, y, batch, n)
  flops = _pgd_flops(b, apply, variables, x, steps=steps, batch=batch, n=n)
  compile_seconds = {k: first[k] - median(times[k]) for k in ("fast", "no_fast")}
  row = make_row(
    name,
    label,
    times["fast"],
    times["torch"],
    ceilings,
    n,
    "images/s",
    flops,
    flops,
    compile_seconds=compile_seconds["fast"],
  )
  no_fast_rate = n / median(times["no_fast"])
  row.update(
    {
      "jaxrobust_no_fast_path": no_fast_rate,
      "ratio_no_fast_path": no_fast_rate / row["pytorch"],
      "jaxrobust_no_fast_path_seconds": times["no_fast"],
      "fast_path_speedup": row["jaxrobust"] / no_fast_rate,
      "compile_seconds_no_fast_path": compile_seconds["no_fast"],
      "agreement": {
        "jaxrobust": accuracy(outputs["fast"]),
        "pytorch": accuracy(outputs["torch"]),
        "what": "accuracy under the attack",
        "examples": n,
      },
      "jaxrobust_no_fast_path_accuracy": accuracy(outputs["no_fast"]),
    }
  )
  b.notes.append(
    f"{name}: without the fast path (`jaxrobust.fastpath.disabled()`) jaxrobust ran "
    f"{format_rate(no_fast_rate)} images/s ({row['ratio_no_fast_path']:.2f}x PyTorch; "
    f"accuracy under it {100 * row['jaxrobust_no_fast_path_accuracy']:.1f} %); the fast "
    f"path is {row['fast_path_speedup']:.2f}x. Compile (first call minus a steady one): "
    f"{compile_seconds['fast']:.1f} s with, {compile_seconds['no_fast']:.1f} s "
    f"without. {n} images a run."
  )
  return row


def _user_cnn_class() -> Any:
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  class UserCNNModule(nn.Module):
    """A plain Flax CNN: conv 3x3 32, 32, max-pool 2; conv 3x3 64, 64, max-pool 2;
    dense 256; dense `num_classes` (ReLU between)."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x: Any) -> Any:
      for features in (32, 64):
        x = nn.relu(nn.Conv(features, (3, 3))(x))
        x = nn.relu(nn.Conv(features, (3, 3))(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      x = nn.relu(nn.Dense(256)(x.reshape(x.shape[0], -1)))
      return nn.Dense(self.num_classes)(x)

  return UserCNNModule


def UserCNN(num_classes: int) -> Any:  # pylint: disable=invalid-name
  """The plain Flax CNN of the `user_model` row, for `num_classes` classes."""
  return _user_cnn_class()(num_classes=num_classes)


def user_torch_cnn(torch: Any, variables: Any) -> Any:
  """The PyTorch twin of `UserCNN` with its Flax `variables` (NCHW images)."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  nn = torch.nn
  params = variables["params"]
  tensor = lambda a: torch.from_numpy(np.array(a, np.float32))

  class Net(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.convs = nn.ModuleList()
      for i in range(4):
        kernel, bias = params[f"Conv_{i}"]["kernel"], params[f"Conv_{i}"]["bias"]
        conv = nn.Conv2d(kernel.shape[2], kernel.shape[3], 3, padding=1)
        with torch.no_grad():
          conv.weight.copy_(tensor(np.transpose(kernel, (3, 2, 0, 1))))
          conv.bias.copy_(tensor(bias))
        self.convs.append(conv)
      self.dense = nn.ModuleList()
      for i in range(2):
        kernel, bias = params[f"Dense_{i}"]["kernel"], params[f"Dense_{i}"]["bias"]
        linear = nn.Linear(*kernel.shape)
        with torch.no_grad():
          linear.weight.copy_(tensor(np.asarray(kernel).T))
          linear.bias.copy_(tensor(bias))
        self.dense.append(linear)

    def forward(self, x):
      for i, conv in enumerate(self.convs):
        x = torch.relu(conv(x))
        if i % 2:
          x = torch.nn.functional.max_pool2d(x, 2)
      x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)  # Flax's NHWC flatten order
      return self.dense[1](torch.relu(self.dense[0](x)))

  return Net().eval()
