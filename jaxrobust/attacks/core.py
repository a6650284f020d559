"""The pieces every attack is built from.

An attack is a pure function `attack(logits_fn, x, y, key) -> x_adv` on a batch
`x` of shape [B, ...] in [0, 1]. Attacks are written for one example and
batched with `jax.vmap` (`batched`); `logits_fn` is always called on a batch,
so the per-example code calls it on `x[None]`.

Threat models: the L-infinity ball {d : max_i |d_i| <= eps}, the L2 ball
{d : ||d||_2 <= eps} and the L1 ball {d : sum_i |d_i| <= eps} around x,
intersected with the image box x + d in [0, 1].
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxrobust import checks
from jaxrobust import keys as keys_lib
from jaxrobust.attacks.attack import norm_name

# Every attack's gradients go through the CPU fast path (`jaxrobust.fastpath`;
# the identity off CPU).
from jaxrobust.fastpath import canonical_convolutions, fast  # noqa: F401

_TINY = 1e-12
T = TypeVar("T")
# A run's (delta, value, success) for one example.
Result = tuple[jax.Array, jax.Array, jax.Array]


_NORM_CHOICES = {
  "linf": "'linf' (also 'Linf', 'inf', np.inf)",
  "l2": "'l2' (also 'L2', 2)",
  "l1": "'l1' (also 'L1', 1)",
}


def check_norm(norm: Any, norms: Sequence[str] = ("linf", "l2")) -> str:
  """The norm's canonical name (`attack.norm_name`) if it is one of `norms`.

  Args:
    norm: a norm, as `attack.norm_name` reads it.
    norms: the norms the attack supports (most: "linf" and "l2").

  Returns:
    "linf", "l2" or "l1"; raises `InputError` for another norm.
  """
  try:
    name = norm_name(norm)
  except checks.InputError:
    name = None
  checks.require(
    name in norms,
    f"unknown norm {norm!r} for this attack; choose one of "
    + " or ".join(_NORM_CHOICES[n] for n in norms),
  )
  return str(name)


def check_eps(eps: Any, name: str = "eps") -> Any:
  """Validates eps: a number > 0, or an array of them (on the device when
  traced: `checks.on_device`)."""
  if jnp.ndim(eps) == 0 and checks.is_concrete(eps):
    return checks.positive(name, float(eps))
  if checks.is_concrete(eps):
    eps_np = np.asarray(eps)
    checks._eps_values(eps_np[~(eps_np > 0) | ~np.isfinite(eps_np)][:5], name)
  else:
    checks.on_device(eps=eps, eps_name=name)
  return eps


def check_eps_shape(eps: Any, batch_size: int) -> None:
  """Refuses an eps that is neither one number nor one per example."""
  checks.require(
    jnp.ndim(eps) == 0 or jnp.shape(eps) == (batch_size,),
    f"eps must be a number or one per example, shape ({batch_size},); got shape "
    f"{tuple(jnp.shape(eps))}",
  )


def check_step_size(step_size: float | None) -> float | None:
  """Validates an optional step size (None: the attack's default rule)."""
  return None if step_size is None else checks.positive("step_size", step_size)


# Each iterative attack's default step size / (eps / steps), as its paper sets it.
STEP_SIZE_FACTORS = {
  "pgd": 2.5,  # Madry et al. 2018: 2.5 eps / steps
  "fgsm": 1.0,  # Goodfellow et al. 2015: one step of eps
  "mi_fgsm": 1.0,  # Dong et al. 2018: eps / T
  "di_fgsm": 1.0,  # Xie et al. 2019: as MI-FGSM
}


def default_step_size(name: str, eps: Any, steps: int) -> Any:
  """The step size attack `name` uses when none is given: the factor of its
  paper (`STEP_SIZE_FACTORS`) times eps / steps. (APGD, FAB, Square and C&W
  adapt their steps themselves.)"""
  return STEP_SIZE_FACTORS[name] * eps / steps


def l2_norm(v: jax.Array) -> jax.Array:
  """||v||_2 over all its entries."""
  return jnp.sqrt(jnp.sum(jnp.square(v)))


def l1_norm(v: jax.Array) -> jax.Array:
  """||v||_1 over all its entries."""
  return jnp.sum(jnp.abs(v))


def project(delta: jax.Array, eps: Any, norm: str) -> jax.Array:
  """The nearest point of the `norm` ball of radius `eps` to `delta`."""
  if norm == "linf":
    return jnp.clip(delta, -eps, eps)
  if norm == "l1":
    return _l1_shrink(delta, eps, jnp.inf)
  return delta * jnp.minimum(1.0, eps / jnp.maximum(l2_norm(delta), _TINY))


def project_l1_box(x: jax.Array, delta: jax.Array, eps: Any) -> jax.Array:
  """The nearest point to `delta` (in L2) of the L1 ball of radius `eps`
  intersected with the box, {d : ||d||_1 <= eps, 0 <= x + d <= 1}: the
  L1 projection of Croce & Hein 2021 ("Mind the box: l1-APGD for sparse
  adversarial attacks on image classifiers"). With c_i = 1 - x_i where
  delta_i > 0 and x_i elsewhere (the room the box leaves in delta_i's
  direction),

    d_i = sign(delta_i) min(max(|delta_i| - lam, 0), c_i),

  lam >= 0 the smallest with ||d||_1 <= eps (found by bisection, to float
  resolution). x in [0, 1] puts 0 in the box, so this is the exact projection.
  """
  return _l1_shrink(delta, eps, jnp.where(delta > 0, 1.0 - x, x))


_BISECTIONS = 48  # halvings of [0, max |delta_i|]: past float32 resolution


def _l1_shrink(delta, eps, room):
  """sign(delta) min(max(|delta| - lam, 0), min(|delta|, room)), lam >= 0 the
  smallest that brings the L1 norm within eps (`project_l1_box`)."""
  size = jnp.abs(delta)
  cap = jnp.minimum(size, room)
  l1 = lambda lam: jnp.sum(jnp.clip(size - lam, 0.0, cap))

  def halve(_, bounds):
    low, high = bounds
    middle = (low + high) / 2
    over = l1(middle) > eps
    return jnp.where(over, middle, low), jnp.where(over, high, middle)

  start = (jnp.zeros((), size.dtype), jnp.max(size))
  _, lam = loop(0, _BISECTIONS, halve, start, like=delta)
  lam = jnp.where(l1(0.0) <= eps, 0.0, lam)
  return jnp.sign(delta) * jnp.clip(size - lam, 0.0, cap)


def clip_to_box(x: jax.Array, delta: jax.Array) -> jax.Array:
  """Shrinks `delta` coordinate-wise so that x + delta lies in [0, 1].

  Each coordinate moves towards 0, so the result stays in any L-p ball that
  `delta` was in.
  """
  return jnp.clip(x + delta, 0.0, 1.0) - x


def random_start(key: jax.Array, x: jax.Array, eps: Any, norm: str) -> jax.Array:
  """A point drawn uniformly from the `norm` ball of radius `eps`, clipped to the box.

  L2 and L1: a uniform direction on the unit sphere (a Gaussian, resp. a
  Laplace vector, over its norm) times eps * u^(1/d) (volume-uniform radius).
  """
  if norm == "linf":
    return clip_to_box(x, jax.random.uniform(key, x.shape, x.dtype, -eps, eps))
  direction_key, radius_key = jax.random.split(key)
  if norm == "l1":
    direction = jax.random.laplace(direction_key, x.shape, x.dtype)
    length = l1_norm(direction)
  else:
    direction = jax.random.normal(direction_key, x.shape, x.dtype)
    length = l2_norm(direction)
  radius = eps * jax.random.uniform(radius_key, (), x.dtype) ** (1.0 / x.size)
  return clip_to_box(x, direction * radius / jnp.maximum(length, _TINY))


def steepest_ascent(grad: jax.Array, norm: str) -> jax.Array:
  """The unit-norm direction of steepest ascent: sign(g) (L-inf), g / ||g||_2
  (L2), or sign(g_j) e_j at the first j of largest |g_j| (L1)."""
  if norm == "linf":
    return jnp.sign(grad)
  if norm == "l1":
    flat = grad.ravel()
    j = jnp.argmax(jnp.abs(flat))
    return jnp.zeros_like(flat).at[j].set(jnp.sign(flat[j])).reshape(grad.shape)
  return grad / jnp.maximum(l2_norm(grad), _TINY)


def best_of_restarts(run: Callable[[jax.Array], Result], key: jax.Array, restarts: int) -> Result:
  """The best of `restarts` runs: `run(fold_in(key, r))` for r = 0, 1, ...

  Each run returns (delta, value, success) for one example; the best
  succeeds if any run does, with the highest value among those that succeed
  (or among all). The restarts are a `lax.fori_loop`: the program holds one
  run whatever their number.
  """
  best = run(jax.random.fold_in(key, 0))
  if restarts == 1:
    return best

  def restart(r, best):
    candidate = run(jax.random.fold_in(key, r))
    return better(candidate, best)

  return loop(1, restarts, restart, best, like=best[0])


def better(candidate: Result, best: Result) -> Result:
  """Per example the better of two (delta, value, success) results: success
  first, then the higher value; ties keep `best`."""
  _, value, success = candidate
  _, best_value, best_success = best
  take = (success & ~best_success) | ((success == best_success) & (value > best_value))
  return jax.tree.map(lambda c, b: jnp.where(take, c, b), candidate, best)


def loop(lower: Any, upper: Any, body: Callable[[Any, T], T], init: T, *, like: jax.Array) -> T:
  """`lax.fori_loop(lower, upper, body, init)`, with every carry varying over
  the same devices as `like` (the example attacked).

  Inside `jax.shard_map` a loop refuses a carry that starts constant (e.g.
  a best distance of inf) and becomes data-dependent. Selecting each initial
  carry with a condition computed from `like` (both branches the carry
  itself, which XLA drops) types it like the data, for any mesh, so
  data-parallel steps keep JAX's check that catches a missing `pmean`.
  """
  return jax.lax.fori_loop(lower, upper, body, _varying_like(init, like))


def loop_until(
  done: Callable[[T], Any],
  lower: int,
  upper: int,
  body: Callable[[Any, T], T],
  init: T,
  *,
  like: jax.Array,
) -> T:
  """`loop(lower, upper, body, init, like=like)` that stops once `done(carry)`
  is true; `body` must leave a done carry unchanged, so the result is the
  full loop's. Under `vmap` (the attacks' per-example form) the batch's
  loop runs until every example is done, and a finished example's carry
  stays as it was: the cost falls when a whole batch (one device's share)
  finishes early."""
  _, carry = jax.lax.while_loop(
    lambda s: (s[0] < upper) & ~done(s[1]),
    lambda s: (s[0] + 1, body(s[0], s[1])),
    _varying_like((jnp.int32(lower), init), like),
  )
  return carry


def _varying_like(carry, like):
  """`carry` unchanged, typed as varying like `like` (see `loop`)."""
  flat = jnp.ravel(like)
  data_dependent = flat[0] == flat[0]
  return jax.tree.map(lambda c: jnp.where(data_dependent, c, c), carry)


def iterate(body: Callable[[Any, T], T], state: T, steps: int, unroll: bool = False) -> T:
  """Applies `state = body(i, state)` for i in 0..steps-1: a `lax.fori_loop`,
  or straight-line code when `unroll` (each step compiled separately).

  The loop is the fast form on every backend once the body's gradients go
  through `fast` (`jaxrobust.fastpath`, the attacks' do), and it compiles one
  step whatever the step count (docs/attacks.md).
  """
  if unroll:
    for i in range(steps):
      state = body(i, state)
    return state
  return loop(0, steps, body, state, like=jax.tree.leaves(state)[0])


def num_classes_of(logits_fn: Callable, x: jax.Array) -> int:
  """The number of classes `logits_fn` predicts, from its output shape (no compute)."""
  out = jax.eval_shape(logits_fn, x)
  checks.require(
    hasattr(out, "shape"),
    f"logits_fn must return one array of logits [batch, classes], got a "
    f"{type(out).__name__}; pick the logits out (e.g. lambda x: model(x)[0]), or "
    "build logits_fn with jaxrobust.models.inference.logits_fn",
  )
  shape = out.shape
  checks.require(
    len(shape) == 2 and shape[0] == x.shape[0],
    f"logits_fn must map a batch of {x.shape[0]} images to logits "
    f"[{x.shape[0]}, classes], got shape {shape}",
  )
  return shape[1]


def check_batch(
  logits_fn: Callable,
  x: jax.Array,
  y: jax.Array,
  *,
  stochastic: bool = False,
  soft_labels: bool = False,
) -> int:
  """Checks images and labels of an attack call; returns the number of classes.

  A `stochastic` model is `logits_fn(x, key)`. With `soft_labels`, `y` may
  also be a distribution over the classes per example, [B, K].
  """
  checks.check_images(x)
  if stochastic:
    logits_fn = functools.partial(_with_fixed_key, logits_fn)
  num_classes = num_classes_of(logits_fn, x)
  if soft_labels and jnp.ndim(y) == 2:
    checks.require(
      jnp.shape(y) == (x.shape[0], num_classes),
      f"soft labels must have shape ({x.shape[0]}, {num_classes}), got shape {tuple(jnp.shape(y))}",
    )
    checks.on_device(x=x)
  else:
    checks.check_labels(y, x.shape[0], num_classes)
    checks.on_device(x=x, y=y, num_classes=num_classes)
  return num_classes


def _with_fixed_key(logits_fn, x):
  return logits_fn(x, jax.random.key(0))


def batched(
  attack_one: Callable,
  logits_fn: Callable,
  x: jax.Array,
  y: jax.Array,
  key: jax.Array,
  *per_example: Any,
  stochastic: bool = False,
  soft_labels: bool = False,
) -> jax.Array:
  """Runs `attack_one(logits_fn_one, x_i, y_i, key_i, *args_i)` over the batch with vmap.

  `logits_fn_one` maps one example to its logits [K] (a `stochastic` model:
  one example and a key). `per_example` are extra arguments of shape [B] or
  scalars (broadcast), such as a per-example eps.

  Images in a floating type narrower than float32 (float16, bfloat16) are
  attacked in float32, and the result is rounded back towards x
  (`round_towards`), so it stays in the ball and the box exactly.

  Returns:
    The attacked batch, the shape and dtype of `x`, as x + stop_gradient(d*):
    its derivative with respect to x is the identity and none flows into
    the model through the search (Danskin's theorem: the gradient of
    max_d L(theta, x + d) is that of L(theta, x + d*) at the maximiser d*).
  """
  check_batch(logits_fn, x, y, stochastic=stochastic, soft_labels=soft_labels)
  for a in per_example:
    check_eps_shape(a, x.shape[0])
  # The model through the CPU fast path before the attack differentiates it,
  # and (in each attack) the gradient after: pooling and small-channel
  # convolutions get the gradients XLA:CPU runs fast (`jaxrobust.fastpath`).
  fast_logits = fast(logits_fn)
  logits_one = lambda xi, *key: fast_logits(xi[None], *key)[0]
  keys = keys_lib.example_keys(key, x.shape[0])
  axes = tuple(0 if jnp.ndim(a) else None for a in per_example)
  run = jax.vmap(
    lambda xi, yi, ki, *a: attack_one(logits_one, xi, yi, ki, *a), in_axes=(0, 0, 0) + axes
  )
  x_work = jax.lax.stop_gradient(working_precision(x))
  x_adv = round_towards(x_work, run(x_work, y, keys, *per_example), x.dtype)
  return jax.lax.stop_gradient(x_adv) + (x - jax.lax.stop_gradient(x))


def working_precision(x: jax.Array) -> jax.Array:
  """`x` in float32 if its type is a narrower float (float16, bfloat16)."""
  if jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits < 32:
    return x.astype(jnp.float32)
  return x


def round_towards(x: jax.Array, x_adv: jax.Array, dtype: Any) -> jax.Array:
  """`x_adv` in `dtype`, each coordinate rounded towards `x` (representable
  in `dtype`): |x_adv - x| never grows, so every L-p ball and the box that
  held x_adv hold the result."""
  if x_adv.dtype == dtype:
    return x_adv
  rounded = x_adv.astype(dtype)
  grew = jnp.abs(rounded.astype(x_adv.dtype) - x) > jnp.abs(x_adv - x)
  return jnp.where(grew, jnp.nextafter(rounded, x.astype(dtype)), rounded)
