"""A model as the functions jaxrobust calls: `logits_fn(x)`, or `(apply_fn, variables)`.

Attacks and smoothing call a model as `logits_fn(x) -> logits [B, K]` on
images in [0, 1], in inference mode. Where one compiled program should serve
many parameter values (`evaluation.evaluate`, an attack inside your own
jitted step), the model is the pair `(apply_fn, variables)` with
`apply_fn(variables, x) -> logits`: the variables are then an argument of
the compiled program, not constants baked into it, so it compiles once and
never runs on stale weights.

`split(model, variables)` gives that pair for a Flax Linen module (called
with `train=False`, `deterministic=True`, `use_running_average=True`, as its
`__call__` names them, and no collection mutable) or a Flax NNX module (its
state as the variables, run on a copy in eval mode: the module is never
changed); `logits_fn(model, variables)` is `apply_fn` with the variables
bound.
"""

import dataclasses
import inspect
import weakref
from typing import Any, cast

import flax
import jax
import jax.numpy as jnp
from flax import linen, nnx

from jaxrobust import checks
from jaxrobust.types import ApplyFn, Images, Logits, LogitsFn, Variables

# Keyword arguments of a Linen `__call__` that select training behaviour,
# with their inference value.
INFERENCE_KEYWORDS = {
  "train": False,
  "training": False,
  "is_training": False,
  "deterministic": True,
  "use_running_average": True,
}


@dataclasses.dataclass(frozen=True)
class LinenApply:
  """`(variables, x) -> module.apply(variables, x, **keywords)`, nothing mutable.

  Equal modules give equal (and equally hashed) functions, so compiled
  programs cached by model function are reused.

  Attributes:
    module: a Flax Linen module.
    keywords: `(name, value)` pairs of the inference keywords its `__call__` takes.
  """

  module: linen.Module
  keywords: tuple[tuple[str, Any], ...] = ()

  def __call__(self, variables: Variables, x: Images) -> Logits:
    logits = self.module.apply(variables, x, mutable=False, **dict(self.keywords))
    return cast(Logits, logits)


@dataclasses.dataclass(frozen=True)
class NNXApply:
  """`(state, x) -> logits` of the NNX module of graph `graphdef` on `state`, in eval mode.

  The module is rebuilt from (`graphdef`, `state`): the caller's is never changed.

  Attributes:
    graphdef: the module's graph (`nnx.split`).
  """

  graphdef: Any

  def __call__(self, state: Variables, x: Images) -> Logits:
    module = nnx.merge(self.graphdef, state)
    module.eval()
    return module(x)


def split(
  model: linen.Module | nnx.Module, variables: Variables = None
) -> tuple[ApplyFn, Variables]:
  """`(apply_fn, variables)` of a Flax model, `apply_fn(variables, x) -> logits` in inference mode.

  Args:
    model: a Flax Linen module (with `variables`) or an NNX module (its own
      state: `variables` must be None).
    variables: the Linen module's variables (`params`, `batch_stats`, ...).

  Returns:
    `(apply_fn, variables)`. For an NNX module the variables are
    `nnx.state(model)` now: after updating the module, pass `nnx.state(model)`
    again (the `apply_fn` stays the same while the module's structure does).
  """
  if isinstance(model, nnx.Module):
    checks.require(
      variables is None, "an NNX module holds its own state: call split(model) without variables"
    )
    graphdef, state = nnx.split(model)
    return NNXApply(graphdef), state
  if isinstance(model, linen.Module):
    checks.require(
      variables is not None, "a Linen module needs its variables: split(model, variables)"
    )
    return LinenApply(model, _inference_keywords(model)), variables
  raise checks.InputError(
    f"split takes a Flax Linen or NNX module, got {type(model).__name__}; "
    "a plain function is already a logits_fn"
  )


def logits_fn(model: linen.Module | nnx.Module, variables: Variables = None) -> LogitsFn:
  """`x -> logits` of a Flax Linen or NNX module in inference mode.

  Args:
    model: a Flax Linen module (with `variables`) or an NNX module.
    variables: the Linen module's variables; None for an NNX module.

  Returns:
    `split(model, variables)`'s `apply_fn` with the variables bound.
  """
  apply_fn, variables = split(model, variables)
  return lambda x: apply_fn(variables, x)


_CONSTANT_APPLY: "weakref.WeakKeyDictionary[LogitsFn, ApplyFn]" = weakref.WeakKeyDictionary()


def constant_apply(logits_fn: LogitsFn) -> ApplyFn:
  """`(variables, x) -> logits_fn(x)`, the variables ignored.

  A `logits_fn` where an `apply_fn` is taken: the same object for the same
  `logits_fn` (held weakly), so programs compiled for it are reused (its
  weights are constants in them).

  Args:
    logits_fn: `x -> logits`.

  Returns:
    `apply_fn(variables, x) = logits_fn(x)`.
  """
  if logits_fn not in _CONSTANT_APPLY:
    # A weak reference: the entry must not keep its own key alive.
    ref = weakref.ref(logits_fn)
    _CONSTANT_APPLY[logits_fn] = lambda variables, x: cast(LogitsFn, ref())(x)
  return _CONSTANT_APPLY[logits_fn]


def _inference_keywords(module: linen.Module) -> tuple[tuple[str, Any], ...]:
  parameters = inspect.signature(type(module).__call__).parameters
  names = list(parameters)[1:]  # after self
  keywords = {k: v for k, v in INFERENCE_KEYWORDS.items() if k in parameters}
  required = [
    n
    for n in names[1:]
    if parameters[n].default is inspect.Parameter.empty
    and parameters[n].kind
    in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    and n not in keywords
  ]
  checks.require(
    not required,
    f"{type(module).__name__}.__call__ needs {', '.join(map(repr, required))} besides the images; "
    "wrap it yourself: apply_fn = lambda variables, x: module.apply(variables, x, ...)",
  )
  return tuple(sorted(keywords.items()))


def check_apply_fn(apply_fn: ApplyFn, variables: Variables, x: Images) -> None:
  """Checks that `apply_fn(variables, x)` gives logits [B, K] (shapes only, no compute).

  Args:
    apply_fn: `(variables, x) -> logits`.
    variables: its variables.
    x: a batch of images.

  Raises:
    InputError: saying what is expected when the model needs a `train`
      argument, mutates a collection (BatchNorm in training mode), or
      returns a tuple or a dict.
  """
  try:
    out = jax.eval_shape(apply_fn, variables, jnp.asarray(x))
  except (TypeError, flax.errors.FlaxError) as e:
    raise checks.InputError(
      f"the model failed on a batch of images {tuple(x.shape)}: {_first_line(e)}. "
      "apply_fn(variables, x) must return logits in inference mode; for a Flax model with "
      "train/mutable conventions use apply_fn, variables = jaxrobust.models.inference.split(model, "
      "variables)"
    ) from None
  checks.require(
    hasattr(out, "shape"),
    f"the model must return one array of logits [batch, classes], got a {type(out).__name__}; "
    "pick the logits out: apply_fn = lambda variables, x: model.apply(variables, x)[0]",
  )
  checks.require(
    len(out.shape) == 2 and out.shape[0] == x.shape[0],
    f"the model must return logits [batch, classes], got shape {tuple(out.shape)} for a batch "
    f"of {x.shape[0]}",
  )


def _first_line(error: BaseException) -> str:
  return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
