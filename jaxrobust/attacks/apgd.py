"""Auto-PGD and its targeted version APGD-T (Croce & Hein 2020, "Reliable
evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks"; L1: Croce & Hein 2021, "Mind the box: l1-APGD for
sparse adversarial attacks on image classifiers"), as the authors' code runs
them."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxrobust import checks
from jaxrobust import keys as keys_lib
from jaxrobust.attacks import core, losses
from jaxrobust.attacks.attack import NORMS, Attack, make

MOMENTUM = 0.75  # alpha in the paper


def checkpoints(steps, norm="linf"):
  """The iterations w_1 < w_2 < ... <= `steps` at which APGD checks its
  progress, as the authors' code counts them (integer floors of fractions
  of N = `steps`).

  L-inf and L2: w_j = h_1 + ... + h_j, with h_1 = max(floor(0.22 N), 1) and
  h_{j+1} = max(h_j - max(floor(0.03 N), 1), max(floor(0.06 N), 1)).
  L1: every h = max(floor(0.04 N), 1) iterations.
  """
  if norm == "l1":
    every = max(int(0.04 * steps), 1)
    return list(range(every, steps + 1, every))
  length, shrink, shortest = (max(int(f * steps), 1) for f in (0.22, 0.03, 0.06))
  points = [length]
  while True:
    length = max(length - shrink, shortest)
    if points[-1] + length > steps:
      return points
    points.append(points[-1] + length)


def largereps_stages(steps):
  """L1 APGD's `use_largereps` schedule: (radius factor, iterations) of its
  three runs, 3 eps, 2 eps and eps over ceil(0.3 N), ceil(0.3 N) and the
  rest of N = `steps` iterations."""
  first = math.ceil(0.3 * steps)
  return ((3.0, first), (2.0, first), (1.0, steps - 2 * first))


def apgd(
  *,
  norm="linf",
  eps,
  steps=100,
  loss="ce",
  targeted=False,
  restarts=1,
  rho=0.75,
  eot_samples=1,
  use_largereps=False,
) -> Attack:
  """Auto-PGD: PGD with momentum and a step size it adapts itself.

  Threat model: x_adv = x + d with ||d||_p <= eps (p = inf, 2 or 1) and
  x_adv in [0, 1]; P below projects onto this set (for L1 exactly,
  `core.project_l1_box`). The attack maximises f, the loss (untargeted) or
  minus the loss (targeted; y the target).

  L-inf and L2 (Croce & Hein 2020). From x^(0) on the sphere of radius eps
  (a uniform direction, scaled to reach the ball's boundary, and clipped to
  the box, as in the authors' code), with eta = 2 eps and, for k = 0, 1, ...
  (alpha = 1 at k = 0, else 0.75):

    z^(k+1) = P(x^(k) + eta u(grad f(x^(k)))),
    x^(k+1) = P(x^(k) + alpha (z^(k+1) - x^(k)) + (1 - alpha) (x^(k) - x^(k-1))),

  u = sign for L-infinity and g / ||g||_2 for L2. At the checkpoints
  w_j (`checkpoints`: w_j - w_{j-1} = h_j) the step is halved and x^(k+1)
  reset to the best point so far, x_max, when
    1. f(x^(k+1)) > f(x^(k)) held in at most rho h_j of the h_j steps since
       w_{j-1} (f(x^(0)) counting as 0 in the first window, as in the
       authors' code), or
    2. eta was not halved at w_{j-1} (at w_1 it counts as halved) and
       f(x_max) has not risen since then.

  L1 (Croce & Hein 2021, "Mind the box: l1-APGD for sparse adversarial
  attacks on image classifiers"). x^(0) = P(x + n), n a standard Gaussian;
  eta = eps; no momentum: x^(k+1) = P(x^(k) + eta s / ||s||_1), s_i =
  sign(g_i) where |g_i| is at least the floor((1 - t) D)-th smallest of the
  D values |g| (0-based, at most D - 1), else 0; t = 0.2 at first. Every
  checkpoint (every max(floor(0.04 N), 1) iterations) sets m = ||x_max - x||_0
  (the pixels x_max changes) and t = m / (1.5 D); if m < 0.95 m' (m' the
  previous m, at first D) it sets eta = eps and x^(k+1) = x_max, else
  eta = eta / 1.5, and keeps eta in [eps / 10, eps]. `rho` plays no part. With `use_largereps` (AutoAttack's
  standard L1 version) it runs three times, with radius 3 eps, 2 eps and eps
  for ceil(0.3 N), ceil(0.3 N) and the rest of the N iterations
  (`largereps_stages`), each from the previous run's x_max projected onto
  the next ball (the first from P(x + n) in the 3 eps ball), with m' the
  start's sparsity and t = m' / (1.5 D); only the last run's points count.

  `steps` iterations cost `steps` + 1 gradients (+ 3 with `use_largereps`).
  With `restarts` > 1 it runs again from fresh random starts and keeps the
  better result per example; the restarts are then the attack's rounds
  (`Attack.round_fn`, restart r with the key `fold_in(k, r)`), so an
  evaluation re-attacks only what the restarts before left robust, as the
  authors' code does.

  Losses: "ce", cross-entropy; "dlr", the difference of logits ratio
  -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12), K >= 3 classes
  (`losses.dlr`). Targeted (y the target class, a user's choice),
  "ce" minimises the cross-entropy of y and "dlr" minimises
  (max_{i != y} z_i - z_y) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12), K >= 4
  (`losses.dlr_targeted`): the attack knows only the target, so this is not
  Croce & Hein's targeted loss, which needs the true label; that one, with
  its choice of targets and its success rule, is `apgd_t`.

  EOT: with `eot_samples` > 1 (AutoAttack's "rand" version, for randomized
  models) the model is stochastic, `logits_fn(x, key)`, and each gradient is
  the mean over `eot_samples` draws (keys from the example's key); the loss
  that picks x_max and drives the step size, and success, are the last
  draw's, as in the reference.

  Loop form: a `lax.fori_loop` on every backend (compiles once whatever
  `steps`), its gradients through `core.canonical_convolutions` so that
  XLA:CPU runs them at full speed inside the loop; restarts are a loop too.

  Args:
    norm: "linf", "l2" or "l1".
    eps: radius of the ball, > 0.
    steps: iterations per restart, >= 1 (>= 2 with `use_largereps`).
    loss: "ce" or "dlr".
    targeted: drive towards class y instead of away from it.
    restarts: independent runs per example, >= 1.
    rho: condition 1's threshold, in [0, 1].
    eot_samples: gradient draws of a stochastic model per step, >= 1.
    use_largereps: L1 only: the 3 eps, 2 eps, eps schedule.

  Returns:
    An `Attack`, `attack(logits_fn, x, y, key, eps=None) -> x_adv`: per
    example the iterate of highest f among those that succeed (misclassified;
    targeted: classified as y) if any does, else among all.
  """
  norm, steps = _check_settings(norm, eps, steps, rho, use_largereps)
  restarts = checks.integer_at_least("restarts", restarts, 1)
  checks.one_of("loss", loss, ("ce", "dlr"))
  eot_samples = checks.integer_at_least("eot_samples", eot_samples, 1)
  if targeted:
    loss_fn = losses.dlr_targeted if loss == "dlr" else losses.cross_entropy
  else:
    loss_fn = losses.get(loss)
  sign = -1.0 if targeted else 1.0
  min_classes = {"ce": 2, "dlr": 4 if targeted else 3}[loss]
  settings = dict(norm=norm, steps=steps, rho=rho, use_largereps=use_largereps)

  def run_from(logits_one, x, y, eps):
    """`key -> (delta, value, success)`: one run (restart) of APGD."""

    def objective(logits):
      hit = jnp.argmax(logits) == y
      return sign * loss_fn(logits, y), hit if targeted else ~hit

    return lambda k: _run(
      _value_and_grad(logits_one, objective, x, k, eot_samples), x, k, eps, **settings
    )

  def attack_one(logits_one, x, y, key, eps):
    return x + core.best_of_restarts(run_from(logits_one, x, y, eps), key, restarts)[0]

  def batched(one, logits_fn, x, y, key, eps):
    stochastic = eot_samples > 1
    num_classes = core.check_batch(logits_fn, x, y, stochastic=stochastic)
    _require_classes(
      num_classes, min_classes, f"apgd with loss={loss!r}{' targeted' if targeted else ''}"
    )
    return core.batched(one, logits_fn, x, y, key, core.check_eps(eps), stochastic=stochastic)

  def attack(logits_fn, x, y, key, eps):
    return batched(attack_one, logits_fn, x, y, key, eps)

  def round_fn(logits_fn, x, y, key, eps, m):
    del m  # restart m's key is `key`, fold_in(k, m) as best_of_restarts draws it
    one = lambda logits_one, xi, yi, ki, e: xi + run_from(logits_one, xi, yi, e)(ki)[0]
    return batched(one, logits_fn, x, y, key, eps)

  return make(
    attack,
    "apgd",
    eps=eps,
    targeted=targeted,
    loss=loss,
    restarts=restarts,
    eot_samples=eot_samples,
    rounds=restarts if restarts > 1 else 0,
    round_fn=round_fn if restarts > 1 else None,
    **settings,
  )


def apgd_t(
  *, norm="linf", eps, steps=100, num_targets=9, restarts=1, rho=0.75, use_largereps=False
) -> Attack:
  """APGD-T: targeted APGD on the targeted DLR loss, over several target
  classes, as in Croce & Hein's code (AutoAttack's "apgd-t").

  y is the true label. For each target t among the `num_targets` classes
  with the highest clean logits other than y (all K - 1 when K - 1 is
  fewer), in that order, APGD (`apgd`'s iteration, schedule and start, in
  the same norms, with `use_largereps` as there) with `restarts` restarts
  maximises the targeted DLR loss

    -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)     (`losses.dlr_t`),

  z_pi1 >= z_pi2 >= ... the sorted logits, K >= 4 classes. Success is
  misclassification (any class other than y, not only t). Per example it
  keeps the first success in target order (later targets cannot undo it);
  where no target succeeds, it returns the point of each target's run whose
  margin max_{i != y} z_i - z_y is highest. The targets are a
  `lax.while_loop`: compiling costs one target's run whatever their number;
  running costs up to `num_targets` x `restarts` x (`steps` + 1) gradients,
  fewer when every example of a batch succeeds before the last target (the
  loop stops there, `core.loop_until`; the result is the same). Target i
  runs with the key `fold_in(k, i)`; the targets are also the attack's
  rounds (`Attack.round_fn`: round m is the m-th target alone), so an
  evaluation runs each target only on the examples the targets before it
  left robust, as the authors' code does.

  Args:
    norm: "linf", "l2" or "l1".
    eps: radius of the ball, > 0.
    steps: iterations per target and restart, >= 1 (>= 2 with `use_largereps`).
    num_targets: target classes per example, >= 1 (AutoAttack: 9; 5 in L1).
    restarts: runs per target, >= 1.
    rho: as in `apgd`.
    use_largereps: as in `apgd` (L1 only).

  Returns:
    An `Attack`, `attack(logits_fn, x, y, key, eps=None) -> x_adv`.
  """
  norm, steps = _check_settings(norm, eps, steps, rho, use_largereps)
  num_targets = checks.integer_at_least("num_targets", num_targets, 1)
  restarts = checks.integer_at_least("restarts", restarts, 1)
  settings = dict(norm=norm, steps=steps, rho=rho, use_largereps=use_largereps)

  def one_target(logits_one, x, y, target, key, eps):
    """(delta, success) of APGD towards `target` with `restarts` restarts."""

    def objective(logits):
      return losses.dlr_t(logits, y, target), jnp.argmax(logits) != y

    run = lambda k: _run(_value_and_grad(logits_one, objective, x, k, 1), x, k, eps, **settings)
    delta, _, success = core.best_of_restarts(run, key, restarts)
    return delta, success

  def ranked_targets(logits_one, x, y):
    clean = logits_one(x)
    others = clean.shape[-1] - 1
    return jax.lax.top_k(jnp.where(jnp.arange(others + 1) == y, -jnp.inf, clean), others)[1]

  def attack_one(logits_one, x, y, key, eps):
    targets = ranked_targets(logits_one, x, y)
    count = min(num_targets, targets.shape[0])

    def for_target(i, found):
      delta, success = one_target(logits_one, x, y, targets[i], jax.random.fold_in(key, i), eps)
      margin = losses.margin(logits_one(x + delta), y)
      candidate = (delta, margin, success)
      # The first success stays; before it, the highest margin.
      keep = found[2] | (~success & (found[1] >= margin))
      return jax.tree.map(lambda f, c: jnp.where(keep, f, c), found, candidate)

    start = (jnp.zeros_like(x), jnp.asarray(-jnp.inf, x.dtype), jnp.array(False))
    # After a success no later target changes the result: stop there.
    return x + core.loop_until(lambda f: f[2], 0, count, for_target, start, like=x)[0]

  def round_one(logits_one, x, y, key, eps, m):
    targets = ranked_targets(logits_one, x, y)
    delta, success = one_target(
      logits_one, x, y, targets[jnp.minimum(m, targets.shape[0] - 1)], key, eps
    )
    return x + jnp.where(success & (m < min(num_targets, targets.shape[0])), delta, 0.0)

  def batched(one, logits_fn, x, y, key, eps):
    _require_classes(core.check_batch(logits_fn, x, y), 4, "apgd_t")
    return core.batched(one, logits_fn, x, y, key, core.check_eps(eps))

  def attack(logits_fn, x, y, key, eps):
    return batched(attack_one, logits_fn, x, y, key, eps)

  def round_fn(logits_fn, x, y, key, eps, m):
    one = lambda logits_one, xi, yi, ki, e: round_one(logits_one, xi, yi, ki, e, m)
    return batched(one, logits_fn, x, y, key, eps)

  return make(
    attack,
    "apgd_t",
    eps=eps,
    num_targets=num_targets,
    restarts=restarts,
    rounds=num_targets if num_targets > 1 else 0,
    round_fn=round_fn if num_targets > 1 else None,
    **settings,
  )


def zero_gradient_fraction(
  logits_fn, x, y, *, loss="dlr", targets=None, key=None, eps=None, norm="linf"
):
  """The fraction of examples where the gradient of `loss` with respect to
  the input is exactly zero, sum_i |g_i| = 0: the check the authors' code
  runs at every start of APGD-DLR and APGD-T (`check_zero_gradients`), where
  a zero gradient leaves the attack without a direction.

  Args:
    logits_fn: a batch of images [B, ...] -> logits [B, K].
    x: images in [0, 1], [B, ...].
    y: true labels [B].
    loss: "dlr" (APGD-DLR), "dlr_t" (APGD-T) or "ce".
    targets: for "dlr_t", the target class per example [B]; by default
      APGD-T's first, the class of highest logit other than y.
    key, eps, norm: with `eps`, the gradient is taken at the points APGD's
      first run starts from (its random start in the `norm` ball of radius
      eps, for the same `key`), else at x.

  Returns:
    A scalar in [0, 1].
  """
  checks.one_of("loss", loss, ("ce", "dlr", "dlr_t"))
  checks.require(eps is None or key is not None, "zero_gradient_fraction with eps needs a key")
  if eps is not None:
    norm = core.check_norm(norm, NORMS)
    keys = jax.vmap(jax.random.fold_in, (0, None))(keys_lib.example_keys(key, x.shape[0]), 0)
    x = x + jax.vmap(lambda k, xi: _start(k, xi, eps, norm))(keys, x)
  if loss == "dlr_t":
    if targets is None:
      targets = jnp.argmax(jax.vmap(lambda z, c: z.at[c].set(-jnp.inf))(logits_fn(x), y), -1)
    loss_fn = lambda z, c, t: losses.dlr_t(z, c, t)
  else:
    targets = jnp.zeros_like(y)
    loss_fn = lambda z, c, t: losses.get(loss)(z, c)
  total = lambda xb: jnp.sum(jax.vmap(loss_fn)(logits_fn(xb), y, targets))
  grad = jax.grad(total)(x).reshape(x.shape[0], -1)
  return jnp.mean(jnp.sum(jnp.abs(grad), -1) == 0)


def _check_settings(norm, eps, steps, rho, use_largereps):
  """Validates the settings `apgd` and `apgd_t` share; returns (norm, steps)."""
  norm = core.check_norm(norm, NORMS)
  core.check_eps(eps)
  checks.in_interval("rho", rho, 0.0, 1.0)
  checks.require(
    isinstance(use_largereps, bool), f"use_largereps must be True or False, got {use_largereps!r}"
  )
  checks.require(
    not use_largereps or norm == "l1",
    f"use_largereps is L1 APGD's schedule; it needs norm='l1', got {norm!r}",
  )
  steps = checks.integer_at_least("steps", steps, 2 if use_largereps else 1)
  return norm, steps


def _require_classes(num_classes, minimum, what):
  checks.require(
    num_classes >= minimum, f"{what} needs >= {minimum} classes, the model has {num_classes}"
  )


def _value_and_grad(logits_one, objective, x, key, eot_samples):
  """`delta -> ((value, success), grad)` of `objective(logits_one(x + delta))`;
  with EOT, the gradient is the mean over `eot_samples` draws and the value
  and success are the last draw's (as in the reference)."""

  def value(delta, draw_key=None):
    logits = logits_one(x + delta) if draw_key is None else logits_one(x + delta, draw_key)
    return objective(logits)

  value_and_grad = core.canonical_convolutions(jax.value_and_grad(value, has_aux=True))
  if eot_samples == 1:
    return lambda delta, step: value_and_grad(delta)

  def mean_gradient(delta, step):
    keys = jax.random.split(jax.random.fold_in(key, step), eot_samples)
    (values, success), grads = jax.vmap(value_and_grad, (None, 0))(delta, keys)
    return (values[-1], success[-1]), grads.mean(0)

  return mean_gradient


def _start(key, x, eps, norm):
  """The authors' start. L-inf and L2: a random direction scaled to the
  sphere of radius eps (L-inf: u / max|u| with u uniform in [-1, 1]^d; L2: a
  Gaussian direction), then clipped to the box. L1: a standard Gaussian
  projected onto the ball and the box."""
  if norm == "l1":
    return _projection(x, eps, norm)(jax.random.normal(key, x.shape, x.dtype))
  if norm == "linf":
    u = jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0)
    delta = eps * u / jnp.maximum(jnp.max(jnp.abs(u)), 1e-12)
  else:
    u = jax.random.normal(key, x.shape, x.dtype)
    delta = eps * u / jnp.maximum(core.l2_norm(u), 1e-12)
  return core.clip_to_box(x, delta)


def _projection(x, eps, norm):
  """P: delta -> the nearest point of the ball (L-inf, L1) intersected with
  the box, or the ball's nearest point clipped to the box (L2, as the
  authors' code)."""
  if norm == "l1":
    return lambda delta: core.clip_to_box(x, core.project_l1_box(x, delta, eps))
  return lambda delta: core.clip_to_box(x, core.project(delta, eps, norm))


def _schedule(steps, norm, rho):
  """Per iteration i (which makes x^(i+1)): whether i + 1 is a checkpoint, and
  condition 1's threshold rho h_j there (in float32, as the reference
  compares it)."""
  is_checkpoint = np.zeros(steps, bool)
  threshold = np.zeros(steps, np.float32)
  points = checkpoints(steps, norm)
  for previous, point in zip([0] + points, points):
    is_checkpoint[point - 1] = True
    threshold[point - 1] = np.float32((point - previous) * rho)
  return jnp.asarray(is_checkpoint), jnp.asarray(threshold)


def _run(value_and_grad, x, key, eps, **settings):
  """One APGD run from a random start (with `use_largereps`, its three runs):
  (delta, value, success) per example, delta the highest-value success if
  any iterate succeeded, else the highest-value iterate."""
  s = _final_state(value_and_grad, x, key, eps, **settings)
  return (
    jnp.where(s["success"], s["adversarial"], s["best"]),
    jnp.where(s["success"], s["adversarial_value"], s["best_value"]),
    s["success"],
  )


def _final_state(value_and_grad, x, key, eps, *, norm, steps, rho, use_largereps):
  """The state after one APGD run (`_apgd_run`); with `use_largereps`, after
  the last of its three runs, each started from the previous one's best point."""
  if not use_largereps:
    return _apgd_run(value_and_grad, x, _start(key, x, eps, norm), eps, norm, steps, rho)
  delta, first_step = _start(key, x, 3.0 * eps, norm), 0
  for factor, stage_steps in largereps_stages(steps):
    delta = _projection(x, factor * eps, norm)(delta)
    s = _apgd_run(
      value_and_grad, x, delta, factor * eps, norm, stage_steps, rho, first_step, sparse=True
    )
    delta, first_step = s["best"], first_step + stage_steps + 1
  return s


def _apgd_run(value_and_grad, x, delta, eps, norm, steps, rho, first_step=0, sparse=False):
  """`steps` APGD iterations from `delta`; returns the final state.
  `value_and_grad(delta, step)` returns ((value, success), gradient), step
  counting from `first_step`. L1: with `sparse`, the sparsity schedule starts
  from delta's sparsity (`use_largereps`), else from t = 0.2."""
  is_checkpoint, threshold = _schedule(steps, norm, rho)
  project = _projection(x, eps, norm)

  def step(i, s):
    new = _next_point(s, i, project, norm)
    (value, success), grad = value_and_grad(new, first_step + i + 1)
    s = _record(s, new, value, success, grad)
    if norm == "l1":
      return _sparsity_checkpoint(s, is_checkpoint[i], x, eps)
    return _progress_checkpoint(s, is_checkpoint[i], threshold[i])

  s = _initial_state(value_and_grad(delta, first_step), x, delta, eps, norm, sparse)
  return core.loop(0, steps, step, s, like=x) if steps else s


def _initial_state(evaluated, x, delta, eps, norm, sparse):
  """The state at x^(0) = `delta`, from `evaluated`, its ((value, success), gradient)."""
  (value, success), grad = evaluated
  s = dict(
    previous=delta,
    delta=delta,
    grad=grad,
    eta=jnp.asarray((1.0 if norm == "l1" else 2.0) * eps, delta.dtype),
    best=delta,
    best_grad=grad,
    best_value=value,
    success=success,
    adversarial=delta,
    adversarial_value=value,
  )
  if norm == "l1":
    size = jnp.float32(delta.size)
    sparsity = _changed(x, delta) if sparse else size
    topk = sparsity / size / 1.5 if sparse else jnp.float32(0.2)
    return dict(s, sparsity=sparsity, topk=topk)
  # The reference's first window compares f(x^(1)) with 0, not with f(x^(0)).
  zero = jnp.zeros_like(value)
  return dict(s, last_value=zero, rises=jnp.int32(0), halved=jnp.array(True), checked_value=value)


def _next_point(s, i, project, norm):
  """x^(i+1): the step (with momentum in L-inf and L2), projected."""
  delta, eta = s["delta"], s["eta"]
  if norm == "l1":
    return project(delta + eta * _sparse_direction(s["grad"], s["topk"]))
  alpha = jnp.where(i > 0, MOMENTUM, 1.0)
  z = project(delta + eta * core.steepest_ascent(s["grad"], norm))
  return project(delta + alpha * (z - delta) + (1 - alpha) * (delta - s["previous"]))


def _sparse_direction(grad, topk):
  """s / ||s||_1: the signs of the gradient's coordinates of largest |g| (a
  fraction `topk` of them, as the reference selects them), 0 elsewhere."""
  size = jnp.abs(grad)
  count = size.size
  index = jnp.clip((1.0 - topk) * count, 0, count - 1).astype(jnp.int32)
  signs = jnp.sign(grad) * (size >= jnp.sort(size.ravel())[index])
  return signs / (jnp.sum(jnp.abs(signs)) + 1e-10)


def _record(s, new, value, success, grad):
  """The state after x^(k+1) = `new`: its value, gradient and the best points."""
  improved = value > s["best_value"]
  better_success = success & (~s["success"] | (value > s["adversarial_value"]))
  s = dict(
    s,
    previous=s["delta"],
    delta=new,
    grad=grad,
    best=jnp.where(improved, new, s["best"]),
    best_grad=jnp.where(improved, grad, s["best_grad"]),
    best_value=jnp.where(improved, value, s["best_value"]),
    success=s["success"] | success,
    adversarial=jnp.where(better_success, new, s["adversarial"]),
    adversarial_value=jnp.where(better_success, value, s["adversarial_value"]),
  )
  if "rises" in s:
    s.update(rises=s["rises"] + (value > s["last_value"]), last_value=value)
  return s


def _progress_checkpoint(s, checked, threshold):
  """L-inf and L2: halve the step and restart from the best point if
  condition 1 or 2 holds at a checkpoint."""
  condition_1 = s["rises"] <= threshold
  condition_2 = ~s["halved"] & (s["best_value"] <= s["checked_value"])
  halve = checked & (condition_1 | condition_2)
  return dict(
    s,
    eta=jnp.where(halve, s["eta"] / 2, s["eta"]),
    delta=jnp.where(halve, s["best"], s["delta"]),
    grad=jnp.where(halve, s["best_grad"], s["grad"]),
    rises=jnp.where(checked, 0, s["rises"]),
    halved=jnp.where(checked, halve, s["halved"]),
    checked_value=jnp.where(checked, s["best_value"], s["checked_value"]),
  )


def _changed(x, delta):
  """||x + delta - x||_0: the pixels the perturbation changes (in float32)."""
  return jnp.count_nonzero(x + delta != x).astype(jnp.float32)


def _sparsity_checkpoint(s, checked, x, eps):
  """L1: at a checkpoint, the fraction of coordinates stepped follows the
  best point's sparsity; a sparsity that fell by more than 5 % resets the
  step to eps and the point to the best one, else the step shrinks by 1.5."""
  sparsity = _changed(x, s["best"])
  old = s["sparsity"]
  reduced = checked & (old > 0) & (sparsity / jnp.maximum(old, 1.0) < jnp.float32(0.95))
  eta = jnp.clip(jnp.where(reduced, eps, s["eta"] / 1.5), eps / 10.0, eps).astype(s["eta"].dtype)
  return dict(
    s,
    eta=jnp.where(checked, eta, s["eta"]),
    delta=jnp.where(reduced, s["best"], s["delta"]),
    grad=jnp.where(reduced, s["best_grad"], s["grad"]),
    sparsity=jnp.where(checked, sparsity, old),
    topk=jnp.where(checked, sparsity / jnp.float32(s["best"].size) / 1.5, s["topk"]),
  )
