"""Projected gradient descent (Madry et al. 2018) and FGSM (Goodfellow et al. 2015)."""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxrobust import checks
from jaxrobust.attacks import core, losses
from jaxrobust.attacks.attack import Attack, AttackFn, factory, make


@factory("pgd")
def pgd(
  *,
  norm: str = "linf",
  eps: float,
  step_size: float | None = None,
  steps: int = 10,
  random_start: bool | float = True,
  restarts: int = 1,
  loss: str | Callable = "ce",
  targeted: bool = False,
  unroll: bool = False,
) -> Attack:
  """Projected gradient ascent on `loss` inside the `norm` ball of radius `eps`.

  Threat model: x_adv = x + d with ||d||_p <= eps (p = inf or 2) and x_adv in
  [0, 1]. From d_0 (uniform in the ball if `random_start` is True; sigma N(0, I)
  projected onto the ball if it is a number sigma > 0, TRADES's start of
  Zhang et al. 2019 with sigma = 0.001; else 0), each step is

    d <- clip_box(proj_eps(d + step_size * u)),

  with u = sign(grad) for L-infinity and grad / ||grad||_2 for L2, the gradient
  of `loss(logits_fn(x + d), y)`, which the attack maximises (untargeted) or
  minimises (`targeted`, y the target class). With `restarts` > 1 the attack
  runs again from fresh random starts and keeps, per example, the perturbation
  that succeeds (misclassified; or classified as the target) or else has the
  highest loss (lowest when targeted).

  Args:
    norm: "linf" or "l2".
    eps: radius of the ball, > 0; a scalar, or per example an array [B] passed
      to the attack as the keyword argument `eps=` instead.
    step_size: step length; default 2.5 * eps / steps (Madry et al.; see
      `core.default_step_size`).
    steps: gradient steps per restart, >= 1.
    random_start: True: start uniformly in the ball; a number sigma > 0:
      start at x + sigma N(0, I) (projected, clipped to the box); False: at x.
    restarts: independent runs per example, >= 1.
    loss: "ce" (cross-entropy), "cw" (margin max_{i!=y} z_i - z_y) or a
      callable `loss(logits [K], y) -> scalar`. With a callable loss, `y`
      may also be soft labels [B, K] (e.g. the clean prediction, for TRADES's
      KL divergence); success (for restarts) is then argmax z != argmax y.
    targeted: drive towards class y instead of away from it.
    unroll: loop form: a `lax.fori_loop` (default, every backend), or
      unrolled (True); see `core.iterate`.

  Returns:
    An `Attack`, `attack(logits_fn, x, y, key, eps=None) -> x_adv`.

  References:
    Madry et al., 2018, "Towards deep learning models resistant to adversarial
    attacks".
  """
  return make(_projected_gradient(rule="pgd", **locals()))


@factory("fgsm")
def fgsm(
  *,
  eps: float,
  norm: str = "linf",
  random_start: bool | float = False,
  step_size: float | None = None,
  loss: str | Callable = "ce",
  targeted: bool = False,
) -> Attack:
  """The fast gradient sign method: one step of `pgd`.

    x_adv = clip_box(proj_eps(x + d_0 + step_size * sign(grad))),

  d_0 = 0 by default (step_size = eps) or uniform in the ball with
  `random_start` (Wong et al. 2020's FGSM-RS uses step_size = 1.25 eps).
  With norm="l2" the step follows grad / ||grad||_2 (the fast gradient method).

  Args:
    eps, norm, random_start, step_size, loss, targeted: as in `pgd`.

  Returns:
    An `Attack`, `attack(logits_fn, x, y, key, eps=None) -> x_adv`.

  References:
    Goodfellow, Shlens & Szegedy, 2015, "Explaining and harnessing
    adversarial examples".
  """
  return make(_projected_gradient(rule="fgsm", steps=1, restarts=1, unroll=False, **locals()))


def _projected_gradient(
  *, norm, eps, step_size, steps, random_start, restarts, loss, targeted, unroll, rule
) -> AttackFn:
  """The attack function of `pgd` (and `fgsm`), with the step-size `rule`."""
  norm = core.check_norm(norm)
  core.check_eps(eps)
  steps = checks.integer_at_least("steps", steps, 1)
  restarts = checks.integer_at_least("restarts", restarts, 1)
  core.check_step_size(step_size)
  _check_random_start(random_start)
  loss_fn = losses.get(loss)
  soft_labels = callable(loss)
  sign = -1.0 if targeted else 1.0

  def objective(logits_one, x_adv, y):
    logits = logits_one(x_adv)
    return sign * loss_fn(logits, y), logits

  def succeeded(logits, y):
    hit = jnp.argmax(logits) == (jnp.argmax(y) if jnp.ndim(y) else y)
    return hit if targeted else ~hit

  def attack_one(logits_one, x, y, key, eps):
    alpha = core.default_step_size(rule, eps, steps) if step_size is None else step_size
    gradient = core.canonical_convolutions(jax.grad(lambda d: objective(logits_one, x + d, y)[0]))

    def step(_, delta):
      delta = delta + alpha * core.steepest_ascent(gradient(delta), norm)
      return core.clip_to_box(x, core.project(delta, eps, norm))

    def run(restart_key):
      delta = _start(restart_key, x, eps, norm, random_start)
      delta = core.iterate(step, delta, steps, unroll)
      value, logits = objective(logits_one, x + delta, y)
      return delta, value, succeeded(logits, y)

    return x + core.best_of_restarts(run, key, restarts)[0]

  def attack(logits_fn, x, y, key, eps):
    return core.batched(
      attack_one, logits_fn, x, y, key, core.check_eps(eps), soft_labels=soft_labels
    )

  return attack


def _start(key, x, eps, norm, random_start):
  """d_0: uniform in the ball (True), sigma N(0, I) projected (a number), or 0."""
  if random_start is True:
    return core.random_start(key, x, eps, norm)
  if random_start:
    delta = random_start * jax.random.normal(key, x.shape, x.dtype)
    return core.clip_to_box(x, core.project(delta, eps, norm))
  return jnp.zeros_like(x)


def _check_random_start(random_start):
  if not isinstance(random_start, bool):
    checks.positive("random_start (a bool, or the std of a Gaussian start)", random_start)
