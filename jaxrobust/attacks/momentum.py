"""Momentum iterative FGSM (Dong et al. 2018) and its diverse-input variant
M-DI2-FGSM (Xie et al. 2019), the attacks built to transfer to other models."""

import functools

import jax
import jax.numpy as jnp

from jaxrobust import checks
from jaxrobust.attacks import core, losses
from jaxrobust.attacks.attack import Attack, AttackFn, factory, make


@factory("mi_fgsm")
def mi_fgsm(
  *,
  eps: float,
  steps: int = 10,
  step_size: float | None = None,
  decay: float = 1.0,
  norm: str = "linf",
  targeted: bool = False,
  unroll: bool = False,
) -> Attack:
  """The momentum iterative fast gradient sign method (MI-FGSM).

  Threat model: x_adv = x + d with ||d||_p <= eps (p = inf or 2) and x_adv in
  [0, 1]. From d = 0 and g = 0, each step accumulates the L1-normalised
  gradient of the objective J(d) in a momentum g and steps along it:

    g <- decay * g + grad / ||grad||_1,  grad = dJ/dd,
    d <- clip_box(proj_eps(d + step_size * u)),

  u = sign(g) for L-infinity and g / ||g||_2 for L2, with J(d) = CE(z(x + d),
  y), the cross-entropy -log softmax(z)_y of the logits z = logits_fn(x + d)
  (untargeted: away from the true class y), or J(d) = -CE(z(x + d), y)
  (`targeted`: towards the target class y, the targeted MI-FGSM of the
  paper). With decay = 0 this is iterated FGSM (`pgd` without random start).

  Args:
    eps: radius of the ball, > 0.
    steps: gradient steps, >= 1.
    step_size: step length; default eps / steps (the paper's alpha = eps / T).
    decay: momentum decay factor mu, >= 0 (the paper uses 1).
    norm: "linf" or "l2".
    targeted: y is the class to reach (descend its cross-entropy), not the
      true class to leave.
    unroll: loop form: a `lax.fori_loop` (default, every backend), or
      unrolled (True); see `core.iterate`.

  Returns:
    An `Attack`, `attack(logits_fn, x, y, key, eps=None) -> x_adv`.

  References:
    Dong et al., 2018, "Boosting adversarial attacks with momentum".
  """
  return make(_momentum_attack("mi_fgsm", **locals()))


@factory("di_fgsm")
def di_fgsm(
  *,
  eps: float,
  steps: int = 10,
  step_size: float | None = None,
  decay: float = 1.0,
  prob: float = 0.5,
  resize_rate: float = 0.9,
  norm: str = "linf",
  targeted: bool = False,
  unroll: bool = False,
) -> Attack:
  """M-DI2-FGSM: `mi_fgsm` with every gradient taken through a random resize.

  The random input transformation T is drawn afresh for each step and
  example:

    g <- decay * g + grad / ||grad||_1,  grad = d/dd J(T(x + d)),

  J = CE(logits_fn(.), y) (untargeted) or -CE(logits_fn(.), y) (`targeted`,
  y the target class), T = `random_resize_and_pad` with probability `prob`,
  else the identity. The threat model, the step and its defaults are those
  of `mi_fgsm`; the returned x_adv is untransformed. With prob = 0 (or
  resize_rate = 1) it is `mi_fgsm`.

  Args:
    eps, steps, step_size, decay, norm, targeted, unroll: as in `mi_fgsm`.
    prob: probability of transforming the input at each step, in [0, 1].
    resize_rate: the smallest shrink factor, in (0, 1].

  Returns:
    An `Attack`, `attack(logits_fn, x, y, key, eps=None) -> x_adv`, for
    images x [B, H, W, C].

  References:
    Xie et al., 2019, "Improving transferability of adversarial examples with
    input diversity".
  """
  return make(_momentum_attack("di_fgsm", **locals()))


def random_resize_and_pad(
  draws: jax.Array, image: jax.Array, *, prob: float, resize_rate: float
) -> jax.Array:
  """DI's input transformation of one image [H, W, C], with static shapes.

  With probability `prob`: shrink the image by a factor s ~ U[resize_rate, 1)
  (nearest neighbour) and place it at an offset uniform in [0, (1 - s) H] x
  [0, (1 - s) W] on a zero canvas of the input's size; else return it as is.
  `draws` are 4 numbers uniform in [0, 1) that decide it (whether, s and the
  offset). Written as products with 0/1 selection matrices (exact: one nonzero
  term per pixel), so it vmaps and its gradient needs no scatter.
  """
  scale = resize_rate + (1.0 - resize_rate) * draws[1]
  offset = draws[2:] * (1.0 - scale) * jnp.array(image.shape[:2], draws.dtype)

  def selection(n, start):
    """[n, n]: row i picks the input row (column) output row i shows, if any."""
    source = jnp.floor((jnp.arange(n) + 0.5 - start) / scale).astype(jnp.int32)
    return jax.nn.one_hot(source, n, dtype=image.dtype)  # zero rows outside [0, n)

  resized = jnp.einsum(
    "hi,wj,ijc->hwc",
    selection(image.shape[0], offset[0]),
    selection(image.shape[1], offset[1]),
    image,
    precision=jax.lax.Precision.HIGHEST,
  )
  return jnp.where(draws[0] < prob, resized, image)


def _momentum_attack(
  name, *, eps, steps, step_size, decay, norm, targeted, unroll, prob=None, resize_rate=None
) -> AttackFn:
  """The attack function of `mi_fgsm` and (with `prob`, `resize_rate`) `di_fgsm`."""
  transform = None
  if prob is not None:
    checks.in_interval("prob", prob, 0.0, 1.0)
    checks.in_interval("resize_rate", resize_rate, 0.0, 1.0, closed=(False, True))
    transform = functools.partial(random_resize_and_pad, prob=prob, resize_rate=resize_rate)
  norm = core.check_norm(norm)
  core.check_eps(eps)
  checks.integer_at_least("steps", steps, 1)
  checks.non_negative("decay", decay)
  core.check_step_size(step_size)
  checks.require(isinstance(targeted, bool), f"targeted must be True or False, got {targeted!r}")
  sign = -1.0 if targeted else 1.0

  def attack_one(logits_one, x, y, key, eps):
    alpha = core.default_step_size(name, eps, steps) if step_size is None else step_size

    # Every step's random draws at once: a loop of per-step PRNG calls compiles slowly.
    draws = jax.random.uniform(key, (steps, 4))

    def loss(delta, step_draws):
      x_adv = x + delta if transform is None else transform(step_draws, x + delta)
      return sign * losses.cross_entropy(logits_one(x_adv), y)

    gradient = core.canonical_convolutions(jax.grad(loss))

    def step(i, state):
      delta, momentum = state
      grad = gradient(delta, draws[i])
      momentum = decay * momentum + grad / jnp.maximum(jnp.sum(jnp.abs(grad)), 1e-12)
      delta = delta + alpha * core.steepest_ascent(momentum, norm)
      return core.clip_to_box(x, core.project(delta, eps, norm)), momentum

    zeros = jnp.zeros_like(x)
    delta, _ = core.iterate(step, (zeros, zeros), steps, unroll)
    return x + delta

  def attack(logits_fn, x, y, key, eps):
    if transform is not None:
      checks.require(
        jnp.ndim(x) == 4,
        f"di_fgsm needs images [batch, height, width, channels], got shape {tuple(jnp.shape(x))}",
      )
    return core.batched(attack_one, logits_fn, x, y, key, core.check_eps(eps))

  return attack
