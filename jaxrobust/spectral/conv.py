"""The operator norm of a 2-D convolution on its actual input shape."""

import functools
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike

from jaxrobust import checks
from jaxrobust.spectral import iteration
from jaxrobust.types import PRNGKey

# "SAME", "VALID" or ((top, bottom), (left, right)).
Padding = str | Sequence[Sequence[int]]

_HIGHEST = jax.lax.Precision.HIGHEST


def _check_pair(name: str, value: Any) -> tuple[int, ...]:
  checks.require(
    isinstance(value, (tuple, list))
    and len(value) == 2
    and all(isinstance(s, numbers.Integral) and int(s) >= 1 for s in value),
    f"{name} must be two integers >= 1, got {value!r}",
  )
  return tuple(int(s) for s in value)


def _check_padding(padding: Any) -> str | tuple[tuple[int, int], ...]:
  """Returns "SAME", "VALID" or ((low, high), (low, high)) as a hashable."""
  if isinstance(padding, str):
    return checks.one_of("padding", padding.upper(), ("SAME", "VALID"))
  ok = (
    isinstance(padding, (tuple, list))
    and len(padding) == 2
    and all(
      isinstance(p, (tuple, list))
      and len(p) == 2
      and all(isinstance(q, numbers.Integral) for q in p)
      for p in padding
    )
  )
  checks.require(
    ok, f"padding must be 'SAME', 'VALID' or two (low, high) integer pairs, got {padding!r}"
  )
  return tuple((int(lo), int(hi)) for lo, hi in padding)


def check_shape(name: str, shape: Sequence[int], rank: int | None = None) -> tuple[int, ...]:
  """Returns `shape` as a tuple if it is `rank` (default: >= 1) integers >= 1.

  Args:
    name: the argument's name, for the message.
    shape: the shape to check (a tuple or list).
    rank: the number of dimensions required, or None for any number >= 1.

  Returns:
    `shape` as a tuple of Python ints.
  """
  ok = (
    isinstance(shape, (tuple, list))
    and len(shape) >= 1
    and (rank is None or len(shape) == rank)
    and all(isinstance(s, numbers.Integral) and int(s) >= 1 for s in shape)
  )
  count = "one or more" if rank is None else rank
  checks.require(ok, f"{name} must be {count} integers >= 1, got {shape!r}")
  return tuple(int(s) for s in shape)


def _conv2d(strides: tuple[int, ...], padding: Any, kernel: Array, v: Array) -> Array:
  """The convolution of one image v [H, W, C_in] with kernel [kh, kw, C_in, C_out]."""
  out = jax.lax.conv_general_dilated(
    v[None],
    kernel,
    strides,
    padding,
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    precision=_HIGHEST,
  )
  return out[0]


@functools.cache
def _conv2d_map(strides: tuple[int, ...], padding: Any) -> Callable[[Array, Array], Array]:
  # One function object per (strides, padding), so that `_lanczos_norm`,
  # which takes it as a static argument, compiles once per configuration.
  return functools.partial(_conv2d, strides, padding)


def conv_operator_norm(
  kernel: ArrayLike,
  input_shape: Sequence[int],
  strides: Sequence[int] = (1, 1),
  padding: Padding = "SAME",
  n_iter: int = 50,
  key: PRNGKey | None = None,
) -> float:
  """The largest singular value of a 2-D convolution as a linear map.

  Computes max ||conv(x)|| / ||x|| over images x of shape `input_shape`, where
  conv is `lax.conv_general_dilated(x, kernel, strides, padding)` (NHWC, HWIO,
  no bias): the convolution's L2 operator norm, its Lipschitz constant (Farnia
  et al. 2019). Power iteration on conv^T conv (`jax.vjp` gives the
  transpose) from a random unit vector, in its Krylov-subspace form (Lanczos
  with full reorthogonalisation): the estimate is at least the plain power
  iteration's after the same number of steps, never above the norm (up to
  float32 rounding), and it converges fast even when the top singular values
  are close, where plain power iteration stalls (50 plain steps are off by up
  to 1 % on small random kernels; 50 Lanczos steps by < 1e-4). For a
  certified upper bound use `lipschitz_bound`.

  Args:
    kernel: array [kh, kw, C_in, C_out].
    input_shape: (H, W, C_in) of one input image.
    strides: two integers >= 1.
    padding: "SAME", "VALID" or ((top, bottom), (left, right)).
    n_iter: iteration steps (>= 1), each one convolution and its transpose.
    key: PRNG key of the random start (default `jax.random.key(0)`).

  Returns:
    The estimated norm, a Python float.

  References:
    Farnia, Zhang & Tse, "Generalizable adversarial training via spectral
    normalization", ICLR 2019.
  """
  checks.require(
    np.ndim(kernel) == 4,
    f"kernel must have shape [kh, kw, C_in, C_out], got shape {tuple(np.shape(kernel))}",
  )
  shape = check_shape("input_shape", input_shape, 3)
  checks.require(
    shape[2] == np.shape(kernel)[2],
    f"input_shape {shape} has {shape[2]} channels but the kernel expects {np.shape(kernel)[2]}",
  )
  conv = _conv2d_map(_check_pair("strides", strides), _check_padding(padding))
  n_iter = checks.integer_at_least("n_iter", n_iter, 1)
  key = jax.random.key(0) if key is None else key
  return float(iteration.lanczos_norm(conv, jnp.asarray(kernel, jnp.float32), shape, key, n_iter))
