"""Auto-PGD (Croce & Hein 2020; L1: Croce & Hein 2021), as the authors' code
runs it; its iteration is in `apgd_iteration`, its targeted version APGD-T in
`apgd_t`."""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxrobust import checks
from jaxrobust import keys as keys_lib
from jaxrobust.attacks import apgd_iteration as iteration
from jaxrobust.attacks import core, losses
from jaxrobust.attacks.apgd_iteration import checkpoints, largereps_stages  # noqa: F401
from jaxrobust.attacks.attack import NORMS, Attack, AttackFn, factory, make
from jaxrobust.types import Images, Labels, LogitsFn, PRNGKey


@factory("apgd")
def apgd(
  *,
  norm: str = "linf",
  eps: float,
  steps: int = 100,
  loss: str = "ce",
  targeted: bool = False,
  restarts: int = 1,
  rho: float = 0.75,
  eot_samples: int = 1,
  use_largereps: bool = False,
) -> Attack:
  """Auto-PGD: PGD with momentum and a step size it adapts itself.

  Maximises the loss (untargeted) or minus the loss (targeted; y the
  target) in the `norm` ball of radius `eps` intersected with [0, 1], with the
  iteration of `apgd_iteration`. `steps` iterations cost `steps` + 1
  gradients (+ 3 with `use_largereps`). The `restarts` (from fresh random
  starts; the better result kept per example) are the attack's rounds
  (`Attack.round_fn`, restart r with the key `fold_in(k, r)`). Losses: "ce",
  cross-entropy; "dlr", `losses.dlr` (K >= 3 classes), targeted
  `losses.dlr_targeted` (K >= 4), which knows only the target (Croce &
  Hein's targeted loss, which needs the true label, is `apgd_t`'s). With
  `eot_samples` > 1 (AutoAttack's "rand") the model is stochastic,
  `logits_fn(x, key)`: each gradient is the mean over that many draws, the
  value and success the last draw's, as in the reference.

  Args:
    norm: "linf", "l2" or "l1".
    eps: radius of the ball, > 0.
    steps: iterations per restart, >= 1 (>= 2 with `use_largereps`).
    loss: "ce" or "dlr".
    targeted: drive towards class y instead of away from it.
    restarts: independent runs per example, >= 1.
    rho: the progress threshold of the checkpoints, in [0, 1].
    eot_samples: gradient draws of a stochastic model per step, >= 1.
    use_largereps: L1 only: the 3 eps, 2 eps, eps schedule.

  Returns:
    An `Attack`, `attack(logits_fn, x, y, key, eps=None) -> x_adv`: per
    example the iterate of highest f among those that succeed (misclassified;
    targeted: classified as y) if any does, else among all.

  References:
    Croce & Hein, 2020, "Reliable evaluation of adversarial robustness with an
    ensemble of diverse parameter-free attacks".
  """
  norm, steps = check_settings(norm, eps, steps, rho, use_largereps)
  restarts = checks.integer_at_least("restarts", restarts, 1)
  checks.one_of("loss", loss, ("ce", "dlr"))
  eot_samples = checks.integer_at_least("eot_samples", eot_samples, 1)
  min_classes = {"ce": 2, "dlr": 4 if targeted else 3}[loss]
  settings = dict(norm=norm, steps=steps, rho=rho, use_largereps=use_largereps)
  stochastic = eot_samples > 1
  run_from = functools.partial(
    _run_from, loss=loss, targeted=targeted, eot_samples=eot_samples, settings=settings
  )

  def check(logits_fn, x, y):
    num_classes = core.check_batch(logits_fn, x, y, stochastic=stochastic)
    what = f"apgd with loss={loss!r}{' targeted' if targeted else ''}"
    require_classes(num_classes, min_classes, what)

  def attack_one(logits_one, x, y, key, eps):
    return x + core.best_of_restarts(run_from(logits_one, x, y, eps), key, restarts)[0]

  def round_one(logits_one, x, y, key, eps, m):
    del m  # restart m's key is `key`, fold_in(k, m) as best_of_restarts draws it
    return x + run_from(logits_one, x, y, eps)(key)[0]

  attack, round_fn = with_rounds(check, attack_one, round_one, stochastic=stochastic)
  return make(
    attack,
    stochastic=stochastic,
    label=f"apgd-{loss}",
    rounds=restarts if restarts > 1 else 0,
    round_fn=round_fn if restarts > 1 else None,
  )


def _run_from(logits_one, x, y, eps, *, loss, targeted, eot_samples, settings):
  """`key -> (delta, value, success)`: one run (restart) of APGD on one example."""
  sign = -1.0 if targeted else 1.0
  if targeted:
    loss_fn = losses.dlr_targeted if loss == "dlr" else losses.cross_entropy
  else:
    loss_fn = losses.get(loss)

  def objective(logits):
    hit = jnp.argmax(logits) == y
    return sign * loss_fn(logits, y), hit if targeted else ~hit

  def run(key):
    evaluate = iteration.value_and_grad(logits_one, objective, x, key, eot_samples)
    return iteration.run(evaluate, x, key, eps, **settings)

  return run


def with_rounds(
  check: Callable, attack_one: Callable, round_one: Callable, *, stochastic: bool = False
) -> tuple[AttackFn, Callable]:
  """The attack function and the round function of a per-example attack.

  Args:
    check: `check(logits_fn, x, y)`, run first (it raises on a bad batch).
    attack_one: `attack_one(logits_one, x, y, key, eps) -> x_adv` of one example.
    round_one: `round_one(logits_one, x, y, key, eps, m) -> x_adv`, round m alone.
    stochastic: whether the model is `logits_fn(x, key)`.

  Returns:
    `(attack, round_fn)`, both over the batch with `core.batched`.
  """

  def batched(one, logits_fn, x, y, key, eps):
    check(logits_fn, x, y)
    return core.batched(one, logits_fn, x, y, key, core.check_eps(eps), stochastic=stochastic)

  def attack(logits_fn, x, y, key, eps):
    return batched(attack_one, logits_fn, x, y, key, eps)

  def round_fn(logits_fn, x, y, key, eps, m):
    one = lambda logits_one, xi, yi, ki, e: round_one(logits_one, xi, yi, ki, e, m)
    return batched(one, logits_fn, x, y, key, eps)

  return attack, round_fn


def zero_gradient_fraction(
  logits_fn: LogitsFn,
  x: Images,
  y: Labels,
  *,
  loss: str = "dlr",
  targets: Labels | None = None,
  key: PRNGKey | None = None,
  eps: float | None = None,
  norm: str = "linf",
) -> jax.Array:
  """The fraction of examples where the gradient of `loss` with respect to the input is 0.

  sum_i |g_i| = 0: the check the authors' code runs at every start of
  APGD-DLR and APGD-T (`check_zero_gradients`), where a zero gradient leaves
  the attack without a direction.

  Args:
    logits_fn: a batch of images [B, ...] -> logits [B, K].
    x: images in [0, 1], [B, ...].
    y: true labels [B].
    loss: "dlr" (APGD-DLR), "dlr_t" (APGD-T) or "ce".
    targets: for "dlr_t", the target class per example [B]; by default
      APGD-T's first, the class of highest logit other than y.
    key: the key of APGD's random start (needed with `eps`).
    eps: with `eps`, the gradient is taken at the points APGD's first run
      starts from (its random start in the `norm` ball of radius eps, for
      the same `key`), else at x.
    norm: the ball of the start.

  Returns:
    A scalar in [0, 1].
  """
  checks.one_of("loss", loss, ("ce", "dlr", "dlr_t"))
  checks.require(eps is None or key is not None, "zero_gradient_fraction with eps needs a key")
  if eps is not None and key is not None:
    norm = core.check_norm(norm, NORMS)
    keys = jax.vmap(jax.random.fold_in, (0, None))(keys_lib.example_keys(key, x.shape[0]), 0)
    x = x + jax.vmap(lambda k, xi: iteration.start(k, xi, eps, norm))(keys, x)
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


def check_settings(
  norm: str, eps: float, steps: int, rho: float, use_largereps: bool
) -> tuple[str, int]:
  """Validates the settings `apgd` and `apgd_t` share.

  Returns:
    (the norm's canonical name, steps).
  """
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


def require_classes(num_classes: int, minimum: int, what: str) -> None:
  """Refuses a model of fewer than `minimum` classes for attack `what`."""
  checks.require(
    num_classes >= minimum, f"{what} needs >= {minimum} classes, the model has {num_classes}"
  )
