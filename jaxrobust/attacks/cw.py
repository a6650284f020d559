"""The Carlini-Wagner L2 attack (Carlini & Wagner 2017, "Towards evaluating the
robustness of neural networks")."""

import jax
import jax.numpy as jnp
import optax

from jaxrobust import checks
from jaxrobust.attacks import core, losses
from jaxrobust.attacks.attack import Attack, make

_NO_UPPER_BOUND = 1e10  # the paper's code: bisect only once a constant succeeded
SCHEDULES = ("warmup_cosine", "constant")
WARMUP_FRACTION = 0.1
# The default learning rate is REACH / steps: the paper's 0.01 at its 1000 steps.
REACH = 10.0
# Adam's momentum decay: the paper's (optax's default) with the constant rate,
# a shorter memory with the default schedule.
ADAM_B1 = {"constant": 0.9, "warmup_cosine": 0.5}


def cw_l2(
  *,
  steps=1000,
  binary_search_steps=9,
  c=1e-3,
  kappa=0.0,
  lr=None,
  schedule="warmup_cosine",
  overshoot=1e-3,
  targeted=False,
  eps=None,
  norm="l2",
) -> Attack:
  """Carlini & Wagner's L2 attack: the closest adversarial example it can find.

  Threat model: any x_adv in [0, 1] (no eps, unless `eps` is set); the attack
  minimises the L2 distance, so report the distances (or accuracy, the
  fraction it failed on).
  Per example it minimises over w, with x' = (tanh(w) + 1) / 2 in the box,

    ||x' - x||_2^2 + c * g(x'),
    g(x') = max(Z_y - max_{i != y} Z_i, -kappa)      (untargeted),
    g(x') = max(max_{i != t} Z_i - Z_t, -kappa)      (targeted, y = t),

  Z the logits, with `steps` of Adam from x' = x. A binary search over c, per
  example, runs `binary_search_steps` such minimisations (each from x' = x
  with a fresh Adam state): c is multiplied by 10 until a run succeeds, then
  bisected between the largest failing and the smallest succeeding c. An
  iterate succeeds when g(x') < -kappa, i.e. the margin exceeds kappa
  (kappa = 0: misclassified; targeted: classified as t). A run succeeds
  when its last iterate does (the default schedule, whose iterates converge
  to the minimiser for this c), or when any iterate does (the paper's
  constant rate, whose iterates oscillate). The attack returns the closest
  successful iterate of all runs.

  The learning rate. Adam normalises the gradient, so each step moves every
  coordinate of w by up to about the rate, whatever c: a run of `steps`
  steps at rate lr moves w by at most about lr * steps per coordinate. The
  default

    lr = 10 / steps

  is the paper's 0.01 at its 1000 steps and keeps that reach at any step
  count. At a fixed rate a short run reaches less far: 0.01 for 20 steps
  can move no pixel at 0 or 1 (w starts at +-arctanh(1 - 1e-6) = +-7.25
  there, and x' changes only once |w| has fallen) and most examples not
  across the boundary at all.

  The schedule. The paper's Adam (optax's defaults, momentum decay beta1 =
  0.9) runs at a constant rate (`schedule="constant"`, `overshoot=0`: the
  paper's algorithm). It does not converge: its first step moves every
  coordinate by about the rate, which crosses the boundary of a nearby
  example at once, and its iterates then oscillate across the boundary with
  that amplitude, so the closest success can lie well beyond the closest
  point. The default `schedule="warmup_cosine"` raises the rate linearly
  from 0 over the first 10 % of the steps and decays it to 0 with a cosine,
  with beta1 = 0.5 (a momentum over about 2 steps, not 10, so a run of 20
  steps settles), so the iterates converge; and `overshoot` puts the kink
  of the hinge at -kappa - overshoot |m(x)| (m(x) the clean margin) and
  counts an iterate only past -kappa - overshoot |m(x)| / 2: the converged
  point lies just past the boundary (by 0.05 % of the distance for a
  linear model at the default 1e-3), so its success does not depend on
  float rounding (a point on the boundary is classified either way by the
  same model in another batch). Runs of fewer than about 20 steps end
  before they settle: their successes lie beyond the closest point.

  With `eps`, the threat model becomes the L2 ball of radius eps: an example
  whose closest adversarial found lies farther than eps is returned as x, so
  that accuracy under the attack is accuracy within the ball, comparable with
  PGD-L2 at the same eps (and an evaluation's worst case stays meaningful).

  Loop form: both loops are `lax.fori_loop`s on every backend, so compiling
  costs one step whatever `steps`; the gradients go through
  `core.canonical_convolutions`, which lets XLA:CPU run them inside the loop
  at full speed (see `core.iterate`).

  Args:
    steps: Adam steps per binary-search step, >= 1.
    binary_search_steps: values of c tried per example, >= 1.
    c: the initial constant, > 0.
    kappa: the confidence margin, >= 0.
    lr: Adam's (largest) learning rate, > 0; default 10 / steps (see above).
    schedule: "warmup_cosine" (default) or "constant" (the paper's).
    overshoot: how far past the margin -kappa the iterates aim, as a
      fraction of the clean margin, >= 0 (0: on it, as in the paper).
    targeted: y is the target class instead of the true one.
    eps: optional L2 radius, > 0 (None: unbounded).
    norm: "l2", the only norm (the attack's threat model, as its `spec`
      records it).

  Returns:
    An `Attack`, `attack(logits_fn, x, y, key, eps=None) -> x_adv`: per
    example the successful iterate of smallest L2 distance over all runs, or x
    itself where none succeeded (or, with `eps`, none succeeded within
    distance eps). The key is unused (the attack is deterministic).
  """
  steps = checks.integer_at_least("steps", steps, 1)
  search_steps = checks.integer_at_least("binary_search_steps", binary_search_steps, 1)
  checks.positive("c", c)
  checks.non_negative("kappa", kappa)
  peak = REACH / steps if lr is None else checks.positive("lr", lr)
  if eps is not None:
    core.check_eps(eps)
  checks.one_of("schedule", schedule, SCHEDULES)
  checks.non_negative("overshoot", overshoot)
  checks.require(isinstance(targeted, bool), f"targeted must be True or False, got {targeted!r}")
  checks.require(
    core.check_norm(norm) == "l2", f"cw_l2 attacks in the L2 norm only, got norm={norm!r}"
  )
  # Whether a run's iterates converge: then its last iterate says whether c suffices.
  converges = schedule != "constant"
  if schedule == "constant":
    rate = peak
  else:
    rate = optax.warmup_cosine_decay_schedule(
      0.0, peak, max(int(WARMUP_FRACTION * steps), 1), max(steps, 2)
    )
  optimizer = optax.adam(rate, b1=ADAM_B1[schedule])

  def attack_one(logits_one, x, y, key, eps):
    del key
    w0 = jnp.arctanh(jnp.clip(2.0 * x - 1.0, -1.0 + 1e-6, 1.0 - 1e-6))
    aim = overshoot * jnp.abs(losses.margin(logits_one(x), y))

    def objective(w, const):
      x_adv = (jnp.tanh(w) + 1.0) / 2.0
      logits = logits_one(x_adv)
      margin = losses.margin(logits, y)  # max_{i != y} Z_i - Z_y
      g = margin if targeted else -margin
      distance = jnp.sum(jnp.square(x_adv - x))
      return distance + const * jnp.maximum(g, -kappa - aim), (
        x_adv,
        distance,
        g < -kappa - aim / 2,
      )

    gradient = core.canonical_convolutions(jax.grad(objective, has_aux=True))

    def search_step(_, state):
      const, lower, upper, best_distance, best = state

      def adam_step(_, inner):
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

      inner = (w0, optimizer.init(w0), best_distance, best, jnp.array(False))
      _, _, best_distance, best, succeeded = core.loop(0, steps, adam_step, inner, like=x)
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
    best_distance, best = core.loop(0, search_steps, search_step, state, like=x)[-2:]
    if eps is None:
      return best
    return jnp.where(best_distance <= eps**2, best, x)

  def attack(logits_fn, x, y, key, eps):
    if eps is None:
      return core.batched(lambda *a: attack_one(*a, None), logits_fn, x, y, key)
    return core.batched(attack_one, logits_fn, x, y, key, core.check_eps(eps))

  return make(
    attack,
    "cw_l2",
    norm="l2",
    eps=eps,
    targeted=targeted,
    steps=steps,
    binary_search_steps=binary_search_steps,
    c=c,
    kappa=kappa,
    lr=lr,
    schedule=schedule,
    overshoot=overshoot,
  )
