"""One run of Auto-PGD: its start, step, step-size schedule and checkpoints, as
the authors' code runs them.

Threat model: x_adv = x + d with ||d||_p <= eps (p = inf, 2 or 1) and x_adv
in [0, 1]; P below projects onto this set (for L1 exactly,
`core.project_l1_box`). A run maximises f, the attack's objective.

L-inf and L2 (Croce & Hein 2020). From x^(0) on the sphere of radius eps
(a uniform direction, scaled to reach the ball's boundary, and clipped to
the box, as in the authors' code), with eta = 2 eps and, for k = 0, 1, ...
(alpha = 1 at k = 0, else 0.75):

  z^(k+1) = P(x^(k) + eta u(grad f(x^(k)))),
  x^(k+1) = P(x^(k) + alpha (z^(k+1) - x^(k)) + (1 - alpha) (x^(k) - x^(k-1))),

u = sign for L-infinity and g / ||g||_2 for L2. At the checkpoints w_j
(`checkpoints`: w_j - w_{j-1} = h_j) the step is halved and x^(k+1) reset to
the best point so far, x_max, when
  1. f(x^(k+1)) > f(x^(k)) held in at most rho h_j of the h_j steps since
     w_{j-1} (f(x^(0)) counting as 0 in the first window, as in the
     authors' code), or
  2. eta was not halved at w_{j-1} (at w_1 it counts as halved) and
     f(x_max) has not risen since then.

L1 (Croce & Hein 2021). x^(0) = P(x + n), n a standard Gaussian; eta = eps;
no momentum: x^(k+1) = P(x^(k) + eta s / ||s||_1), s_i = sign(g_i) where |g_i|
is at least the floor((1 - t) D)-th smallest of the D values |g| (0-based,
at most D - 1), else 0; t = 0.2 at first. Every checkpoint (every
max(floor(0.04 N), 1) iterations) sets m = ||x_max - x||_0 (the pixels x_max
changes) and t = m / (1.5 D); if m < 0.95 m' (m' the previous m, at first D)
it sets eta = eps and x^(k+1) = x_max, else eta = eta / 1.5, and keeps eta in
[eps / 10, eps]. rho plays no part. With `use_largereps` (AutoAttack's
standard L1 version) it runs three times, with radius 3 eps, 2 eps and eps
for ceil(0.3 N), ceil(0.3 N) and the rest of the N iterations
(`largereps_stages`), each from the previous run's x_max projected onto the
next ball (the first from P(x + n) in the 3 eps ball), with m' the start's
sparsity and t = m' / (1.5 D); only the last run's points count.

A run is a `lax.fori_loop` on every backend (compiles once whatever the
step count), its gradients through `core.canonical_convolutions` so that
XLA:CPU runs them at full speed inside the loop.

References:
  Croce & Hein, 2020, "Reliable evaluation of adversarial robustness with an
  ensemble of diverse parameter-free attacks".
  Croce & Hein, 2021, "Mind the box: l1-APGD for sparse adversarial attacks
  on image classifiers".
"""

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrobust.attacks import core

MOMENTUM = 0.75  # alpha in the paper
# `evaluate(delta, step) -> ((value, success), gradient)` at x + delta.
Evaluate = Callable[[jax.Array, Any], tuple[tuple[jax.Array, jax.Array], jax.Array]]


def checkpoints(steps: int, norm: str = "linf") -> list[int]:
  """The iterations w_1 < w_2 < ... <= `steps` at which APGD checks its
  progress, as the authors' code counts them (integer floors of fractions
  of N = `steps`).

  L-inf and L2: w_j = h_1 + ... + h_j, with h_1 = max(floor(0.22 N), 1) and
  h_{j+1} = max(h_j - max(floor(0.03 N), 1), max(floor(0.06 N), 1)).
  L1: every h = max(floor(0.04 N), 1) iterations.
  """
  if norm == "l1":
    every = max(int(0.04 * steps), 1)
    return list(range(every, steps + 1, every))
  length, shrink, shortest = (max(int(f * steps), 1) for f in (0.22, 0.03, 0.06))
  points = [length]
  while True:
    length = max(length - shrink, shortest)
    if points[-1] + length > steps:
      return points
    points.append(points[-1] + length)


def largereps_stages(steps: int) -> tuple[tuple[float, int], ...]:
  """L1 APGD's `use_largereps` schedule: (radius factor, iterations) of its
  three runs, 3 eps, 2 eps and eps over ceil(0.3 N), ceil(0.3 N) and the
  rest of N = `steps` iterations."""
  first = math.ceil(0.3 * steps)
  return ((3.0, first), (2.0, first), (1.0, steps - 2 * first))


def value_and_grad(
  logits_one: Callable, objective: Callable, x: jax.Array, key: jax.Array, eot_samples: int
) -> Evaluate:
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


def start(key: jax.Array, x: jax.Array, eps: Any, norm: str) -> jax.Array:
  """The authors' start. L-inf and L2: a random direction scaled to the
  sphere of radius eps (L-inf: u / max|u| with u uniform in [-1, 1]^d; L2: a
  Gaussian direction), then clipped to the box. L1: a standard Gaussian
  projected onto the ball and the box."""
  if norm == "l1":
    return projection(x, eps, norm)(jax.random.normal(key, x.shape, x.dtype))
  if norm == "linf":
    u = jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0)
    delta = eps * u / jnp.maximum(jnp.max(jnp.abs(u)), 1e-12)
  else:
    u = jax.random.normal(key, x.shape, x.dtype)
    delta = eps * u / jnp.maximum(core.l2_norm(u), 1e-12)
  return core.clip_to_box(x, delta)


def projection(x: jax.Array, eps: Any, norm: str) -> Callable[[jax.Array], jax.Array]:
  """P: delta -> the nearest point of the ball (L-inf, L1) intersected with
  the box, or the ball's nearest point clipped to the box (L2, as the
  authors' code)."""
  if norm == "l1":
    return lambda delta: core.clip_to_box(x, core.project_l1_box(x, delta, eps))
  return lambda delta: core.clip_to_box(x, core.project(delta, eps, norm))


def _schedule(steps, norm, rho):
  """Per iteration i (which makes x^(i+1)): whether i + 1 is a checkpoint, and
  condition 1's threshold rho h_j there (in float32, as the reference
  compares it)."""
  is_checkpoint = np.zeros(steps, bool)
  threshold = np.zeros(steps, np.float32)
  points = checkpoints(steps, norm)
  for previous, point in zip([0] + points, points):
    is_checkpoint[point - 1] = True
    threshold[point - 1] = np.float32((point - previous) * rho)
  return jnp.asarray(is_checkpoint), jnp.asarray(threshold)


def run(
  evaluate: Evaluate, x: jax.Array, key: jax.Array, eps: Any, **settings: Any
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One APGD run from a random start (with `use_largereps`, its three runs):
  (delta, value, success) per example, delta the highest-value success if
  any iterate succeeded, else the highest-value iterate."""
  s = final_state(evaluate, x, key, eps, **settings)
  return (
    jnp.where(s["success"], s["adversarial"], s["best"]),
    jnp.where(s["success"], s["adversarial_value"], s["best_value"]),
    s["success"],
  )


def final_state(
  evaluate: Evaluate,
  x: jax.Array,
  key: jax.Array,
  eps: Any,
  *,
  norm: str,
  steps: int,
  rho: float,
  use_largereps: bool,
) -> dict[str, jax.Array]:
  """The state after one APGD run (`iterate`); with `use_largereps`, after
  the last of its three runs, each started from the previous one's best point."""
  if not use_largereps:
    return iterate(evaluate, x, start(key, x, eps, norm), eps, norm, steps, rho)
  delta, first_step = start(key, x, 3.0 * eps, norm), 0
  for factor, stage_steps in largereps_stages(steps):
    delta = projection(x, factor * eps, norm)(delta)
    s = iterate(evaluate, x, delta, factor * eps, norm, stage_steps, rho, first_step, sparse=True)
    delta, first_step = s["best"], first_step + stage_steps + 1
  return s


def iterate(
  evaluate: Evaluate,
  x: jax.Array,
  delta: jax.Array,
  eps: Any,
  norm: str,
  steps: int,
  rho: float,
  first_step: int = 0,
  sparse: bool = False,
) -> dict[str, jax.Array]:
  """`steps` APGD iterations from `delta`; returns the final state.
  `evaluate(delta, step)` returns ((value, success), gradient), step
  counting from `first_step`. L1: with `sparse`, the sparsity schedule starts
  from delta's sparsity (`use_largereps`), else from t = 0.2."""
  is_checkpoint, threshold = _schedule(steps, norm, rho)
  project = projection(x, eps, norm)

  def step(i, s):
    new = _next_point(s, i, project, norm)
    (value, success), grad = evaluate(new, first_step + i + 1)
    s = _record(s, new, value, success, grad)
    if norm == "l1":
      return _sparsity_checkpoint(s, is_checkpoint[i], x, eps)
    return _progress_checkpoint(s, is_checkpoint[i], threshold[i])

  s = _initial_state(evaluate(delta, first_step), x, delta, eps, norm, sparse)
  return core.loop(0, steps, step, s, like=x) if steps else s


def _initial_state(evaluated, x, delta, eps, norm, sparse):
  """The state at x^(0) = `delta`, from `evaluated`, its ((value, success), gradient)."""
  (value, success), grad = evaluated
  s = dict(
    previous=delta,
    delta=delta,
    grad=grad,
    eta=jnp.asarray((1.0 if norm == "l1" else 2.0) * eps, delta.dtype),
    best=delta,
    best_grad=grad,
    best_value=value,
    success=success,
    adversarial=delta,
    adversarial_value=value,
  )
  if norm == "l1":
    size = jnp.float32(delta.size)
    sparsity = _changed(x, delta) if sparse else size
    topk = sparsity / size / 1.5 if sparse else jnp.float32(0.2)
    return dict(s, sparsity=sparsity, topk=topk)
  # The reference's first window compares f(x^(1)) with 0, not with f(x^(0)).
  zero = jnp.zeros_like(value)
  return dict(s, last_value=zero, rises=jnp.int32(0), halved=jnp.array(True), checked_value=value)


def _next_point(s, i, project, norm):
  """x^(i+1): the step (with momentum in L-inf and L2), projected."""
  delta, eta = s["delta"], s["eta"]
  if norm == "l1":
    return project(delta + eta * _sparse_direction(s["grad"], s["topk"]))
  alpha = jnp.where(i > 0, MOMENTUM, 1.0)
  z = project(delta + eta * core.steepest_ascent(s["grad"], norm))
  return project(delta + alpha * (z - delta) + (1 - alpha) * (delta - s["previous"]))


def _sparse_direction(grad, topk):
  """s / ||s||_1: the signs of the gradient's coordinates of largest |g| (a
  fraction `topk` of them, as the reference selects them), 0 elsewhere."""
  size = jnp.abs(grad)
  count = size.size
  index = jnp.clip((1.0 - topk) * count, 0, count - 1).astype(jnp.int32)
  signs = jnp.sign(grad) * (size >= jnp.sort(size.ravel())[index])
  return signs / (jnp.sum(jnp.abs(signs)) + 1e-10)


def _record(s, new, value, success, grad):
  """The state after x^(k+1) = `new`: its value, gradient and the best points."""
  improved = value > s["best_value"]
  better_success = success & (~s["success"] | (value > s["adversarial_value"]))
  s = dict(
    s,
    previous=s["delta"],
    delta=new,
    grad=grad,
    best=jnp.where(improved, new, s["best"]),
    best_grad=jnp.where(improved, grad, s["best_grad"]),
    best_value=jnp.where(improved, value, s["best_value"]),
    success=s["success"] | success,
    adversarial=jnp.where(better_success, new, s["adversarial"]),
    adversarial_value=jnp.where(better_success, value, s["adversarial_value"]),
  )
  if "rises" in s:
    s.update(rises=s["rises"] + (value > s["last_value"]), last_value=value)
  return s


def _progress_checkpoint(s, checked, threshold):
  """L-inf and L2: halve the step and restart from the best point if
  condition 1 or 2 holds at a checkpoint."""
  condition_1 = s["rises"] <= threshold
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


def _changed(x, delta):
  """||x + delta - x||_0: the pixels the perturbation changes (in float32)."""
  return jnp.count_nonzero(x + delta != x).astype(jnp.float32)


def _sparsity_checkpoint(s, checked, x, eps):
  """L1: at a checkpoint, the fraction of coordinates stepped follows the
  best point's sparsity; a sparsity that fell by more than 5 % resets the
  step to eps and the point to the best one, else the step shrinks by 1.5."""
  sparsity = _changed(x, s["best"])
  old = s["sparsity"]
  reduced = checked & (old > 0) & (sparsity / jnp.maximum(old, 1.0) < jnp.float32(0.95))
  eta = jnp.clip(jnp.where(reduced, eps, s["eta"] / 1.5), eps / 10.0, eps).astype(s["eta"].dtype)
  return dict(
    s,
    eta=jnp.where(checked, eta, s["eta"]),
    delta=jnp.where(reduced, s["best"], s["delta"]),
    grad=jnp.where(reduced, s["best_grad"], s["grad"]),
    sparsity=jnp.where(checked, sparsity, old),
    topk=jnp.where(checked, sparsity / jnp.float32(s["best"].size) / 1.5, s["topk"]),
  )
