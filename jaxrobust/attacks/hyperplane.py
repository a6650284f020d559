"""The projection FAB steps along: the shortest step (in L-infinity, L2 or L1)
onto a hyperplane within the box [0, 1]^d, without sorting."""

import jax
import jax.numpy as jnp

from jaxrobust.attacks import core


def project_onto_hyperplane(t: jax.Array, w: jax.Array, b: jax.Array, norm: str) -> jax.Array:
  """The shortest step d (in `norm`) with w . (t + d) = b and t + d in [0, 1].

  With c = b - w . t and the sign of w flipped so that c >= 0, coordinate i
  can move by at most cap_i = 1 - t_i (w_i > 0) or t_i (w_i < 0) in the
  direction that raises w . d. The minimisers are, for a multiplier
  lambda >= 0,

    L-inf: d_i = sign(w_i) min(lambda, cap_i),
    L2:    d_i = w_i min(lambda, cap_i / |w_i|)   (KKT: d = clip(lambda w)),

  and g(lambda) = w . d(lambda) = sum_i a_i min(lambda, r_i) is piecewise
  linear and nondecreasing, with (a_i, r_i) = (|w_i|, cap_i) for L-inf and
  (w_i^2, cap_i / |w_i|) for L2. The smallest lambda with g(lambda) = c is
  found without sorting the breakpoints (a sort of every pixel per step is
  slow on XLA:CPU): bisection over the float32 bit patterns
  of [0, max r] (ordered like the numbers they encode), 32 halvings, ends
  with two adjacent floats lo < lambda <= hi, no breakpoint between them, so
  lambda = (c - sum_{r_i <= lo} a_i r_i) / sum_{r_i > lo} a_i, exact on its
  segment.

  L1 is a fractional knapsack (each unit of |d_i| buys |w_i| of w . d): the
  coordinates with the largest |w_i| move first, each up to its cap. With
  tau the largest threshold whose coordinates can reach c,
  h(tau) = sum_{|w_i| >= tau} |w_i| cap_i >= c,

    L1:    d_i = sign(w_i) cap_i          for |w_i| > tau,
           d_i = sign(w_i) theta cap_i    for |w_i| = tau,   0 below,

  theta = (c - sum_{|w_i| > tau} |w_i| cap_i) / (tau sum_{|w_i| = tau} cap_i)
  in (0, 1], so ||d||_1 = sum_{|w_i| > tau} cap_i + theta sum_{|w_i| = tau}
  cap_i. tau is found by the same bisection, over [0, max |w|].

  When c is out of reach (the hyperplane misses the box), d saturates every
  coordinate with w_i != 0: the box's point closest to the hyperplane's
  side. Works on one example of any shape (vmap it for a batch).
  """
  shape = t.shape
  t, w = t.ravel(), w.ravel()
  c = b - jnp.vdot(w, t)
  flip = jnp.where(c < 0, -1.0, 1.0).astype(t.dtype)
  w, c = w * flip, c * flip
  cap = jnp.where(w > 0, 1.0 - t, t)
  f32 = lambda v: v.astype(jnp.float32)
  if norm == "l1":
    fill = _knapsack(f32(jnp.abs(w)), f32(jnp.abs(w) * cap), f32(c)).astype(t.dtype)
    return (jnp.sign(w) * cap * fill).reshape(shape)
  nonzero = w != 0
  if norm == "linf":
    a, r = jnp.abs(w), cap
  else:  # a coordinate the hyperplane ignores (w_i = 0) adds a breakpoint, no slope
    a = jnp.square(w)
    r = jnp.where(nonzero, cap / jnp.where(nonzero, jnp.abs(w), 1.0), 0.0)
  lam = _multiplier(f32(a), f32(r), f32(c)).astype(t.dtype)
  if norm == "linf":
    d = jnp.sign(w) * jnp.minimum(lam, cap)
  else:
    d = jnp.where(nonzero, w * jnp.minimum(lam, r), 0.0)
  return d.reshape(shape)


def _multiplier(a, r, c):
  """The smallest lambda >= 0 with g(lambda) = sum_i a_i min(lambda, r_i) >= c
  (a, r >= 0, float32), inf when g(max r) < c."""
  g = lambda lam: jnp.sum(a * jnp.minimum(lam, r))
  top = jnp.max(r)
  lo, hi = _bisect(lambda lam: g(lam) < c, top, like=r)
  past = r > lo
  slope = jnp.sum(jnp.where(past, a, 0.0))
  lam = (c - jnp.sum(jnp.where(past, 0.0, a * r))) / jnp.where(slope > 0, slope, 1.0)
  lam = jnp.clip(lam, lo, hi)
  return jnp.where(c <= 0, 0.0, jnp.where(g(top) < c, jnp.inf, lam))


def _knapsack(a, v, c):
  """The share of its cap each coordinate moves in the L1 projection (a = |w|,
  v = |w| cap, float32): 1 above the threshold tau, theta at it, 0 below;
  1 wherever a_i > 0 when even all of them fall short of c."""
  reach = lambda tau: jnp.sum(jnp.where(a > tau, v, 0.0))  # h just above tau
  lo, hi = _bisect(lambda tau: reach(tau) >= c, jnp.max(a), like=a)
  full, part = a > hi, (a > lo) & (a <= hi)  # tau = hi: no |w_i| strictly between
  share = jnp.sum(jnp.where(part, v, 0.0))
  theta = jnp.clip((c - reach(hi)) / jnp.where(share > 0, share, 1.0), 0.0, 1.0)
  fill = jnp.where(full, 1.0, jnp.where(part, theta, 0.0))
  fill = jnp.where(reach(0.0) < c, jnp.where(a > 0, 1.0, 0.0), fill)
  return jnp.where(c <= 0, 0.0, fill)


def _bisect(below, top, *, like):
  """Adjacent float32s lo < hi in [0, top] with below(lo) and not below(hi),
  for a monotone `below`, true at 0 and false at top: bisection over the
  bit patterns of non-negative floats (ordered like the numbers they
  encode), 32 halvings."""
  as_float = lambda bits: jax.lax.bitcast_convert_type(bits, jnp.float32)

  def halve(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    low = below(as_float(mid))
    return jnp.where(low, mid, lo), jnp.where(low, hi, mid)

  start = (jnp.int32(0), jax.lax.bitcast_convert_type(top, jnp.int32))
  lo, hi = core.loop(0, 32, halve, start, like=like)
  return as_float(lo), as_float(hi)
