"""Pooling over non-overlapping windows as a reshape and a reduction.

XLA:CPU differentiates a max-pool with `select_and_scatter`, a slow loop on
that backend; over disjoint windows (window == stride) the same values and
gradients come from a reshape into windows and an elementwise reduction.
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jax_core
from jaxtyping import Array

Window = tuple[int, ...]
Padding = tuple[tuple[int, int], ...]


def non_overlapping(
  window: Sequence[int],
  strides: Sequence[int],
  padding: Sequence[tuple[int, int]],
  base_dilation: Sequence[int] | None = None,
  window_dilation: Sequence[int] | None = None,
) -> bool:
  """Whether a reduce-window is over disjoint windows that `window_max` can form.

  Args:
    window: the window's size along each axis.
    strides: the stride along each axis.
    padding: (low, high) padding along each axis.
    base_dilation: the input's dilation, or None for none.
    window_dilation: the window's dilation, or None for none.

  Returns:
    True when the windows tile the padded input without overlap: window equal
    to stride, no dilation, non-negative padding.
  """
  ones = lambda d: d is None or all(v == 1 for v in d)
  return (
    tuple(window) == tuple(strides)
    and ones(base_dilation)
    and ones(window_dilation)
    and all(lo >= 0 and hi >= 0 for lo, hi in padding)
  )


def _windows(x: Array, window: Window, padding: Padding, fill: float) -> tuple[Array, Window]:
  """`x` padded with `fill`, cut to whole windows and reshaped so that each
  window dimension w > 1 splits into (blocks, w); returns it and the window axes."""
  x = lax.pad(x, jnp.asarray(fill, x.dtype), [(lo, hi, 0) for lo, hi in padding])
  x = x[tuple(slice(0, n // w * w) for n, w in zip(x.shape, window))]
  shape: list[int] = []
  axes: list[int] = []
  for n, w in zip(x.shape, window):
    if w == 1:
      shape.append(n)
    else:
      shape += [n // w, w]
      axes.append(len(shape) - 1)
  return x.reshape(shape), tuple(axes)


def _first_max_mask(windows: Array, axes: Window) -> Array:
  """True at the first maximum of each window, in row-major window order
  (where XLA's `select_and_scatter` with `ge` puts the gradient)."""
  sizes = [windows.shape[a] for a in axes]
  shape = [1] * windows.ndim
  for a, s in zip(axes, sizes):
    shape[a] = s
  index = jnp.asarray(np.arange(np.prod(sizes)).reshape(shape), jnp.int32)
  is_max = windows == jnp.max(windows, axis=axes, keepdims=True)
  first = jnp.min(jnp.where(is_max, index, np.iinfo(np.int32).max), axis=axes, keepdims=True)
  return index == first


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def window_max(x: Array, window: Window, padding: Padding) -> Array:
  """Max-pooling over non-overlapping windows as a reshape and a max.

  The value of `lax.reduce_window(x, -inf, lax.max, window, window, padding)`.
  Its derivative is the tangent at each window's first maximum (row-major
  order), the subgradient XLA's `select_and_scatter` (`select_prim=ge`)
  takes at ties, so gradients equal the untransformed ones where ReLU zeros tie.

  Args:
    x: the array to pool.
    window: the window's size (and stride) along each axis of `x`.
    padding: (low, high) padding with -inf along each axis.

  Returns:
    The maximum of each window.
  """
  windows, axes = _windows(x, window, padding, -jnp.inf)
  return jnp.max(windows, axis=axes)


@window_max.defjvp
def _window_max_jvp(
  window: Window, padding: Padding, primals: tuple[Array], tangents: tuple[Array]
) -> tuple[Array, Array]:
  (x,), (t,) = primals, tangents
  windows, axes = _windows(x, window, padding, -jnp.inf)
  mask = _first_max_mask(windows, axes)
  t_windows, _ = _windows(t, window, padding, 0)
  return (
    jnp.max(windows, axis=axes),
    jnp.sum(jnp.where(mask, t_windows, jnp.zeros_like(t_windows)), axis=axes),
  )


def window_sum(x: Array, window: Window, padding: Padding) -> Array:
  """Sum-pooling over non-overlapping windows as a reshape and a sum.

  The value of `lax.reduce_window(x, 0, lax.add, window, window, padding)`.

  Args:
    x: the array to pool.
    window: the window's size (and stride) along each axis of `x`.
    padding: (low, high) zero padding along each axis.

  Returns:
    The sum of each window.
  """
  windows, axes = _windows(x, window, padding, 0)
  return jnp.sum(windows, axis=axes)


def _pooling_window(eqn: jax_core.JaxprEqn) -> tuple[Window, Padding] | None:
  """(window, padding) of a non-overlapping reduce-window `eqn`, else None."""
  p = eqn.params
  if not non_overlapping(
    p["window_dimensions"],
    p["window_strides"],
    p["padding"],
    p["base_dilation"],
    p["window_dilation"],
  ):
    return None
  return tuple(p["window_dimensions"]), tuple(map(tuple, p["padding"]))


def reduce_window_max(eqn: jax_core.JaxprEqn, x: Array) -> list[Array] | None:
  """Rule for `reduce_window_max`: `window_max` where the windows are disjoint."""
  window = _pooling_window(eqn)
  return None if window is None else [window_max(x, *window)]


def reduce_window_sum(eqn: jax_core.JaxprEqn, x: Array) -> list[Array] | None:
  """Rule for `reduce_window_sum`: `window_sum` where the windows are disjoint."""
  window = _pooling_window(eqn)
  return None if window is None else [window_sum(x, *window)]


def upsample(
  eqn: jax_core.JaxprEqn, pad_eqn: jax_core.JaxprEqn, pad_inputs: Sequence[Array]
) -> list[Array] | None:
  """Rule for the gradient of `window_sum` as JAX writes it, as a broadcast.

  JAX writes it as a reduce-window sum of size k, stride 1, over the
  cotangent padded by k - 1 on both sides and between elements, which
  repeats each element k times.

  Args:
    eqn: the `reduce_window_sum` equation.
    pad_eqn: the `pad` equation that made its input.
    pad_inputs: the pad's operand and padding value.

  Returns:
    The repeated cotangent, or None where the equations are of another form.
  """
  p = eqn.params
  window = tuple(p["window_dimensions"])
  x, fill = pad_inputs
  ones = lambda d: all(v == 1 for v in d)
  if (
    not (ones(p["window_strides"]) and ones(p["base_dilation"]) and ones(p["window_dilation"]))
    or any(lo or hi for lo, hi in p["padding"])
    or any(
      tuple(config) != (k - 1,) * 3 for config, k in zip(pad_eqn.params["padding_config"], window)
    )
    or not isinstance(fill, int | float | np.ndarray | np.generic)
    or np.any(fill != 0)
  ):
    return None
  shape: list[int] = []
  tiled: list[int] = []
  for n, k in zip(x.shape, window):
    shape += [n, 1]
    tiled += [n, k]
  out = jnp.broadcast_to(x.reshape(shape), tiled)
  return [out.reshape([n * k for n, k in zip(x.shape, window)])]


def _max_pool_of(eqn: jax_core.JaxprEqn, dilations: bool) -> functools.partial | None:
  """`window_max` with the window of a `ge` select-and-* `eqn`, else None."""
  p = eqn.params
  dilation = (p["base_dilation"], p["window_dilation"]) if dilations else ()
  if p["select_prim"] is not lax.ge_p or not non_overlapping(
    p["window_dimensions"], p["window_strides"], p["padding"], *dilation
  ):
    return None
  return functools.partial(
    window_max, window=tuple(p["window_dimensions"]), padding=tuple(map(tuple, p["padding"]))
  )


def select_and_scatter_add(
  eqn: jax_core.JaxprEqn, source: Array, operand: Array
) -> list[Array] | None:
  """Rule for `select_and_scatter_add` (a max-pool's gradient): `window_max`'s VJP."""
  pool = _max_pool_of(eqn, dilations=False)
  if pool is None:
    return None
  _, vjp = jax.vjp(pool, operand)
  return list(vjp(source))


def select_and_gather_add(
  eqn: jax_core.JaxprEqn, tangent: Array, operand: Array
) -> list[Array] | None:
  """Rule for `select_and_gather_add` (a max-pool's JVP): `window_max`'s JVP."""
  pool = _max_pool_of(eqn, dilations=True)
  if pool is None:
    return None
  return [jax.jvp(pool, (operand,), (tangent,))[1]]
