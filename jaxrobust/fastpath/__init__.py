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
  numbers between explicit transposes; small-channel convolutions padded with
  zero channels (`convolution`).
* `reduce_window_max` over non-overlapping windows (`nn.max_pool`,
  `lax.reduce_window` with `lax.max`) -> a reshape and a max whose gradient
  is elementwise, where XLA's is a `select_and_scatter`; at ties the whole
  gradient goes to the first maximum of each window, as XLA's does
  (`pooling`). `select_and_scatter_add` and `select_and_gather_add` (that
  gradient in a function already differentiated, and its forward-mode twin)
  get the same form.
* `reduce_window_sum` over non-overlapping windows (`nn.avg_pool`) -> a
  reshape and a sum; its gradient: a broadcast.
* Higher-order primitives are rebuilt around their rewritten bodies
  (`interpreter`).

docs/performance.md says why each rewrite pays on XLA:CPU and how to measure
it. `with disabled():` turns the rewrites off; the switch is part of
`jax.jit`'s cache key, so a function compiled outside it is traced again
inside. The transform reads JAX internals (primitive names and parameters):
`tests/test_fastpath.py` pins what it reads. Use it under `jax.jit` (it
traces `fn` on every call).
"""

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import ParamSpec, TypeVar

import jax

from jaxrobust.fastpath.convolution import CHANNEL_MULTIPLE, SMALL_CHANNELS, canonical_conv
from jaxrobust.fastpath.interpreter import RULES as _RULES
from jaxrobust.fastpath.interpreter import evaluate
from jaxrobust.fastpath.pooling import non_overlapping, window_max, window_sum

P = ParamSpec("P")
R = TypeVar("R")

# True within `disabled()`. A user context is part of jit's tracing and
# compilation cache keys, so a cached program never outlives a switch.
_DISABLED = jax.make_user_context(default_value=False)


def enabled() -> bool:
  """Whether `fast` rewrites now: on the CPU backend, outside `disabled()`.

  Returns:
    True where a call of a `fast` function evaluates the rewritten program.
  """
  return jax.default_backend() == "cpu" and not _DISABLED.value


@contextlib.contextmanager
def disabled() -> Iterator[None]:
  """A context within which every `fast(fn)` computes `fn` as it is.

  The switch is read when a `fast` function is called (while a jitted
  function traces) and is part of `jax.jit`'s cache key: a function jitted
  and called outside the context traces and compiles again inside it, and
  its first program is used again after. Use it to measure what the fast
  path is worth.

  Yields:
    None.
  """
  with _DISABLED(True):
    yield


def fast(fn: Callable[P, R]) -> Callable[P, R]:
  """`fn` computed in the forms XLA:CPU runs fast; the identity off CPU.

  Args:
    fn: any function of arrays (pytrees) that JAX can trace.

  Returns:
    A function with `fn`'s signature and values (up to float rounding),
    gradients included, whose primitives are rewritten as the module
    docstring lists (within `disabled()`, `fn` as it is). On GPU or TPU,
    `fn` itself.
  """
  if jax.default_backend() != "cpu":
    return fn

  @functools.wraps(fn)
  def rewritten(*args: P.args, **kwargs: P.kwargs) -> R:
    if not enabled():
      return fn(*args, **kwargs)
    closed, out_shape = jax.make_jaxpr(functools.partial(fn, **kwargs), return_shape=True)(*args)
    outs = evaluate(closed.jaxpr, closed.consts, jax.tree.leaves(args))
    return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

  return rewritten


# The attacks' name for `fast`.
canonical_convolutions = fast

__all__ = [
  "CHANNEL_MULTIPLE",
  "SMALL_CHANNELS",
  "canonical_conv",
  "canonical_convolutions",
  "disabled",
  "enabled",
  "evaluate",
  "fast",
  "non_overlapping",
  "window_max",
  "window_sum",
]
