"""The training rows: one adversarial-training step (PGD, then the cross-entropy step
with SGD), `jaxrobust.training.make_train_step` against a plain PyTorch loop with
torchattacks' PGD, on the same training batches and weights."""

from typing import Any

from benchmarks.bench import Bench
from benchmarks.harness import LINF_EPS, Row, make_row, time_alternately


def pgd_at_step(b: Bench) -> Row:
  """One PGD-7 adversarial-training step on the benchmark's model."""
  return _training_step_row(
    b,
    "pgd_at_step",
    "PGD-7 adversarial training step (SGD, momentum 0.9)",
    b.model,
    jax_variables=b.jax.device_get(b.variables),
    steps=7,
    batch=b.batch,
  )


def seed_training_step(b: Bench) -> Row:
  """One PGD-10 adversarial-training step on `seed_cnn` (`row_model`), batch
  `--batch-size`."""
  model, variables = b.row_model("seed_cnn")
  return _training_step_row(
    b,
    "seed_training_step",
    f"PGD-10 AT step, seed_cnn, batch {b.batch}",
    model,
    jax_variables=variables,
    steps=10,
    batch=b.batch,
  )


def preact_training_step(b: Bench) -> Row:
  """One PGD-10 adversarial-training step on PreAct ResNet-18 (BatchNorm in
  training mode, `row_model`), batch 64."""
  model, variables = b.row_model("preact_resnet18")
  return _training_step_row(
    b,
    "preact_training_step",
    "PGD-10 AT step, PreAct ResNet-18, batch 64",
    model,
    jax_variables=variables,
    steps=10,
    batch=64,
  )


def _training_step_row(
  b: Bench, name: str, label: str, model: Any, *, jax_variables: Any, steps: int, batch: int
) -> Row:
  """One adversarial-training step, L-inf PGD-`steps` (8/255, step 2/255,
  random start), then the cross-entropy step (SGD 0.01, momentum 0.9), on the
  same training batches: `jaxrobust.training.step.make_train_step` against a plain
  PyTorch loop with torchattacks' PGD."""
  jax, jr, np, torch, ta = b.jax, b.jr, b.np, b.torch, b.torchattacks
  alpha = 2 / 255
  batch = batch - batch % b.devices
  opt = {"name": "sgd", "learning_rate": 0.01, "momentum": 0.9}
  tx = jr.training.make_optimizer(opt, total_steps=1000)
  input_fn = jr.training.make_input_fn(
    "adversarial",
    {"name": "pgd", "norm": "linf", "eps": LINF_EPS, "step_size": alpha, "steps": steps},
  )
  step = jr.training.make_train_step(b.in_dtype(model), tx, input_fn, b.mesh)
  params = jax_variables["params"]
  state = jr.training.TrainState(
    step=jax.numpy.zeros((), jax.numpy.int32),
    params=params,
    model_state={k: v for k, v in jax_variables.items() if k != "params"},
    opt_state=tx.init(params),
  )
  holder = {"state": jax.device_put(state, jr.parallel.replicated(b.mesh))}
  # Training batches: from the training set, the same for both sides.
  n = b.args.repeats + 1
  idx = np.random.default_rng(1).permutation(len(b.train_set.x))
  idx = np.resize(idx, n * batch)
  xs = b.train_set.x[idx].reshape(n, batch, *b.train_set.x.shape[1:])
  ys = b.train_set.y[idx].reshape(n, batch)
  xs_dev = [jax.device_put(x, b.batch_spec) for x in xs]
  ys_dev = [jax.device_put(y, b.batch_spec) for y in ys]
  key = jax.random.key(7)

  def jax_run(i):
    state, metrics = step(holder["state"], xs_dev[i], ys_dev[i], key)
    holder["state"] = state
    return float(metrics["accuracy"])  # blocks

  net = b.torch_in_dtype(b.tm.to_torch(model, jax_variables, b.input_hw).to(b.torch_device))
  optimizer = torch.optim.SGD(net.parameters(), lr=opt["learning_rate"], momentum=opt["momentum"])
  attack = ta.PGD(net, eps=LINF_EPS, alpha=alpha, steps=steps, random_start=True)
  xs_t = [b.tm.nhwc_to_nchw(x).to(b.torch_device) for x in xs]
  ys_t = [torch.from_numpy(y.astype(np.int64)).to(b.torch_device) for y in ys]

  def torch_run(i):
    torch.manual_seed(i)
    net.train()
    x_adv = attack(xs_t[i], ys_t[i])  # torchattacks attacks in eval mode, then restores
    logits = net(x_adv)
    loss = torch.nn.functional.cross_entropy(logits, ys_t[i])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float((logits.argmax(1) == ys_t[i]).float().mean())

  jt, tt, ceil, jo, to, compile_s = time_alternately(jax_run, torch_run, b.args.repeats, b.ceiling)
  # Attack: `steps` forward + input-gradient passes; then one forward and a
  # full backward (input and weight gradients, about two forward passes).
  apply = lambda v, x: model.apply(v, x, train=False)
  forward, grad = b.flops_per_image(apply, jax_variables, batch)
  flops = (steps * grad + 3 * forward) * batch
  row = make_row(
    name, label, jt, tt, ceil, batch, "images/s", flops, flops, compile_seconds=compile_s
  )
  row["agreement"] = {
    "jaxrobust": float(np.mean(jo)),
    "pytorch": float(np.mean(to)),
    "what": f"training accuracy on the PGD-{steps} examples of each step",
    "examples": len(jo) * batch,
  }
  return row
