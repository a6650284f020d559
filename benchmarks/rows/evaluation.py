"""The evaluation rows: randomized smoothing's counting, a robust-accuracy evaluation
that attacks only the examples still correct, and AutoAttack through
`jr.evaluation.evaluate`, each against its PyTorch reference."""

import math
from typing import Any

from benchmarks.bench import Bench
from benchmarks.harness import LINF_EPS, SIGMA, Row, make_row, time_alternately


def smoothing(b: Bench) -> Row:
  """Noise draws per second of randomized smoothing's counting procedure."""
  jax, jr, np, torch = b.jax, b.jr, b.np, b.torch
  k, n, chunk = b.args.smoothing_images, b.args.smoothing_draws, b.args.smoothing_batch
  num_classes = b.test_set.num_classes
  runs = b.args.repeats + 1
  images = b.test_set.x[: runs * k].reshape(runs, k, *b.test_set.x.shape[1:])
  labels = b.test_set.y[: runs * k].reshape(runs, k)
  variables = b.variables
  logits_fn = lambda xb: b.apply(variables, xb)  # one object: one compilation

  def jax_run(i):
    return jr.smoothing.noise_counts(
      logits_fn,
      images[i],
      jax.random.key(100 + i),
      sigma=SIGMA,
      n=n,
      batch_size=chunk,
      mesh=b.mesh,
    )

  images_t = [b.tm.nhwc_to_nchw(x).to(b.torch_device) for x in images]

  def torch_run(i):
    # Cohen et al.'s `Smooth._sample_noise`, the reference implementation.
    torch.manual_seed(i)
    counts = np.zeros((k, num_classes), np.int64)
    with torch.inference_mode():
      for j in range(k):
        x = images_t[i][j]
        remaining = n
        while remaining:
          this = min(chunk, remaining)
          remaining -= this
          batch = x.repeat((this, 1, 1, 1))
          noise = torch.randn_like(batch) * SIGMA
          predictions = b.net(batch + noise).argmax(1)
          counts[j] += np.bincount(predictions.cpu().numpy(), minlength=num_classes)
    return counts

  jt, tt, ceil, jo, to, compile_s = time_alternately(jax_run, torch_run, b.args.repeats, b.ceiling)
  draws = k * n
  flops = draws * b.forward_flops
  row = make_row(
    "smoothing",
    f"randomized smoothing: {n} noise draws x {k} images (sigma {SIGMA}, chunks of {chunk})",
    jt,
    tt,
    ceil,
    draws,
    "draws/s",
    flops,
    flops,
    compile_seconds=compile_s,
  )
  smoothed = lambda outs: float(
    np.mean(np.concatenate([c.argmax(1) == labels[i] for i, c in enumerate(outs)]))
  )
  row["agreement"] = {
    "jaxrobust": smoothed(jo),
    "pytorch": smoothed(to),
    "what": "smoothed classifier's accuracy (top count)",
    "examples": runs * k,
  }
  return row


def _early_stop_run(b: Bench, xs: list, ys: list, attack: Any, attacked: list[int]) -> Any:
  """run(i): jaxrobust's robust accuracy on `xs[i]`, attacking only the examples
  classified correctly, packed into full batches (their count goes to `attacked`)."""
  jax, np = b.jax, b.np
  run_attack = b.sharded_attack(attack)
  B = b.batch
  base_key = jax.random.key(4321)

  def predictions(x: Any) -> Any:
    return np.asarray(b.predict(b.variables, x))

  def run(i: int) -> float:
    x, y = xs[i], ys[i]
    clean = (
      np.concatenate(
        [predictions(jax.device_put(x[s : s + B], b.batch_spec)) for s in range(0, len(x), B)]
      )
      == y
    )
    todo = np.nonzero(clean)[0]
    attacked.append(len(todo))
    robust = np.zeros(len(x), bool)
    for s in range(0, len(todo), B):
      part = todo[s : s + B]
      pad = np.resize(part, B)  # the last batch is padded with repeats, then ignored
      x_adv = run_attack(
        b.variables,
        jax.device_put(x[pad], b.batch_spec),
        jax.device_put(y[pad], b.batch_spec),
        jax.random.fold_in(base_key, i * 1000 + s),
      )
      robust[part] = predictions(x_adv)[: len(part)] == y[part]
    return float(robust.mean())

  return run


def _every_example_run(b: Bench, xs: list, ys: list, torch_attack: Any) -> Any:
  """run(i): the reference's robust accuracy on `xs[i]`, attacking every example."""
  np, torch = b.np, b.torch
  B = b.batch

  def run(i: int) -> float:
    torch.manual_seed(i)
    robust = []
    for s in range(0, len(xs[i]), B):
      x = b.tm.nhwc_to_nchw(xs[i][s : s + B]).to(b.torch_device)
      y = torch.from_numpy(ys[i][s : s + B].astype(np.int64)).to(b.torch_device)
      with torch.inference_mode():
        clean = b.net(x).argmax(1) == y
      x_adv = torch_attack(x, y)
      with torch.inference_mode():
        robust.append((clean & (b.net(x_adv).argmax(1) == y)).cpu().numpy())
    return float(np.concatenate(robust).mean())

  return run


def eval_early_stop(b: Bench) -> Row:
  """Robust accuracy under PGD-10 over 4 batches: jaxrobust attacks only the
  examples the model classifies correctly (the others are not robust
  whatever the attack does), packed into full batches; the reference attacks
  every example, as torchattacks' users do."""
  jr, np, ta = b.jr, b.np, b.torchattacks
  steps, alpha, per_run = 10, 2 / 255, 4
  B = b.batch
  runs = b.args.repeats + 1
  # Run i evaluates batches i .. i + per_run - 1 (mod the batches prepared).
  groups = [[(i + j) % runs for j in range(per_run)] for i in range(runs)]
  xs = [np.concatenate([b.x[k] for k in g]) for g in groups]
  ys = [np.concatenate([b.y[k] for k in g]) for g in groups]
  attacked: list[int] = []
  jax_run = _early_stop_run(
    b, xs, ys, jr.attacks.pgd(norm="linf", eps=LINF_EPS, step_size=alpha, steps=steps), attacked
  )
  torch_run = _every_example_run(
    b, xs, ys, ta.PGD(b.net, eps=LINF_EPS, alpha=alpha, steps=steps, random_start=True)
  )
  jt, tt, ceil, jo, to, compile_s = time_alternately(jax_run, torch_run, b.args.repeats, b.ceiling)
  work = per_run * B
  batches_attacked = np.mean([math.ceil(a / B) for a in attacked])
  jax_flops = work * b.forward_flops + batches_attacked * B * (
    steps * b.step_flops + b.forward_flops
  )
  torch_flops = work * (2 * b.forward_flops + steps * b.step_flops)
  row = make_row(
    "eval_early_stop",
    f"PGD-10 L-inf robust accuracy of {work} images, early stop",
    jt,
    tt,
    ceil,
    work,
    "images/s",
    jax_flops,
    torch_flops,
    compile_seconds=compile_s,
  )
  row["agreement"] = {
    "jaxrobust": float(np.mean(jo)),
    "pytorch": float(np.mean(to)),
    "what": "robust accuracy (correct clean and under attack)",
    "examples": runs * work,
  }
  row["attacked_fraction"] = float(np.mean(attacked)) / work
  b.notes.append(
    f"eval_early_stop: jaxrobust skips the attack on the examples already "
    f"misclassified (here {100 * (1 - row['attacked_fraction']):.0f} %; the "
    f"accuracy cannot change) and packs the rest into full batches of {B}; "
    f"the reference attacks all {work}."
  )
  return row


def autoattack(b: Bench) -> Row:
  """AutoAttack standard, L-inf 8/255, on the first `--autoattack-images`
  test images: `jr.attacks.autoattack` through `jr.evaluation.evaluate` (a
  cascade over the clean-correct examples) against torchattacks'
  `AutoAttack` at the reference's settings, run as `benchmarks/autoattack.py`
  runs it (`torch_autoattack`), in batches of `--batch-size`. Agreement: the
  robust accuracy each side reports."""
  jax, jr, np, torch = b.jax, b.jr, b.np, b.torch
  from benchmarks.autoattack import torch_autoattack  # pylint: disable=g-import-not-at-top

  n = b.args.autoattack_images
  x, y = b.test_set.x[:n], b.test_set.y[:n]
  variables = jax.device_get(b.variables)
  attacks = {"aa": jr.attacks.autoattack(norm="linf", eps=LINF_EPS)}
  x_t = b.tm.nhwc_to_nchw(x).to(b.torch_device)
  y_t = torch.from_numpy(y.astype(np.int64)).to(b.torch_device)

  def jax_run(i):
    del i  # the same images, key and result every run
    rep = jr.evaluation.evaluate(
      b.apply, variables, x, y, attacks, key=jax.random.key(0), batch_size=b.batch
    )
    return rep["results"][0]["accuracy"]

  def torch_run(i):
    torch.manual_seed(i)
    robust, _, _ = torch_autoattack(
      torch, b.torchattacks, b.net, "linf", LINF_EPS, x_t, y_t, b.batch
    )
    return float(robust.mean())

  jt, tt, ceil, jo, to, compile_s = time_alternately(jax_run, torch_run, b.args.repeats, b.ceiling)
  row = make_row(
    "autoattack",
    f"AutoAttack standard L-inf 8/255, {n} images",
    jt,
    tt,
    ceil,
    n,
    "images/s",
    0,
    0,
    compile_seconds=compile_s,
  )
  row["agreement"] = {
    "jaxrobust": float(np.median(jo)),
    "pytorch": float(np.median(to)),
    "what": "robust accuracy (median over runs)",
    "examples": n,
  }
  return row
