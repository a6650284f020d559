"""Layer primitives that compute what Flax's do, in the form XLA:CPU runs fast.

The models use them; the values are those of the standard operations (the
tests compare them), only the computation differs, and only on CPU:

* `max_pool`: non-overlapping max-pooling as a reshape and a max, whose
  gradient is elementwise; `nn.max_pool`'s gradient is XLA's
  select-and-scatter, which XLA:CPU runs as a slow loop (a quarter of a PGD
  step's time in `benchmarks/run.py`).
* `conv_general_dilated`: `lax.conv_general_dilated` (pass it to `nn.Conv`)
  whose kernel gradient is one matrix product of the input's patches with the
  output gradient. XLA:CPU computes that gradient as a convolution whose
  kernel is the whole image, 1.6x slower for the small CNN's training
  backward pass. The input gradient and the forward pass are unchanged.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

_NHWC = ("NHWC", "HWIO", "NHWC")


def max_pool(x, size=2):
  """Max-pooling of NHWC `x` over non-overlapping `size` x `size` windows
  (stride `size`, VALID padding): the values of
  `nn.max_pool(x, (size, size), strides=(size, size))`, as a reshape and a
  max (gradient: the indicator of the maximum, split between ties). Disjoint
  windows keep it 1-Lipschitz."""
  b, h, w, c = x.shape
  h, w = h // size * size, w // size * size
  windows = x[:, :h, :w].reshape(b, h // size, size, w // size, size, c)
  return windows.max(axis=(2, 4))


def conv_general_dilated(
  lhs,
  rhs,
  window_strides,
  padding,
  lhs_dilation=None,
  rhs_dilation=None,
  dimension_numbers=None,
  feature_group_count=1,
  batch_group_count=1,
  precision=None,
  preferred_element_type=None,
):
  """`lax.conv_general_dilated`, with a matrix-product kernel gradient on CPU.

  Used for 2-D NHWC convolutions without dilation or groups on the CPU
  backend; every other case (and every other backend) is
  `lax.conv_general_dilated` itself.
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
  dilated = any(d != 1 for d in (lhs_dilation or ()) + (rhs_dilation or ()))
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
