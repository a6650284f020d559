"""The Carlini-Wagner L2 attack (Carlini & Wagner 2017, "Towards evaluating the
robustness of neural networks")."""

import jax
import jax.numpy as jnp
import optax

from jaxrobust import checks
from jaxrobust.attacks import core, losses
from jaxrobust.attacks.attack import Attack, factory, make

_NO_UPPER_BOUND = 1e10  # the paper's code: bisect only once a constant succeeded
SCHEDULES = ("warmup_cosine", "constant")
WARMUP_FRACTION = 0.1
# The default learning rate is REACH / steps: the paper's 0.01 at its 1000 steps.
REACH = 10.0
# Adam's momentum decay: the paper's (optax's default) with the constant rate,
# a shorter memory with the default schedule.
ADAM_B1 = {"constant": 0.9, "warmup_cosine": 0.5}


@factory("cw_l2")
def cw_l2(
  *,
  steps: int = 1000,
  binary_search_steps: int = 9,
  c: float = 1e-3,
  kappa: float = 0.0,
  lr: float | None = None,
  schedule: str = "warmup_cosine",
  overshoot: float = 1e-3,
  targeted: bool = False,
  eps: float | None = None,
  norm: str = "l2",
) -> Attack:
  """Carlini & Wagner's L2 attack: the closest adversarial example it can find.

  Per example it minimises over w, with x' = (tanh(w) + 1) / 2 in the box,

    ||x' - x||_2^2 + c * max(g(x'), -kappa - a),
    g(x') = Z_y - max_{i != y} Z_i      (untargeted),
    g(x') = max_{i != t} Z_i - Z_t      (targeted, y = t),

  Z the logits and a = `overshoot` |m(x)| (m(x) the clean margin), with
  `steps` of Adam from x' = x. A binary search over c, per example, runs
  `binary_search_steps` such minimisations: c is multiplied by 10 until a
  run succeeds (its last iterate has g(x') < -kappa - a / 2; any iterate,
  with the constant rate), then bisected between the largest failing and the
  smallest succeeding c (the defaults' reasons: docs/attacks.md).

  Threat model: any x_adv in [0, 1] (report the distances), or with `eps`
  the L2 ball: an example whose closest adversarial found lies farther than
  eps is returned as x, so accuracy under the attack is accuracy in the ball.

  Args:
    steps: Adam steps per binary-search step, >= 1.
    binary_search_steps: values of c tried per example, >= 1.
    c: the initial constant, > 0.
    kappa: the confidence margin, >= 0.
    lr: Adam's (largest) learning rate, > 0; default 10 / steps.
    schedule: "warmup_cosine" or "constant" (the paper's, beta1 = 0.9).
    overshoot: a, as a fraction of the clean margin, >= 0 (the paper: 0).
    targeted: y is the target class instead of the true one.
    eps: optional L2 radius, > 0 (None: unbounded).
    norm: "l2", the only norm.

  Returns:
    An `Attack`, `attack(logits_fn, x, y, key, eps=None) -> x_adv`: per
    example the successful iterate of smallest L2 distance over all runs (within
    eps, if set), or x. The key is unused (the attack is deterministic).

  References:
    Carlini & Wagner, 2017, "Towards evaluating the robustness of neural
    networks".
  """
  steps = checks.integer_at_least("steps", steps, 1)
  search_steps = checks.integer_at_least("binary_search_steps", binary_search_steps, 1)
  checks.positive("c", c)
  checks.non_negative("kappa", kappa)
  if eps is not None:
    core.check_eps(eps)
  checks.one_of("schedule", schedule, SCHEDULES)
  checks.non_negative("overshoot", overshoot)
  checks.require(isinstance(targeted, bool), f"targeted must be True or False, got {targeted!r}")
  checks.require(
    core.check_norm(norm) == "l2", f"cw_l2 attacks in the L2 norm only, got norm={norm!r}"
  )
  search = _binary_search(
    _optimizer(steps, lr, schedule), steps, search_steps, c, kappa, overshoot, targeted, schedule
  )

  def attack_one(logits_one, x, y, key, eps):
    del key
    best_distance, best = search(logits_one, x, y)
    return best if eps is None else jnp.where(best_distance <= eps**2, best, x)

  def attack(logits_fn, x, y, key, eps):
    if eps is None:
      return core.batched(lambda *a: attack_one(*a, None), logits_fn, x, y, key)
    return core.batched(attack_one, logits_fn, x, y, key, core.check_eps(eps))

  return make(attack)


def _optimizer(steps, lr, schedule):
  """Adam at the peak rate `lr` (default `REACH` / steps), constant or warm-up-cosine."""
  peak = REACH / steps if lr is None else checks.positive("lr", lr)
  if schedule == "constant":
    rate = peak
  else:
    rate = optax.warmup_cosine_decay_schedule(
      0.0, peak, max(int(WARMUP_FRACTION * steps), 1), max(steps, 2)
    )
  return optax.adam(rate, b1=ADAM_B1[schedule])


def _binary_search(optimizer, steps, search_steps, c, kappa, overshoot, targeted, schedule):
  """`(logits_one, x, y) -> (best squared distance, best x')` of one example."""
  # Whether a run's iterates converge: then its last iterate says whether c suffices.
  converges = schedule != "constant"

  def search(logits_one, x, y):
    w0 = jnp.arctanh(jnp.clip(2.0 * x - 1.0, -1.0 + 1e-6, 1.0 - 1e-6))
    aim = overshoot * jnp.abs(losses.margin(logits_one(x), y))

    def objective(w, const):
      x_adv = (jnp.tanh(w) + 1.0) / 2.0
      margin = losses.margin(logits_one(x_adv), y)  # max_{i != y} Z_i - Z_y
      g = margin if targeted else -margin
      distance = jnp.sum(jnp.square(x_adv - x))
      success = g < -kappa - aim / 2
      return distance + const * jnp.maximum(g, -kappa - aim), (x_adv, distance, success)

    gradient = core.canonical_convolutions(jax.grad(objective, has_aux=True))

    def adam_step(const, inner):
      w, opt_state, best_distance, best, succeeded = inner
      grad, (x_adv, distance, success) = gradient(w, const)
      closer = success & (distance < best_distance)
      updates, opt_state = optimizer.update(grad, opt_state)
      return (
        w + updates,
        opt_state,
        jnp.where(closer, distance, best_distance),
        jnp.where(closer, x_adv, best),
        success if converges else succeeded | success,
      )

    def search_step(_, state):
      const, lower, upper, best_distance, best = state
      inner = (w0, optimizer.init(w0), best_distance, best, jnp.array(False))
      step = lambda _, inner: adam_step(const, inner)
      _, _, best_distance, best, succeeded = core.loop(0, steps, step, inner, like=x)
      upper = jnp.where(succeeded, jnp.minimum(upper, const), upper)
      lower = jnp.where(succeeded, lower, jnp.maximum(lower, const))
      const = jnp.where(upper < _NO_UPPER_BOUND, (lower + upper) / 2, const * 10)
      return const, lower, upper, best_distance, best

    state = (
      jnp.asarray(c, x.dtype),
      jnp.zeros((), x.dtype),
      jnp.asarray(_NO_UPPER_BOUND, x.dtype),
      jnp.asarray(jnp.inf, x.dtype),
      x,
    )
    return core.loop(0, search_steps, search_step, state, like=x)[-2:]

  return search
