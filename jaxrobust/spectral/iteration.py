"""Numerics for spectral norms: power iteration and Lanczos iteration on a linear
map given as a function, and the probability bound that turns a Lanczos
estimate into a certified upper bound."""

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from jaxrobust.types import PRNGKey

# Power iteration on a linear map L given as a function (one example in, one
# example out). Each step applies L and its transpose (via `jax.vjp`).
LinearFn = Callable[[Array], Array]


def unit(v: Array, epsilon: float = 1e-12) -> Array:
  """A unit vector along `v`: v / sqrt(||v||^2 + epsilon), and 0 for v = 0.

  Args:
    v: an array of any shape.
    epsilon: keeps the division finite at v = 0.

  Returns:
    The scaled `v`.
  """
  return v * jax.lax.rsqrt(jnp.sum(jnp.square(v)) + epsilon)


def random_unit(key: PRNGKey, shape: tuple[int, ...]) -> Array:
  """A vector drawn uniformly from the unit sphere of `shape`.

  Args:
    key: the PRNG key of the draw.
    shape: the vector's shape.

  Returns:
    A float32 array of `shape` with L2 norm 1.
  """
  return unit(jax.random.normal(key, shape, jnp.float32))


def power_step(linear_fn: LinearFn, v: Array) -> Array:
  """One power-iteration step on L^T L: L^T L v / ||L^T L v||.

  Args:
    linear_fn: the linear map L (its transpose comes from `jax.vjp`).
    v: the current unit vector.

  Returns:
    The next unit vector.
  """
  out, pullback = jax.vjp(linear_fn, v)
  return unit(pullback(out)[0])


def power_iterate(linear_fn: LinearFn, v: Array, n_steps: int | Array) -> Array:
  """`n_steps` power-iteration steps from `v` (a `lax.fori_loop`).

  Args:
    linear_fn: the linear map L.
    v: the starting unit vector.
    n_steps: the number of steps.

  Returns:
    The unit vector after the steps: close to L's top right singular vector.
  """
  return jax.lax.fori_loop(0, n_steps, lambda _, w: power_step(linear_fn, w), v)


def sigma(linear_fn: LinearFn, v: Array) -> Array:
  """The singular value estimate sigma = <u, L v>, u = L v / ||L v|| held constant.

  The value is ||L v||; the gradient with respect to L is u v^T, the one of
  Miyato et al. (2018, Algorithm 1), where the power-iteration vectors carry no
  gradient. Written with a stopped `u` (not as a norm) so that the gradient is
  0, not NaN, when L v = 0.

  Args:
    linear_fn: the linear map L.
    v: a unit vector (the power iterate).

  Returns:
    The scalar estimate.

  References:
    Miyato, Kataoka, Koyama & Yoshida, "Spectral normalization for
    generative adversarial networks", ICLR 2018.
  """
  lv = linear_fn(v)
  u = jax.lax.stop_gradient(unit(lv))
  return jnp.vdot(u, lv)


@functools.partial(jax.jit, static_argnums=(0, 2, 4))
def lanczos_norm(
  linear_fn: Callable[[Any, Array], Array],
  params: Any,
  shape: tuple[int, ...],
  key: PRNGKey,
  n_iter: int,
) -> Array:
  """Estimates the norm of L = linear_fn(params, .) by `n_iter` Lanczos steps.

  L acts on arrays of `shape`. Lanczos iteration on B = L^T L from v0, drawn
  uniformly from the unit sphere with `key`, with full reorthogonalisation,
  builds an orthonormal basis Q of the Krylov space span{v0, B v0, ...,
  B^(n_iter - 1) v0} and the tridiagonal T = Q^T B Q. The estimate is ||L y||
  for the unit top eigenvector y = Q s of T (s: top eigenvector of T): a true
  Rayleigh quotient, so never above ||L|| (up to rounding) even if float32
  orthogonality is lost. As the space contains the power iterate
  B^(n_iter - 1) v0, the estimate is at least the power iteration's from the
  same start; it converges much faster when the top singular values are
  close. When the space becomes invariant (B of low rank, e.g. a strided
  convolution), the iteration stops adding vectors.

  Args:
    linear_fn: `linear_fn(params, x)`, linear in x (a static argument).
    params: the map's parameters (e.g. a kernel).
    shape: the shape of x (static).
    key: the PRNG key of the random start.
    n_iter: Lanczos steps (static).

  Returns:
    The estimate, a float32 scalar.
  """
  v0 = random_unit(key, shape)
  linear = functools.partial(linear_fn, params)

  def gram(q: Array) -> Array:
    out, pullback = jax.vjp(linear, q.reshape(shape))
    return pullback(out)[0].ravel()

  basis = jnp.zeros((n_iter + 1, v0.size), jnp.float32)
  basis = basis.at[0].set(unit(v0.ravel().astype(jnp.float32)))

  def step(j: Array, carry: tuple[Array, Array, Array]) -> tuple[Array, Array, Array]:
    basis, alphas, betas = carry
    q = basis[j]
    bq = gram(q)
    alpha = jnp.vdot(q, bq)
    # Unfilled rows of `basis` are 0; projecting twice keeps the basis
    # orthogonal to float32 precision ("twice is enough", Parlett) unless
    # almost all of B q lies in the space already: then the space is
    # (numerically) invariant and the remainder is rounding noise, dropped.
    w = bq - (basis @ bq) @ basis
    w = w - (basis @ w) @ basis
    beta = jnp.linalg.norm(w)
    invariant = beta <= 1e-5 * jnp.linalg.norm(bq)
    basis = basis.at[j + 1].set(jnp.where(invariant, 0.0, w / beta))
    beta = jnp.where(invariant, 0.0, beta)
    return basis, alphas.at[j].set(alpha), betas.at[j].set(beta)

  zeros = jnp.zeros((n_iter,), jnp.float32)
  basis, alphas, betas = jax.lax.fori_loop(0, n_iter, step, (basis, zeros, zeros))
  off_diagonal = betas[:-1]
  tridiagonal = jnp.diag(alphas) + jnp.diag(off_diagonal, 1) + jnp.diag(off_diagonal, -1)
  top = jnp.linalg.eigh(tridiagonal)[1][:, -1]
  y = unit(top @ basis[:n_iter])
  return jnp.linalg.norm(linear(y.reshape(shape)))


def _log_chebyshev(degree: int, x: np.ndarray) -> np.ndarray:
  """log T_degree(x) for x >= 1, where T_d(cosh y) = cosh(d y)."""
  y = degree * np.arccosh(x)
  return y - math.log(2) + np.log1p(np.exp(-2 * y))


def lanczos_margin(dim: int, n_iter: int, failure_probability: float) -> float:
  """A factor m with P(||L|| > m * estimate) <= failure_probability.

  Holds for any linear map L on R^dim, where `estimate` is the result of
  `lanczos_norm` after `n_iter` steps from a start v drawn uniformly from the
  unit sphere, and the probability is over v. No eigenvalue gap is assumed.

  Proof. Scale lambda_1 = ||L||^2 to 1 and let c_i be the squared components
  of v in the eigenbasis of B = L^T L. The Krylov space holds p(B) v for every
  polynomial p of degree d = n_iter - 1, so estimate^2 is at least the
  Rayleigh quotient of B at p(B) v. Take p(x) = T_d(2x / t - 1) (Chebyshev):
  |p| <= 1 on [0, t] and p(1) = T_d(1 + 2 (1 - t) / t). Dropping the
  eigenvalues below t from the numerator and bounding their p(lambda)^2 by 1
  in the denominator gives estimate^2 >= t / (1 + 1 / (p(1)^2 c_1)). So
  estimate^2 < 1 - eps needs c_1 < 1 / (eta p(1)^2) with
  eta = t / (1 - eps) - 1, and as the first component of v has density at
  most sqrt(dim / (2 pi)) (Gautschi's inequality),
  P(estimate^2 < 1 - eps) <= sqrt(2 dim / (pi eta)) / p(1): the
  sqrt(dim) exp(-2 d sqrt(eps)) rate of Kuczynski & Wozniakowski (1992). This
  returns 1 / sqrt(1 - eps) for the smallest eps (by bisection, minimising
  over t on a grid) that makes the right-hand side at most
  `failure_probability`.

  Args:
    dim: dimension of the input space of L.
    n_iter: Lanczos steps (>= 1).
    failure_probability: in (0, 1).

  Returns:
    The factor, a float >= 1 (large for few steps: about 1.007 for 100 steps,
    dim 65536 and 1e-6).

  References:
    Kuczynski & Wozniakowski, "Estimating the largest eigenvalue by the power
    and Lanczos algorithms with a random start", SIAM J. Matrix Anal. Appl. 1992.
  """
  log_scale = 0.5 * math.log(2 * dim / math.pi)
  log_target = math.log(failure_probability)
  alphas = np.linspace(1e-4, 1 - 1e-4, 4000)  # t = 1 - alpha * eps

  def fails(eps: float) -> bool:
    t = 1 - alphas * eps
    eta = t / (1 - eps) - 1
    log_p = log_scale - 0.5 * np.log(eta) - _log_chebyshev(n_iter - 1, 1 + 2 * (1 - t) / t)
    return bool(log_p.min() > log_target)

  low, high = 0.0, 1.0 - 1e-12
  if fails(high):
    return math.inf
  for _ in range(100):
    middle = 0.5 * (low + high)
    low, high = (middle, high) if fails(middle) else (low, middle)
  return 1 / math.sqrt(1 - high)
