"""APGD-T (Croce & Hein 2020): targeted APGD on the targeted DLR loss, over
several target classes, as AutoAttack's "apgd-t" runs it."""

import functools

import jax
import jax.numpy as jnp

from jaxrobust import checks
from jaxrobust.attacks import apgd_iteration as iteration
from jaxrobust.attacks import core, losses
from jaxrobust.attacks.apgd import check_settings, require_classes, with_rounds
from jaxrobust.attacks.attack import Attack, factory, make


@factory("apgd_t")
def apgd_t(
  *,
  norm: str = "linf",
  eps: float,
  steps: int = 100,
  num_targets: int = 9,
  restarts: int = 1,
  rho: float = 0.75,
  use_largereps: bool = False,
) -> Attack:
  """APGD-T: targeted APGD towards each of the likeliest other classes in turn.

  y is the true label. For each target t among the `num_targets` classes
  with the highest clean logits other than y (all K - 1 when K - 1 is
  fewer), in that order, APGD (`apgd`'s iteration, schedule and start, in
  the same norms, with `use_largereps` as there) with `restarts` restarts
  maximises the targeted DLR loss

    -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)     (`losses.dlr_t`),

  z_pi1 >= z_pi2 >= ... the sorted logits, K >= 4 classes. Success is
  misclassification (any class other than y, not only t). Per example it
  keeps the first success in target order; where no target succeeds, it
  returns the point of each target's run whose margin max_{i != y} z_i - z_y
  is highest. The targets are a `core.loop_until` that stops once every
  example of the batch has succeeded (the result is the same). Target i runs
  with the key `fold_in(k, i)`; the targets are also the attack's rounds
  (`Attack.round_fn`: round m is the m-th target alone), so an evaluation
  runs each target only on the examples the targets before it left robust.

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

  References:
    Croce & Hein, 2020, "Reliable evaluation of adversarial robustness with an
    ensemble of diverse parameter-free attacks".
  """
  norm, steps = check_settings(norm, eps, steps, rho, use_largereps)
  num_targets = checks.integer_at_least("num_targets", num_targets, 1)
  restarts = checks.integer_at_least("restarts", restarts, 1)
  settings = dict(norm=norm, steps=steps, rho=rho, use_largereps=use_largereps)
  one_target = functools.partial(_one_target, restarts=restarts, settings=settings)

  def attack_one(logits_one, x, y, key, eps):
    targets = _ranked_targets(logits_one, x, y)
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
    targets = _ranked_targets(logits_one, x, y)
    target = targets[jnp.minimum(m, targets.shape[0] - 1)]
    delta, success = one_target(logits_one, x, y, target, key, eps)
    return x + jnp.where(success & (m < min(num_targets, targets.shape[0])), delta, 0.0)

  check = lambda logits_fn, x, y: require_classes(core.check_batch(logits_fn, x, y), 4, "apgd_t")
  attack, round_fn = with_rounds(check, attack_one, round_one)
  rounded = num_targets > 1
  return make(attack, rounds=num_targets if rounded else 0, round_fn=round_fn if rounded else None)


def _one_target(logits_one, x, y, target, key, eps, *, restarts, settings):
  """(delta, success) of APGD towards `target` with `restarts` restarts."""

  def objective(logits):
    return losses.dlr_t(logits, y, target), jnp.argmax(logits) != y

  def run(k):
    evaluate = iteration.value_and_grad(logits_one, objective, x, k, 1)
    return iteration.run(evaluate, x, k, eps, **settings)

  delta, _, success = core.best_of_restarts(run, key, restarts)
  return delta, success


def _ranked_targets(logits_one, x, y):
  """The classes other than y, by clean logit, highest first: [K - 1]."""
  clean = logits_one(x)
  others = clean.shape[-1] - 1
  return jax.lax.top_k(jnp.where(jnp.arange(others + 1) == y, -jnp.inf, clean), others)[1]
