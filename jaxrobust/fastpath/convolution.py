"""Convolutions in the forms XLA:CPU runs fast.

XLA:CPU runs a convolution in non-canonical dimension numbers inside a
`while` loop as a naive loop, and the input gradient of any convolution is
non-canonical (its kernel is [spatial..., O, I]): so every convolution is
rewritten in canonical numbers (input [N, spatial..., C], kernel
[spatial..., I, O]) between explicit transposes. XLA:CPU's convolution
kernels vectorise over channels, so a convolution with few channels gets zero
channels up to a multiple of `CHANNEL_MULTIPLE`.
"""

from typing import Any

import jax.numpy as jnp
from jax import lax
from jax.extend import core as jax_core
from jaxtyping import Array

# Convolutions with at most `SMALL_CHANNELS` input and output channels get
# zero channels up to a multiple of `CHANNEL_MULTIPLE` (8 floats: one AVX2
# register). Wider layers get slower padded (docs/performance.md).
# `CHANNEL_MULTIPLE = None` turns the padding off.
SMALL_CHANNELS = 16
CHANNEL_MULTIPLE: int | None = 8


def canonical_conv(lhs: Array, rhs: Array, *, dimension_numbers: Any, **params: Any) -> Array:
  """`lax.conv_general_dilated_p` in canonical dimension numbers between transposes.

  Args:
    lhs: the input, laid out as `dimension_numbers.lhs_spec` says.
    rhs: the kernel, laid out as `dimension_numbers.rhs_spec` says.
    dimension_numbers: a `lax.ConvDimensionNumbers` (lhs, rhs, out specs).
    **params: the primitive's other parameters (strides, padding, ...).

  Returns:
    The convolution, laid out as `dimension_numbers.out_spec` says.
  """
  lhs_spec, rhs_spec, out_spec = dimension_numbers
  n = lhs.ndim
  spatial = tuple(range(1, n - 1))
  canonical = lax.ConvDimensionNumbers(
    lhs_spec=(0, n - 1) + spatial,
    rhs_spec=(n - 1, n - 2) + tuple(range(n - 2)),
    out_spec=(0, n - 1) + spatial,
  )
  out = lax.conv_general_dilated_p.bind(
    jnp.transpose(lhs, (lhs_spec[0], *lhs_spec[2:], lhs_spec[1])),
    jnp.transpose(rhs, (*rhs_spec[2:], rhs_spec[1], rhs_spec[0])),
    dimension_numbers=canonical,
    **params,
  )
  # `out` is [batch, spatial..., feature]; move each axis to where out_spec has it.
  order = (out_spec[0], *out_spec[2:], out_spec[1])
  return jnp.transpose(out, sorted(range(n), key=lambda axis: order[axis]))


def conv(eqn: jax_core.JaxprEqn, lhs: Array, rhs: Array) -> list[Array]:
  """Rule for `conv_general_dilated`: canonical form, small channel counts padded.

  Args:
    eqn: the convolution's equation.
    lhs: its input.
    rhs: its kernel.

  Returns:
    The convolution's output, as a one-element list.
  """
  params = dict(eqn.params)
  dimension_numbers = params.pop("dimension_numbers")
  lhs_spec, rhs_spec, out_spec = dimension_numbers
  c_in, c_out = lhs.shape[lhs_spec[1]], rhs.shape[rhs_spec[0]]
  multiple = CHANNEL_MULTIPLE
  if multiple is None or not _pads_channels(lhs, rhs, c_in, c_out, rhs.shape[rhs_spec[1]], params):
    return [canonical_conv(lhs, rhs, dimension_numbers=dimension_numbers, **params)]
  up = lambda c: -(-c // multiple) * multiple
  lhs = _pad_axis(lhs, lhs_spec[1], up(c_in) - c_in)
  rhs = _pad_axis(_pad_axis(rhs, rhs_spec[1], up(c_in) - c_in), rhs_spec[0], up(c_out) - c_out)
  out = canonical_conv(lhs, rhs, dimension_numbers=dimension_numbers, **params)
  return [lax.slice_in_dim(out, 0, c_out, axis=out_spec[1])]


def _pads_channels(
  lhs: Array, rhs: Array, c_in: int, c_out: int, kernel_in: int, params: dict[str, Any]
) -> bool:
  """Whether a convolution gets zero channels up to `CHANNEL_MULTIPLE`: both
  channel counts at most `SMALL_CHANNELS`, not both multiples already, no
  grouping, floating point."""
  multiple = CHANNEL_MULTIPLE
  return bool(
    multiple is not None
    and max(c_in, c_out) <= SMALL_CHANNELS
    and (c_in % multiple or c_out % multiple)
    and kernel_in == c_in
    and params["feature_group_count"] == 1
    and params["batch_group_count"] == 1
    and params.get("preferred_element_type") is None
    and jnp.issubdtype(lhs.dtype, jnp.floating)
    and jnp.issubdtype(rhs.dtype, jnp.floating)
  )


def _pad_axis(x: Array, axis: int, extra: int) -> Array:
  """`x` with `extra` zeros appended along `axis`."""
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths)
