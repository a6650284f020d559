"""Auto-PGD (Croce & Hein 2020, "Reliable evaluation of adversarial robustness
with an ensemble of diverse parameter-free attacks")."""
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxrobust import checks
from jaxrobust.attacks import core, losses

MOMENTUM = 0.75  # alpha in the paper


def checkpoints(steps):
  """The iterations w_j = ceil(p_j steps) at which APGD may halve its step:
  p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)."""
  point = lambda p: math.ceil(p * steps - 1e-9)  # no float error past an integer
  p_prev, p, points = 0.0, 0.22, set()
  while point(p) <= steps:
    points.add(point(p))
    p_prev, p = p, p + max(p - p_prev - 0.03, 0.06)
  return sorted(points - {0})


def apgd(*, norm="linf", eps, steps=100, loss="ce", targeted=False, restarts=1,
         rho=0.75):
  """Auto-PGD: PGD with momentum and a step size it adapts itself.

  Threat model: x_adv = x + d with ||d||_p <= eps (p = inf or 2) and x_adv in
  [0, 1]; P below projects onto this set. The attack maximises f, the loss
  (untargeted) or minus the loss (targeted; y the target). From x^(0) uniform
  in the ball (as in the authors' code), with eta = 2 eps and, for k = 0, 1, ...
  (alpha = 1 at k = 0, else 0.75):

    z^(k+1) = P(x^(k) + eta u(grad f(x^(k)))),
    x^(k+1) = P(x^(k) + alpha (z^(k+1) - x^(k)) + (1 - alpha) (x^(k) - x^(k-1))),

  u = sign for L-infinity and g / ||g||_2 for L2. At the checkpoints
  w_j = ceil(p_j steps) (`checkpoints`) the step is halved and x^(k+1) reset
  to the best point so far, x_max, when
    1. f rose in fewer than rho (w_j - w_{j-1}) of the steps since w_{j-1}, or
    2. eta was not halved at w_{j-1} and f(x_max) has not risen since then.
  `steps` iterations cost `steps` + 1 gradients. With `restarts` > 1 it runs
  again from fresh random starts and keeps the better result per example.

  Losses: "ce", cross-entropy; "dlr", the difference of logits ratio
  -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12), K >= 3 classes
  (`losses.dlr`); targeted, (max_{i != t} z_i - z_t) / (z_pi1 - (z_pi3 +
  z_pi4) / 2 + 1e-12), K >= 4 (`losses.dlr_targeted`).

  Loop form: a `lax.fori_loop` on every backend (compiles once whatever
  `steps`), its gradients through `core.canonical_convolutions` so that
  XLA:CPU runs them at full speed inside the loop.

  Args:
    norm: "linf" or "l2".
    eps: radius of the ball, > 0.
    steps: iterations per restart, >= 1.
    loss: "ce" or "dlr".
    targeted: drive towards class y instead of away from it.
    restarts: independent runs per example, >= 1.
    rho: condition 1's threshold, in [0, 1].

  Returns:
    `attack(logits_fn, x, y, key) -> x_adv`: per example the iterate of highest
    f among those that succeed (misclassified; targeted: classified as y) if
    any does, else among all.
  """
  norm = core.check_norm(norm)
  checks.positive("eps", eps)
  steps = checks.integer_at_least("steps", steps, 1)
  restarts = checks.integer_at_least("restarts", restarts, 1)
  checks.one_of("loss", loss, ("ce", "dlr"))
  checks.in_interval("rho", rho, 0.0, 1.0)
  loss_fn = losses.dlr_targeted if (loss, targeted) == ("dlr", True) else losses.get(loss)
  sign = -1.0 if targeted else 1.0
  min_classes = {"ce": 2, "dlr": 4 if targeted else 3}[loss]

  # Static schedule: per iteration i (which makes x^(i+1)), whether i + 1 is a
  # checkpoint and the length of the interval it closes.
  points = checkpoints(steps)
  is_checkpoint = np.zeros(steps, bool)
  interval = np.ones(steps, np.float32)
  for previous, point in zip([0] + points, points):
    is_checkpoint[point - 1] = True
    interval[point - 1] = point - previous

  def attack_one(logits_one, x, y, key):
    checkpoint_table, interval_table = jnp.asarray(is_checkpoint), jnp.asarray(interval)

    def objective(delta):
      logits = logits_one(x + delta)
      hit = jnp.argmax(logits) == y
      return sign * loss_fn(logits, y), hit if targeted else ~hit

    value_and_grad = core.canonical_convolutions(
        jax.value_and_grad(objective, has_aux=True))
    project = lambda delta: core.clip_to_box(x, core.project(delta, eps, norm))

    def step(i, s):
      alpha = jnp.where(i > 0, MOMENTUM, 1.0)
      z = project(s["delta"] + s["eta"] * core.steepest_ascent(s["grad"], norm))
      new = project(s["delta"] + alpha * (z - s["delta"])
                    + (1 - alpha) * (s["delta"] - s["previous"]))
      (value, success), grad = value_and_grad(new)
      rose = value > s["value"]
      improved = value > s["best_value"]
      better_success = success & (~s["success"] | (value > s["adversarial_value"]))
      s = dict(s, previous=s["delta"], delta=new, grad=grad, value=value,
               rises=s["rises"] + rose,
               best=jnp.where(improved, new, s["best"]),
               best_grad=jnp.where(improved, grad, s["best_grad"]),
               best_value=jnp.where(improved, value, s["best_value"]),
               success=s["success"] | success,
               adversarial=jnp.where(better_success, new, s["adversarial"]),
               adversarial_value=jnp.where(better_success, value, s["adversarial_value"]))
      # Checkpoint: halve the step and restart from the best point if needed.
      condition_1 = s["rises"] < rho * interval_table[i]
      condition_2 = ~s["halved"] & (s["best_value"] <= s["checked_value"])
      halve = checkpoint_table[i] & (condition_1 | condition_2)
      checked = checkpoint_table[i]
      return dict(
          s, eta=jnp.where(halve, s["eta"] / 2, s["eta"]),
          delta=jnp.where(halve, s["best"], s["delta"]),
          grad=jnp.where(halve, s["best_grad"], s["grad"]),
          value=jnp.where(halve, s["best_value"], s["value"]),
          rises=jnp.where(checked, 0, s["rises"]),
          halved=jnp.where(checked, halve, s["halved"]),
          checked_value=jnp.where(checked, s["best_value"], s["checked_value"]))

    def run(restart_key):
      delta = core.random_start(restart_key, x, eps, norm)
      (value, success), grad = value_and_grad(delta)
      s = dict(previous=delta, delta=delta, grad=grad, value=value,
               eta=jnp.asarray(2.0 * eps, x.dtype), rises=jnp.zeros((), jnp.int32),
               best=delta, best_grad=grad, best_value=value, success=success,
               adversarial=delta, adversarial_value=value,
               halved=jnp.array(False), checked_value=value)
      s = jax.lax.fori_loop(0, steps, step, s)
      return (jnp.where(s["success"], s["adversarial"], s["best"]),
              jnp.where(s["success"], s["adversarial_value"], s["best_value"]),
              s["success"])

    return x + core.best_of_restarts(run, key, restarts)[0]

  def attack(logits_fn, x, y, key):
    num_classes = core.num_classes_of(logits_fn, x)
    checks.require(num_classes >= min_classes,
                   f"apgd with loss={loss!r}{' targeted' if targeted else ''} needs "
                   f">= {min_classes} classes, the model has {num_classes}")
    return core.batched(attack_one, logits_fn, x, y, key)

  return attack
