"""Layer primitives that compute what Flax's do, in the form XLA:CPU runs fast.

The values are those of the standard operations (tests/test_layers.py
compares them); only the computation differs, and only on CPU:

* `max_pool`: non-overlapping max-pooling as a reshape and a max, whose
  gradient is elementwise, where `nn.max_pool`'s gradient is XLA's
  select-and-scatter, which XLA:CPU runs as a loop.
* `conv_general_dilated`: `lax.conv_general_dilated` (pass it to `nn.Conv`)
  whose kernel gradient is one matrix product of the input's patches with
  the output gradient, where XLA:CPU computes it as a convolution whose
  kernel is the whole image. The input gradient and the forward pass are
  unchanged.
"""

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

_NHWC = ("NHWC", "HWIO", "NHWC")


def max_pool(x: jax.Array, size: int = 2) -> jax.Array:
  """Max-pooling over non-overlapping windows, as a reshape and a max.

  out[b, i, j, c] = max_{0 <= p, q < s} x[b, s i + p, s j + q, c], the values
  of `nn.max_pool(x, (s, s), strides=(s, s))` (VALID: trailing rows and
  columns that fill no window are dropped). The gradient is the indicator of
  the maximum, split between ties; disjoint windows keep it 1-Lipschitz.

  Args:
    x: NHWC feature maps.
    size: the window's side s, also the stride.

  Returns:
    The pooled maps [B, floor(H / s), floor(W / s), C].
  """
  b, h, w, c = x.shape
  h, w = h // size * size, w // size * size
  windows = x[:, :h, :w].reshape(b, h // size, size, w // size, size, c)
  return windows.max(axis=(2, 4))


def conv_general_dilated(
  lhs: jax.Array,
  rhs: jax.Array,
  window_strides: Sequence[int],
  padding: str | Sequence[tuple[int, int]],
  lhs_dilation: Sequence[int] | None = None,
  rhs_dilation: Sequence[int] | None = None,
  dimension_numbers: Any = None,
  feature_group_count: int = 1,
  batch_group_count: int = 1,
  precision: Any = None,
  preferred_element_type: Any = None,
) -> jax.Array:
  """`lax.conv_general_dilated`, with a matrix-product kernel gradient on CPU.

  For 2-D NHWC convolutions without dilation or groups on the CPU backend,
  the kernel gradient is patches(x)^T g; every other case (and every other
  backend) is `lax.conv_general_dilated` itself.

  Args:
    lhs: the input.
    rhs: the kernel.
    window_strides: as `lax.conv_general_dilated`'s.
    padding: as `lax.conv_general_dilated`'s.
    lhs_dilation: as `lax.conv_general_dilated`'s.
    rhs_dilation: as `lax.conv_general_dilated`'s.
    dimension_numbers: as `lax.conv_general_dilated`'s.
    feature_group_count: as `lax.conv_general_dilated`'s.
    batch_group_count: as `lax.conv_general_dilated`'s.
    precision: as `lax.conv_general_dilated`'s.
    preferred_element_type: as `lax.conv_general_dilated`'s.

  Returns:
    The convolution, `lax.conv_general_dilated(lhs, rhs, ...)`.
  """
  plain = functools.partial(
    lax.conv_general_dilated,
    window_strides=window_strides,
    padding=padding,
    lhs_dilation=lhs_dilation,
    rhs_dilation=rhs_dilation,
    dimension_numbers=dimension_numbers,
    feature_group_count=feature_group_count,
    batch_group_count=batch_group_count,
    precision=precision,
    preferred_element_type=preferred_element_type,
  )
  dilated = any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
  if (
    jax.default_backend() != "cpu"
    or lhs.ndim != 4
    or dilated
    or feature_group_count != 1
    or batch_group_count != 1
    or preferred_element_type is not None
    or lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    != lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
  ):
    return plain(lhs, rhs)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
  return _conv(lhs, rhs, tuple(window_strides), tuple(map(tuple, padding)), precision)


def _conv_fn(strides, padding, precision):
  return functools.partial(
    lax.conv_general_dilated,
    window_strides=strides,
    padding=padding,
    dimension_numbers=_NHWC,
    precision=precision,
  )


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4))
def _conv(x, kernel, strides, padding, precision):
  return _conv_fn(strides, padding, precision)(x, kernel)


def _conv_jvp(strides, padding, precision, primals, tangents):
  """The convolution is bilinear: d conv(x, k) = conv(dx, k) + conv(x, dk), with
  the second term written as patches(x) @ dk, so that reverse mode (which
  transposes this map) computes the kernel gradient as patches(x)^T @ g."""
  (x, kernel), (dx, dkernel) = primals, tangents
  conv = _conv_fn(strides, padding, precision)
  out = conv(x, kernel)
  terms = []
  if not isinstance(dx, SymbolicZero):
    terms.append(conv(dx, kernel))
  if not isinstance(dkernel, SymbolicZero):
    kh, kw, c_in, c_out = kernel.shape
    patches = _patches(x, (kh, kw), strides, padding)  # [B, H', W', kh kw c_in]
    terms.append(jnp.dot(patches, dkernel.reshape(kh * kw * c_in, c_out), precision=precision))
  tangent = sum(terms[1:], terms[0]) if terms else jnp.zeros_like(out)
  return out, tangent


_conv.defjvp(_conv_jvp, symbolic_zeros=True)


def _patches(x, window, strides, padding):
  """The input patch of every output pixel, [B, H', W', kh * kw * C] in (kh,
  kw, C) order (the kernel's HWI order), by strided slices of the padded input."""
  x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  (kh, kw), (sh, sw) = window, strides
  out_h, out_w = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
  return jnp.concatenate(
    [
      x[:, i : i + (out_h - 1) * sh + 1 : sh, j : j + (out_w - 1) * sw + 1 : sw]
      for i in range(kh)
      for j in range(kw)
    ],
    axis=-1,
  )
