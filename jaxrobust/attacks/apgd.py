"""Auto-PGD and its targeted version APGD-T (Croce & Hein 2020, "Reliable
evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks")."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxrobust import checks
from jaxrobust.attacks import core, losses
from jaxrobust.attacks.attack import Attack, make

MOMENTUM = 0.75  # alpha in the paper


def checkpoints(steps):
  """The iterations w_1 < w_2 < ... <= `steps` at which APGD checks its
  progress, as the authors' code counts them (integer floors of fractions
  of N = `steps`): w_j = h_1 + ... + h_j, with h_1 = max(floor(0.22 N), 1)
  and h_{j+1} = max(h_j - max(floor(0.03 N), 1), max(floor(0.06 N), 1))."""
  length, shrink, shortest = (max(int(f * steps), 1) for f in (0.22, 0.03, 0.06))
  points = [length]
  while True:
    length = max(length - shrink, shortest)
    if points[-1] + length > steps:
      return points
    points.append(points[-1] + length)


def apgd(
  *, norm="linf", eps, steps=100, loss="ce", targeted=False, restarts=1, rho=0.75, eot_samples=1
) -> Attack:
  """Auto-PGD: PGD with momentum and a step size it adapts itself.

  Threat model: x_adv = x + d with ||d||_p <= eps (p = inf or 2) and x_adv in
  [0, 1]; P below projects onto this set. The attack maximises f, the loss
  (untargeted) or minus the loss (targeted; y the target). From x^(0) on the
  sphere of radius eps (a uniform direction, scaled to reach the ball's
  boundary, and clipped to the box, as in the authors' code), with
  eta = 2 eps and, for k = 0, 1, ... (alpha = 1 at k = 0, else 0.75):

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
  `steps` iterations cost `steps` + 1 gradients. With `restarts` > 1 it runs
  again from fresh random starts and keeps the better result per example.

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
    norm: "linf" or "l2".
    eps: radius of the ball, > 0.
    steps: iterations per restart, >= 1.
    loss: "ce" or "dlr".
    targeted: drive towards class y instead of away from it.
    restarts: independent runs per example, >= 1.
    rho: condition 1's threshold, in [0, 1].
    eot_samples: gradient draws of a stochastic model per step, >= 1.

  Returns:
    An `Attack`, `attack(logits_fn, x, y, key, eps=None) -> x_adv`: per
    example the iterate of highest f among those that succeed (misclassified;
    targeted: classified as y) if any does, else among all.
  """
  norm = core.check_norm(norm)
  core.check_eps(eps)
  steps = checks.integer_at_least("steps", steps, 1)
  restarts = checks.integer_at_least("restarts", restarts, 1)
  checks.one_of("loss", loss, ("ce", "dlr"))
  checks.in_interval("rho", rho, 0.0, 1.0)
  eot_samples = checks.integer_at_least("eot_samples", eot_samples, 1)
  if targeted:
    loss_fn = losses.dlr_targeted if loss == "dlr" else losses.cross_entropy
  else:
    loss_fn = losses.get(loss)
  sign = -1.0 if targeted else 1.0
  min_classes = {"ce": 2, "dlr": 4 if targeted else 3}[loss]

  def attack_one(logits_one, x, y, key, eps):
    def objective(logits):
      hit = jnp.argmax(logits) == y
      return sign * loss_fn(logits, y), hit if targeted else ~hit

    run = lambda k: _run(
      _value_and_grad(logits_one, objective, x, k, eot_samples), x, k, eps, norm, steps, rho
    )
    return x + core.best_of_restarts(run, key, restarts)[0]

  def attack(logits_fn, x, y, key, eps):
    stochastic = eot_samples > 1
    num_classes = core.check_batch(logits_fn, x, y, stochastic=stochastic)
    _require_classes(
      num_classes, min_classes, f"apgd with loss={loss!r}{' targeted' if targeted else ''}"
    )
    return core.batched(
      attack_one, logits_fn, x, y, key, core.check_eps(eps), stochastic=stochastic
    )

  return make(
    attack,
    "apgd",
    norm=norm,
    eps=eps,
    targeted=targeted,
    steps=steps,
    loss=loss,
    restarts=restarts,
    rho=rho,
    eot_samples=eot_samples,
  )


def apgd_t(*, norm="linf", eps, steps=100, num_targets=9, restarts=1, rho=0.75) -> Attack:
  """APGD-T: targeted APGD on the targeted DLR loss, over several target
  classes, as in Croce & Hein's code (AutoAttack's "apgd-t").

  y is the true label. For each target t among the `num_targets` classes
  with the highest clean logits other than y (all K - 1 when K - 1 is
  fewer), in that order, APGD (`apgd`'s iteration, schedule and start) with
  `restarts` restarts maximises the targeted DLR loss

    -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)     (`losses.dlr_t`),

  z_pi1 >= z_pi2 >= ... the sorted logits, K >= 4 classes. Success is
  misclassification (any class other than y, not only t). Per example it
  keeps the first success in target order (later targets cannot undo it);
  where no target succeeds, it returns the point of each target's run whose
  margin max_{i != y} z_i - z_y is highest. The targets are a
  `lax.while_loop`: compiling costs one target's run whatever their number;
  running costs up to `num_targets` x `restarts` x (`steps` + 1) gradients,
  fewer when every example of a batch succeeds before the last target (the
  loop stops there, `core.loop_until`; the result is the same).

  Args:
    norm: "linf" or "l2".
    eps: radius of the ball, > 0.
    steps: iterations per target and restart, >= 1.
    num_targets: target classes per example, >= 1 (AutoAttack: 9).
    restarts: runs per target, >= 1.
    rho: as in `apgd`.

  Returns:
    An `Attack`, `attack(logits_fn, x, y, key, eps=None) -> x_adv`.
  """
  norm = core.check_norm(norm)
  core.check_eps(eps)
  steps = checks.integer_at_least("steps", steps, 1)
  num_targets = checks.integer_at_least("num_targets", num_targets, 1)
  restarts = checks.integer_at_least("restarts", restarts, 1)
  checks.in_interval("rho", rho, 0.0, 1.0)

  def attack_one(logits_one, x, y, key, eps):
    clean = logits_one(x)
    count = min(num_targets, clean.shape[-1] - 1)
    targets = jax.lax.top_k(jnp.where(jnp.arange(clean.shape[-1]) == y, -jnp.inf, clean), count)[1]

    def for_target(i, found):
      target = targets[i]

      def objective(logits):
        return losses.dlr_t(logits, y, target), jnp.argmax(logits) != y

      run = lambda k: _run(
        _value_and_grad(logits_one, objective, x, k, 1), x, k, eps, norm, steps, rho
      )
      delta, _, success = core.best_of_restarts(run, jax.random.fold_in(key, i), restarts)
      margin = losses.margin(logits_one(x + delta), y)
      candidate = (delta, margin, success)
      # The first success stays; before it, the highest margin.
      keep = found[2] | (~success & (found[1] >= margin))
      return jax.tree.map(lambda f, c: jnp.where(keep, f, c), found, candidate)

    start = (jnp.zeros_like(x), jnp.asarray(-jnp.inf, x.dtype), jnp.array(False))
    # After a success no later target changes the result: stop there.
    return x + core.loop_until(lambda f: f[2], 0, count, for_target, start, like=x)[0]

  def attack(logits_fn, x, y, key, eps):
    _require_classes(core.check_batch(logits_fn, x, y), 4, "apgd_t")
    return core.batched(attack_one, logits_fn, x, y, key, core.check_eps(eps))

  return make(
    attack,
    "apgd_t",
    norm=norm,
    eps=eps,
    steps=steps,
    num_targets=num_targets,
    restarts=restarts,
    rho=rho,
  )


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
  """The authors' start: a random direction scaled to the sphere of radius
  eps (L-inf: u / max|u| with u uniform in [-1, 1]^d; L2: a Gaussian
  direction), then clipped to the box."""
  if norm == "linf":
    u = jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0)
    delta = eps * u / jnp.maximum(jnp.max(jnp.abs(u)), 1e-12)
  else:
    u = jax.random.normal(key, x.shape, x.dtype)
    delta = eps * u / jnp.maximum(core.l2_norm(u), 1e-12)
  return core.clip_to_box(x, delta)


def _schedule(steps, rho):
  """Per iteration i (which makes x^(i+1)): whether i + 1 is a checkpoint, and
  condition 1's threshold rho h_j there (in float32, as the reference
  compares it)."""
  is_checkpoint = np.zeros(steps, bool)
  threshold = np.zeros(steps, np.float32)
  points = checkpoints(steps)
  for previous, point in zip([0] + points, points):
    is_checkpoint[point - 1] = True
    threshold[point - 1] = np.float32((point - previous) * rho)
  return jnp.asarray(is_checkpoint), jnp.asarray(threshold)


def _run(value_and_grad, x, key, eps, norm, steps, rho):
  """One APGD run from a random start: (delta, value, success) per example,
  delta the highest-value success if any iterate succeeded, else the
  highest-value iterate."""
  s = _apgd_run(value_and_grad, x, _start(key, x, eps, norm), eps, norm, steps, rho)
  return (
    jnp.where(s["success"], s["adversarial"], s["best"]),
    jnp.where(s["success"], s["adversarial_value"], s["best_value"]),
    s["success"],
  )


def _apgd_run(value_and_grad, x, delta, eps, norm, steps, rho):
  """`steps` APGD iterations from `delta`; returns the final state.
  `value_and_grad(delta, step)` returns ((value, success), gradient); `value`
  holds the last iterate's, which the next counts rises against (at first 0)."""
  is_checkpoint, threshold = _schedule(steps, rho)
  project = lambda delta: core.clip_to_box(x, core.project(delta, eps, norm))

  def step(i, s):
    alpha = jnp.where(i > 0, MOMENTUM, 1.0)
    z = project(s["delta"] + s["eta"] * core.steepest_ascent(s["grad"], norm))
    new = project(
      s["delta"] + alpha * (z - s["delta"]) + (1 - alpha) * (s["delta"] - s["previous"])
    )
    (value, success), grad = value_and_grad(new, i + 1)
    improved = value > s["best_value"]
    better_success = success & (~s["success"] | (value > s["adversarial_value"]))
    s = dict(
      s,
      previous=s["delta"],
      delta=new,
      grad=grad,
      value=value,
      rises=s["rises"] + (value > s["value"]),
      best=jnp.where(improved, new, s["best"]),
      best_grad=jnp.where(improved, grad, s["best_grad"]),
      best_value=jnp.where(improved, value, s["best_value"]),
      success=s["success"] | success,
      adversarial=jnp.where(better_success, new, s["adversarial"]),
      adversarial_value=jnp.where(better_success, value, s["adversarial_value"]),
    )
    # Checkpoint: halve the step and restart from the best point if needed.
    checked = is_checkpoint[i]
    condition_1 = s["rises"] <= threshold[i]
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

  (value, success), grad = value_and_grad(delta, 0)
  s = dict(
    previous=delta,
    delta=delta,
    grad=grad,
    value=jnp.zeros_like(value),  # the reference's first window compares f(x^(1)) with 0
    eta=jnp.asarray(2.0 * eps, x.dtype),
    rises=jnp.zeros((), jnp.int32),
    best=delta,
    best_grad=grad,
    best_value=value,
    success=success,
    adversarial=delta,
    adversarial_value=value,
    halved=jnp.array(True),
    checked_value=value,
  )
  return core.loop(0, steps, step, s, like=x)
