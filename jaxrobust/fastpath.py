"""The CPU fast path: `fast(fn)` is `fn`, computed in the forms XLA:CPU runs fast.

`fast` is a function transform, like `jax.jit` or `jax.grad`: it traces `fn`
to a jaxpr and evaluates it again with some primitives written differently.
The values are those of `fn` (up to float rounding); only the computation
changes, and only on the CPU backend (on GPU and TPU `fast(fn) is fn`). It
works on any JAX function: Flax Linen or NNX models, bare `jax.lax` code,
and functions that already differentiate them (`fast(jax.grad(loss))`).

The rewrites (each falls back to the original primitive where its
conditions fail):

* `conv_general_dilated` -> the same convolution in canonical dimension
  numbers (input [N, spatial..., C], kernel [spatial..., I, O]) between
  explicit transposes. XLA:CPU runs a non-canonical convolution inside a
  `while` loop as a naive loop; the input gradient of any convolution is
  non-canonical ([spatial..., O, I] kernel), so a CNN's input gradient ran
  about 5x slower in a loop body (DESIGN.md).
  Small-channel convolutions (`SMALL_CHANNELS`) get zero input and output
  channels up to a multiple of `CHANNEL_MULTIPLE`, and the output is sliced
  back: XLA:CPU vectorises its convolutions over channels, and a 3->6
  convolution ran 2.4x faster padded to 8->8.
* `reduce_window_max` over non-overlapping windows (window == stride, no
  dilation; any non-negative padding: `nn.max_pool`, `lax.reduce_window`
  with `lax.max`) -> pad with -inf, reshape into windows, max. Its gradient
  is elementwise, where XLA's is a `select_and_scatter`, a slow loop on
  XLA:CPU. Subgradient at ties: the whole gradient goes to the FIRST maximum
  of each window in row-major window order, exactly as XLA's
  select-and-scatter (`select_prim=ge`) gives it, so gradients equal the
  untransformed ones even where ReLU zeros tie.
* `select_and_scatter_add` (that gradient, in a function already
  differentiated) and `select_and_gather_add` (its forward-mode twin) with
  `select_prim=ge` over non-overlapping windows -> the same elementwise form.
* `reduce_window_sum` over non-overlapping windows (`nn.avg_pool`) ->
  reshape and sum; gradient: a broadcast instead of a padded reduce-window.
* Higher-order primitives: `jit`/`pjit` and `closed_call` are inlined and
  rewritten; `checkpoint` (remat), `scan`, `while` and `cond` are rebuilt
  around their rewritten bodies with the same settings; `custom_jvp_call`,
  `custom_vjp_call`, `shard_map` and any other primitive are bound as they
  are (their custom rules stay; their insides are not rewritten).

The transform reads JAX internals (primitive names and parameters of jax
0.10): `tests/test_fastpath.py` pins what it reads and fails if an upgrade
changes it. Use it under `jax.jit` (it traces `fn` on every call).
"""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jax_core

# Convolutions with at most `SMALL_CHANNELS` input and output channels get
# zero channels up to a multiple of `CHANNEL_MULTIPLE` (8 floats, one AVX2
# register), the same values at a fraction of the time: XLA:CPU's
# convolution kernels vectorise over channels. Measured on the seed network
# (5x5, 3->6->16; `python benchmarks/run.py --model seed_cnn --rows
# pgd_linf`, batch 256, in one run): PGD-10 1.68x faster than with patches and
# a matrix product, the rewrite this replaced, and a first layer 3->6 alone
# (one device, batch 500): forward 98 -> 42 ms, input gradient 252 -> 99 ms.
# Wider layers (3->32) got slower padded, hence both counts small.
# CHANNEL_MULTIPLE = None turns it off.
SMALL_CHANNELS = 16
CHANNEL_MULTIPLE = 8


_disabled = []  # `disabled()` contexts entered and not yet left


def enabled():
  """Whether `fast` rewrites anything: on the CPU backend, outside `disabled()`."""
  return jax.default_backend() == "cpu" and not _disabled


@contextlib.contextmanager
def disabled():
  """Within it, `fast(fn)` is `fn` (decided when `fast` is called, e.g. while
  a jitted function traces): to measure what the fast path is worth."""
  _disabled.append(True)
  try:
    yield
  finally:
    _disabled.pop()


def fast(fn):
  """`fn` computed in the forms XLA:CPU runs fast; the identity off CPU.

  Args:
    fn: any function of arrays (pytrees) that JAX can trace.

  Returns:
    A function with `fn`'s signature and values (up to float rounding),
    gradients included, whose primitives are rewritten as the module
    docstring lists. On GPU or TPU, `fn` itself.
  """
  if not enabled():
    return fn

  @functools.wraps(fn)
  def rewritten(*args, **kwargs):
    closed, out_shape = jax.make_jaxpr(functools.partial(fn, **kwargs), return_shape=True)(*args)
    outs = evaluate(closed.jaxpr, closed.consts, jax.tree.leaves(args))
    return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

  return rewritten


# The attacks' name for it since the convolution-only version.
canonical_convolutions = fast


def evaluate(jaxpr, consts, args):
  """Evaluates `jaxpr` on `args` with every primitive rewritten (`_RULES`)."""
  env = dict(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  read = lambda v: v.val if isinstance(v, jax_core.Literal) else env[v]
  padded = {}  # the outputs of `pad`: (its equation, its inputs)
  for eqn in jaxpr.eqns:
    inputs = [read(v) for v in eqn.invars]
    if eqn.primitive.name == "pad":
      padded[eqn.outvars[0]] = (eqn, inputs)
    rule = _RULES.get(eqn.primitive.name)
    outs = None
    if eqn.primitive.name == "reduce_window_sum" and eqn.invars[0] in padded:
      outs = _upsample(eqn, *padded[eqn.invars[0]])
    if outs is None and rule is not None:
      outs = rule(eqn, *inputs)
    if outs is None:
      outs = _bind(eqn, inputs)
    env.update(zip(eqn.outvars, outs))
  return [read(v) for v in jaxpr.outvars]


def _bind(eqn, inputs):
  with eqn.ctx.manager:
    outs = eqn.primitive.bind(*inputs, **eqn.primitive.get_bind_params(eqn.params))
  return outs if eqn.primitive.multiple_results else [outs]


def _closed(closed_jaxpr):
  """A Python function evaluating a ClosedJaxpr with the rewrites."""
  return lambda *args: evaluate(closed_jaxpr.jaxpr, closed_jaxpr.consts, args)


# ----------------------------------------------------------------------------
# Pooling.


def non_overlapping(window, strides, padding, base_dilation=None, window_dilation=None):
  """Whether a reduce-window is over disjoint windows that `_windows` can form."""
  ones = lambda d: d is None or all(v == 1 for v in d)
  return (
    tuple(window) == tuple(strides)
    and ones(base_dilation)
    and ones(window_dilation)
    and all(lo >= 0 and hi >= 0 for lo, hi in padding)
  )


def _windows(x, window, padding, fill):
  """`x` padded with `fill`, cut to whole windows and reshaped so that each
  window dimension w > 1 splits into (blocks, w); returns it and the window axes."""
  x = lax.pad(x, jnp.asarray(fill, x.dtype), [(lo, hi, 0) for lo, hi in padding])
  x = x[tuple(slice(0, n // w * w) for n, w in zip(x.shape, window))]
  shape, axes = [], []
  for n, w in zip(x.shape, window):
    if w == 1:
      shape.append(n)
    else:
      shape += [n // w, w]
      axes.append(len(shape) - 1)
  return x.reshape(shape), tuple(axes)


def _first_max_mask(windows, axes):
  """True at the first maximum of each window, in row-major window order
  (where XLA's `select_and_scatter` with `ge` puts the gradient)."""
  sizes = [windows.shape[a] for a in axes]
  index = np.arange(np.prod(sizes)).reshape(sizes)
  shape = [1] * windows.ndim
  for a, s in zip(axes, sizes):
    shape[a] = s
  index = jnp.asarray(index.reshape(shape), jnp.int32)
  is_max = windows == jnp.max(windows, axis=axes, keepdims=True)
  first = jnp.min(jnp.where(is_max, index, np.iinfo(np.int32).max), axis=axes, keepdims=True)
  return index == first


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def window_max(x, window, padding):
  """`lax.reduce_window(x, -inf, lax.max, window, window, padding)` as a
  reshape and a max. Derivative: the tangent at each window's first maximum."""
  windows, axes = _windows(x, window, padding, -jnp.inf)
  return jnp.max(windows, axis=axes)


@window_max.defjvp
def _window_max_jvp(window, padding, primals, tangents):
  (x,), (t,) = primals, tangents
  windows, axes = _windows(x, window, padding, -jnp.inf)
  mask = _first_max_mask(windows, axes)
  t_windows, _ = _windows(t, window, padding, 0)
  return (
    jnp.max(windows, axis=axes),
    jnp.sum(jnp.where(mask, t_windows, jnp.zeros_like(t_windows)), axis=axes),
  )


def window_sum(x, window, padding):
  """`lax.reduce_window(x, 0, lax.add, window, window, padding)` as a reshape and a sum."""
  windows, axes = _windows(x, window, padding, 0)
  return jnp.sum(windows, axis=axes)


def _pooling_window(eqn):
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


def _reduce_window_max(eqn, x):
  window = _pooling_window(eqn)
  return None if window is None else [window_max(x, *window)]


def _reduce_window_sum(eqn, x):
  window = _pooling_window(eqn)
  return None if window is None else [window_sum(x, *window)]


def _upsample(eqn, pad_eqn, pad_inputs):
  """The gradient of `window_sum` as JAX writes it: a reduce-window sum of
  size k, stride 1, over its cotangent padded by k - 1 on both sides and
  between elements, which repeats each element k times; as a broadcast."""
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
    or not isinstance(fill, (int, float, np.ndarray, np.generic))
    or np.any(fill != 0)
  ):
    return None
  shape, tiled = [], []
  for n, k in zip(x.shape, window):
    shape += [n, 1]
    tiled += [n, k]
  out = jnp.broadcast_to(x.reshape(shape), tiled)
  return [out.reshape([n * k for n, k in zip(x.shape, window)])]


def _select_and_scatter_add(eqn, source, operand):
  p = eqn.params
  if p["select_prim"] is not lax.ge_p or not non_overlapping(
    p["window_dimensions"], p["window_strides"], p["padding"]
  ):
    return None
  pool = functools.partial(
    window_max, window=tuple(p["window_dimensions"]), padding=tuple(map(tuple, p["padding"]))
  )
  _, vjp = jax.vjp(pool, operand)
  return list(vjp(source))


def _select_and_gather_add(eqn, tangent, operand):
  p = eqn.params
  if p["select_prim"] is not lax.ge_p or not non_overlapping(
    p["window_dimensions"],
    p["window_strides"],
    p["padding"],
    p["base_dilation"],
    p["window_dilation"],
  ):
    return None
  pool = functools.partial(
    window_max, window=tuple(p["window_dimensions"]), padding=tuple(map(tuple, p["padding"]))
  )
  return [jax.jvp(pool, (operand,), (tangent,))[1]]


# ----------------------------------------------------------------------------
# Convolutions.


def _conv(eqn, lhs, rhs):
  params = dict(eqn.params)
  dimension_numbers = params.pop("dimension_numbers")
  lhs_spec, rhs_spec, out_spec = dimension_numbers
  c_in, c_out = lhs.shape[lhs_spec[1]], rhs.shape[rhs_spec[0]]
  if not _pads_channels(lhs, rhs, c_in, c_out, rhs.shape[rhs_spec[1]], params):
    return [canonical_conv(lhs, rhs, dimension_numbers=dimension_numbers, **params)]
  up = lambda c: -(-c // CHANNEL_MULTIPLE) * CHANNEL_MULTIPLE
  lhs = _pad_axis(lhs, lhs_spec[1], up(c_in) - c_in)
  rhs = _pad_axis(_pad_axis(rhs, rhs_spec[1], up(c_in) - c_in), rhs_spec[0], up(c_out) - c_out)
  out = canonical_conv(lhs, rhs, dimension_numbers=dimension_numbers, **params)
  return [lax.slice_in_dim(out, 0, c_out, axis=out_spec[1])]


def _pads_channels(lhs, rhs, c_in, c_out, kernel_in, params):
  """Whether a convolution gets zero channels up to `CHANNEL_MULTIPLE`: both
  channel counts at most `SMALL_CHANNELS`, not both multiples already, no
  grouping, floating point."""
  return (
    CHANNEL_MULTIPLE is not None
    and max(c_in, c_out) <= SMALL_CHANNELS
    and (c_in % CHANNEL_MULTIPLE or c_out % CHANNEL_MULTIPLE)
    and kernel_in == c_in
    and params["feature_group_count"] == 1
    and params["batch_group_count"] == 1
    and params.get("preferred_element_type") is None
    and jnp.issubdtype(lhs.dtype, jnp.floating)
    and jnp.issubdtype(rhs.dtype, jnp.floating)
  )


def _pad_axis(x, axis, extra):
  """`x` with `extra` zeros appended along `axis`."""
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths)


def canonical_conv(lhs, rhs, *, dimension_numbers, **params):
  """`conv_general_dilated` with canonical dimension numbers and explicit transposes."""
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


# ----------------------------------------------------------------------------
# Higher-order primitives.


def _inline(eqn, *inputs):
  closed = eqn.params["jaxpr"] if "jaxpr" in eqn.params else eqn.params["call_jaxpr"]
  return evaluate(closed.jaxpr, closed.consts, inputs)


def _checkpoint(eqn, *inputs):
  p = eqn.params
  body = lambda *args: evaluate(p["jaxpr"], (), args)
  return jax.checkpoint(body, prevent_cse=p["prevent_cse"], policy=p["policy"])(*inputs)


def _scan(eqn, *inputs):
  p = eqn.params
  n_consts, n_carry = p["num_consts"], p["num_carry"]
  consts, carry, xs = (
    list(inputs[:n_consts]),
    list(inputs[n_consts : n_consts + n_carry]),
    list(inputs[n_consts + n_carry :]),
  )
  body = _closed(p["jaxpr"])

  def step(carry, x):
    outs = body(*consts, *carry, *x)
    return list(outs[:n_carry]), list(outs[n_carry:])

  carry, ys = lax.scan(
    step, carry, xs, length=p["length"], reverse=p["reverse"], unroll=p["unroll"]
  )
  return [*carry, *ys]


def _while(eqn, *inputs):
  p = eqn.params
  nc, nb = p["cond_nconsts"], p["body_nconsts"]
  cond_consts, body_consts, init = inputs[:nc], inputs[nc : nc + nb], list(inputs[nc + nb :])
  cond, body = _closed(p["cond_jaxpr"]), _closed(p["body_jaxpr"])
  return lax.while_loop(
    lambda c: cond(*cond_consts, *c)[0], lambda c: list(body(*body_consts, *c)), init
  )


def _cond(eqn, index, *operands):
  branches = [_closed(b) for b in eqn.params["branches"]]
  return list(lax.switch(index, [lambda *ops, b=b: list(b(*ops)) for b in branches], *operands))


_RULES = {
  "conv_general_dilated": _conv,
  "reduce_window_max": _reduce_window_max,
  "reduce_window_sum": _reduce_window_sum,
  "select_and_scatter_add": _select_and_scatter_add,
  "select_and_gather_add": _select_and_gather_add,
  "jit": _inline,
  "pjit": _inline,
  "closed_call": _inline,
  "checkpoint": _checkpoint,
  "remat2": _checkpoint,
  "scan": _scan,
  "while": _while,
  "cond": _cond,
}
