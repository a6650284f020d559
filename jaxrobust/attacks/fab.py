"""The fast adaptive boundary attack, FAB and its targeted version FAB-T
(Croce & Hein 2020, "Minimally distorted adversarial examples with a fast
adaptive boundary attack"), as AutoAttack runs them."""

import functools

import jax
import jax.numpy as jnp

from jaxrobust import checks
from jaxrobust.attacks import core
from jaxrobust.attacks.attack import Attack, factory, make
from jaxrobust.attacks.hyperplane import project_onto_hyperplane

_EXCLUDED = 1e10  # the distance of the true class's own "boundary"


@factory("fab")
def fab(
  *,
  norm: str = "linf",
  eps: float | None = None,
  steps: int = 100,
  restarts: int = 1,
  alpha_max: float = 0.1,
  eta: float = 1.05,
  beta: float = 0.9,
) -> Attack:
  """FAB: the closest adversarial example it can find, in L-infinity, L2 or L1.

  Per example, from x^(0) = x (restart r > 0: a random point at distance
  eps / 2, as in the authors' code, a uniform (L-inf) or Gaussian (L2, L1)
  vector scaled to that length and clipped to the box; without eps, half
  the distance of the closest adversarial found so far), each step
  linearises the decision boundaries f_j(z) = z_j - z_y of every class
  j != y at the iterate x^(k), takes the closest one,
  j* = argmin_j |f_j| / ||grad f_j||_q (q the dual norm: L1, L2, L-inf for
  L-inf, L2, L1), and projects both the iterate and the original point onto its
  hyperplane {z : f_j*(x^(k)) + grad f_j*(x^(k)) . (z - x^(k)) = 0}
  intersected with the box [0, 1]^d (`project_onto_hyperplane`): steps d_k
  and d_0. With a_k = ||d_k||_p, a_0 = ||d_0||_p and
  alpha = min(a_k / (a_k + a_0), alpha_max), the next iterate is the
  extrapolated convex combination

    x^(k+1) = clip((1 - alpha) (x^(k) + eta d_k) + alpha (x + eta d_0), 0, 1).

  When x^(k+1) is misclassified it is recorded if it is the closest so far,
  and the search steps back towards x: x^(k+1) <- x + beta (x^(k+1) - x).
  Each step costs the Jacobian of the logits (K gradients) and one forward
  pass; `fab_t` needs one gradient instead of K.

  Threat model: with `eps`, success only within the ball; an example whose
  closest adversarial found lies farther than eps is returned as x (so
  accuracy under the attack is accuracy within the ball). Without `eps`,
  FAB is a minimal-norm attack: report the distances.

  Args:
    norm: "linf", "l2" or "l1".
    eps: radius of the ball, > 0, or None.
    steps: iterations per restart, >= 1.
    restarts: runs per example, >= 1.
    alpha_max: the largest weight of the original point, in [0, 1].
    eta: overshoot of the projections, >= 1.
    beta: backward step after a success, in [0, 1].

  Returns:
    An `Attack`, `attack(logits_fn, x, y, key, eps=None) -> x_adv`: per
    example the closest misclassified point found (within eps, if set), or x.
  """
  return _fab(**locals())


@factory("fab_t")
def fab_t(
  *,
  norm: str = "linf",
  eps: float | None = None,
  steps: int = 100,
  num_targets: int = 9,
  first_target: int = 0,
  restarts: int = 1,
  alpha_max: float = 0.1,
  eta: float = 1.05,
  beta: float = 0.9,
) -> Attack:
  """FAB-T: FAB towards one target class at a time, as in AutoAttack ("fab-t").

  y is the true label. For each target t among the `num_targets` classes
  with the highest clean logits other than y (fewer when there are fewer
  classes), FAB (`fab`'s step, with `restarts` runs) follows the single
  boundary f(z) = z_t - z_y instead of the closest of all, so each step
  costs one gradient. A point counts when it is misclassified (any class),
  and the closest over all targets is returned. AutoAttack stops at the
  first target that succeeds within eps; the closest over all targets
  succeeds within eps exactly when some target does, so robust accuracy is
  the same. The targets are a `lax.fori_loop` (one target's program); the
  i-th runs with the key `fold_in(k, i)`. With eps, the targets are also
  the attack's rounds (`Attack.round_fn`, round m the m-th target with key
  `fold_in(k, m)`), so an evaluation runs each target only on the examples
  the targets before it left robust, as AutoAttack does.

  Args:
    norm, eps, steps, restarts, alpha_max, eta, beta: as in `fab`.
    num_targets: target classes per example, >= 1 (AutoAttack: 9).
    first_target: the rank of the first target among the classes other than
      y ordered by clean logit, >= 0 (0: the most likely).

  Returns:
    An `Attack`, as `fab`'s.
  """
  checks.integer_at_least("num_targets", num_targets, 1)
  checks.integer_at_least("first_target", first_target, 0)
  return _fab(**locals())


def _fab(
  *, norm, eps, steps, restarts, alpha_max, eta, beta, num_targets=None, first_target=0
) -> Attack:
  """The `Attack` of `fab` (`num_targets` None) and `fab_t`."""
  norm = core.check_norm(norm, ("linf", "l2", "l1"))
  if eps is not None:
    core.check_eps(eps)
  steps = checks.integer_at_least("steps", steps, 1)
  restarts = checks.integer_at_least("restarts", restarts, 1)
  checks.in_interval("alpha_max", alpha_max, 0.0, 1.0)
  checks.require(
    isinstance(eta, (int, float)) and eta >= 1.0, f"eta must be a number >= 1, got {eta!r}"
  )
  checks.in_interval("beta", beta, 0.0, 1.0)
  search = functools.partial(
    _closest_over_restarts,
    norm=norm,
    restarts=restarts,
    steps=steps,
    alpha_max=alpha_max,
    eta=eta,
    beta=beta,
  )
  name = "fab" if num_targets is None else "fab_t"

  def attack_one(logits_one, x, y, key, eps, round_=None):
    if num_targets is None:
      best, distance = search(_all_boundaries(logits_one, y), logits_one, x, y, key, eps)
    elif round_ is None:
      best, distance = _over_targets(search, logits_one, x, y, key, eps, num_targets, first_target)
    else:
      best, distance = _one_target(
        search, logits_one, x, y, key, eps, round_, num_targets, first_target
      )
    inside = jnp.isfinite(distance) if eps is None else distance <= eps
    return jnp.where(inside, best, x)

  def batched(one, logits_fn, x, y, key, eps):
    num_classes = core.check_batch(logits_fn, x, y)
    checks.require(num_classes >= 2, f"{name} needs >= 2 classes, the model has {num_classes}")
    if eps is None:
      return core.batched(lambda *a: one(*a, None), logits_fn, x, y, key)
    return core.batched(one, logits_fn, x, y, key, core.check_eps(eps))

  def attack(logits_fn, x, y, key, eps):
    return batched(attack_one, logits_fn, x, y, key, eps)

  def round_fn(logits_fn, x, y, key, eps, round_):
    one = lambda logits_one, xi, yi, ki, e: attack_one(logits_one, xi, yi, ki, e, round_)
    return batched(one, logits_fn, x, y, key, eps)

  rounded = num_targets is not None and num_targets > 1 and eps is not None
  return make(attack, rounds=num_targets if rounded else 0, round_fn=round_fn if rounded else None)


def _closest_over_restarts(boundaries, logits_one, x, y, key, eps, *, norm, restarts, **step):
  """The closest success over the restarts for one set of boundaries, and its distance."""
  logits_at = core.canonical_convolutions(logits_one)

  def restart(r, best):
    key_r = jax.random.fold_in(key, r)
    return _search(boundaries, logits_at, x, y, key_r, r, best, eps, norm, **step)

  start = (x, jnp.asarray(jnp.inf, x.dtype))
  return core.loop(0, restarts, restart, start, like=x)


def _ranked(logits_one, x, y):
  """The classes other than y by clean logit, y last (as -inf), and their count."""
  clean = logits_one(x)
  return jnp.where(jnp.arange(clean.shape[-1]) == y, -jnp.inf, clean), clean.shape[-1] - 1


def _over_targets(search, logits_one, x, y, key, eps, num_targets, first_target):
  """FAB-T: the closest success over the targets of rank first_target, ...;
  target i with the key fold_in(key, i)."""
  ranked, others = _ranked(logits_one, x, y)
  count = max(0, min(num_targets, others - first_target))
  start = (x, jnp.asarray(jnp.inf, x.dtype))
  if count == 0:  # no class of this rank
    return start
  targets = jax.lax.top_k(ranked, first_target + count)[1][first_target:]

  def for_target(i, best):
    boundary = _target_boundary(logits_one, y, targets[i])
    found = search(boundary, logits_one, x, y, jax.random.fold_in(key, i), eps)
    return jax.tree.map(lambda f, b: jnp.where(found[1] < best[1], f, b), found, best)

  return core.loop(0, count, for_target, start, like=x)


def _one_target(search, logits_one, x, y, key, eps, round_, num_targets, first_target):
  """FAB-T's round `round_` alone: the target of rank first_target + round_."""
  ranked, others = _ranked(logits_one, x, y)
  rank = first_target + round_
  target = jax.lax.top_k(ranked, others)[1][jnp.minimum(rank, others - 1)]
  best, distance = search(_target_boundary(logits_one, y, target), logits_one, x, y, key, eps)
  return best, jnp.where(rank < min(others, first_target + num_targets), distance, jnp.inf)


def _all_boundaries(logits_one, y):
  """z -> (f [K], grad f [K, ...]): f_j(z) = z_j - z_y, and f_y = 1e10 (never
  the closest)."""

  def with_logits(z):
    logits = logits_one(z)
    return logits, logits

  # The Jacobian and the logits from one forward pass.
  jacobian = core.canonical_convolutions(jax.jacrev(with_logits, has_aux=True))

  def boundaries(z):
    grads, logits = jacobian(z)
    f = logits - logits[y]
    f = jnp.where(jnp.arange(f.shape[0]) == y, _EXCLUDED, f)
    return f, grads - grads[y]

  return boundaries


def _target_boundary(logits_one, y, target):
  """z -> (f [1], grad f [1, ...]) of f(z) = z_t - z_y."""

  def f(z):
    logits = logits_one(z)
    return logits[target] - logits[y]

  value_and_grad = core.canonical_convolutions(jax.value_and_grad(f))

  def boundary(z):
    f, g = value_and_grad(z)
    return f[None], g[None]

  return boundary


def _norm(v, norm):
  if norm == "linf":
    return jnp.max(jnp.abs(v))
  return jnp.sum(jnp.abs(v)) if norm == "l1" else core.l2_norm(v)


def _dual_norm(v, norm):
  """The norm of gradients whose distances are measured in `norm`: L1 for
  L-inf, L2 for L2, L-inf for L1."""
  return _norm(v, {"linf": "l1", "l2": "l2", "l1": "linf"}[norm])


def _random_start(key, x, radius, norm):
  """x plus a random vector of `norm` length `radius`, clipped to the box: a
  uniform vector in [-1, 1]^d (L-inf) or a Gaussian one (L2, L1), scaled."""
  if norm == "linf":
    u = jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0)
  else:
    u = jax.random.normal(key, x.shape, x.dtype)
  return jnp.clip(x + radius * u / jnp.maximum(_norm(u, norm), 1e-12), 0.0, 1.0)


def _search(
  boundaries, logits_at, x, y, key, restart, best, eps, norm, *, steps, alpha_max, eta, beta
):
  """One FAB run (restart number `restart`) updating `best`, the closest
  success so far and its distance."""
  # Restarts after the first start at a random point at half the radius.
  radius = 0.5 * (best[1] if eps is None else jnp.minimum(best[1], eps))
  radius = jnp.where((restart > 0) & jnp.isfinite(radius), radius, 0.0)
  start = _random_start(key, x, radius, norm)

  def step(_, state):
    point, best, distance = state
    f, g = boundaries(point)
    closest = jnp.argmin(jnp.abs(f) / (jax.vmap(_dual_norm, (0, None))(g, norm) + 1e-12))
    w = g[closest]
    b = jnp.vdot(w, point) - f[closest]  # the hyperplane w . z = b
    d_point = project_onto_hyperplane(point, w, b, norm)
    d_origin = project_onto_hyperplane(x, w, b, norm)
    a_point = jnp.maximum(_norm(d_point, norm), 1e-8)
    a_origin = jnp.maximum(_norm(d_origin, norm), 1e-8)
    alpha = jnp.clip(a_point / (a_point + a_origin), 0.0, alpha_max)
    point = jnp.clip((1 - alpha) * (point + eta * d_point) + alpha * (x + eta * d_origin), 0.0, 1.0)
    adversarial = jnp.argmax(logits_at(point)) != y
    found = _norm(point - x, norm)
    closer = adversarial & (found < distance)
    best = jnp.where(closer, point, best)
    distance = jnp.where(closer, found, distance)
    point = jnp.where(adversarial, x + beta * (point - x), point)
    return point, best, distance

  _, best_point, distance = core.loop(0, steps, step, (start, *best), like=x)
  return best_point, distance
