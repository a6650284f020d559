"""The pieces of a feed-forward network whose Lipschitz constants multiply.

`find_factors` runs the network once under `nn.intercept_methods` and
records what each module contributes (a linear layer, a BatchNorm, a
module's own `lipschitz_constant()`); `pool_factors` reads the network's
jaxpr for the window reductions on the input's path.
"""

import math
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from jaxrobust import checks
from jaxrobust.spectral.layer import (
  KERNEL_LAYERS,
  LINEAR_PART,
  SpectralNorm,
  example_shape,
)
from jaxrobust.types import ApplyFn, Variables

# What `find_factors` records for one module: (name, kind, example shape,
# payload), the payload (layer clone, effective params) for "linear" and the
# factor, a float, otherwise.
Found = tuple[str, str, tuple[int, ...], Any]


class LayerFactor(NamedTuple):
  """One factor of the product in `lipschitz_bound`.

  Attributes:
    name: the module's path in the model ("/"-joined), or the primitive.
    kind: "linear" (Dense, Conv, ConvTranspose), "batch_norm",
      "lipschitz_constant" (a module's own method) or "pool" (a window
      reduction: overlapping max-pools, sum and average pools).
    input_shape: shape of one example of the factor's input.
    value: the factor, an upper bound on the piece's Lipschitz constant.
    method: how it was obtained: "svd" (exact, from the explicit matrix),
      "lanczos" (iteration times `lanczos_margin`), or "formula".
  """

  name: str
  kind: str
  input_shape: tuple
  value: float
  method: str


# Wrappers that only reparametrise the kernel of the layer inside them: that
# layer is seen with its effective kernel, so they add no factor of their own.
_REPARAMETRISATIONS = (SpectralNorm, nn.SpectralNorm, nn.WeightNorm)


def _module_name(module: nn.Module) -> str:
  path = getattr(module, "path", None) or (module.name or type(module).__name__,)
  return "/".join(str(p) for p in path)


def _own_variables(module: nn.Module) -> list[str]:
  """Names of the variables a module holds itself (not in its submodules)."""
  own = []
  for collection, tree in module.variables.items():
    own += [f"{collection}/{name}" for name, value in tree.items() if not hasattr(value, "items")]
  return own


def _classify(module: nn.Module) -> str:
  """ "transparent" (look inside), or the kind of factor the module contributes.

  Raises InputError for a module flagged `residual = True` and for a module
  that holds variables but is none of the known kinds.
  """
  name = _module_name(module)
  checks.require(
    getattr(module, "residual", False) is not True,
    f"lipschitz_bound cannot bound {name}: it is flagged residual, "
    "and the product of layer norms is no bound for x + f(x)",
  )
  if callable(getattr(module, "lipschitz_constant", None)):
    return "lipschitz_constant"
  if isinstance(module, KERNEL_LAYERS):
    return "linear"
  if isinstance(module, nn.BatchNorm):
    return "batch_norm"
  if isinstance(module, _REPARAMETRISATIONS):
    return "transparent"
  own = _own_variables(module)
  checks.require(
    not own,
    f"lipschitz_bound cannot bound {name}: {type(module).__name__} "
    f"holds variables {own} and is none of Dense, Conv, "
    "ConvTranspose, BatchNorm, a spectral or weight normalisation "
    "wrapper, or a module with a lipschitz_constant() method",
  )
  return "transparent"


def _concrete_float(name: str, value: Any) -> float:
  checks.require(
    checks.is_concrete(value), f"{name} is abstract: pass an apply_fn that is not jitted"
  )
  return float(np.asarray(value))


def _batch_norm_constant(module: nn.BatchNorm, args: tuple, kwargs: dict[str, Any]) -> float:
  """max |scale / sqrt(var + eps)| of a BatchNorm in inference mode."""
  name = _module_name(module)
  call_value = kwargs.get("use_running_average", args[1] if len(args) > 1 else None)
  running = nn.merge_param("use_running_average", module.use_running_average, call_value)
  checks.require(
    running is True,
    f"BatchNorm {name} runs in training mode (batch statistics): "
    "pass an apply_fn in inference mode",
  )
  stats = module.variables["batch_stats"]
  gain = jax.lax.rsqrt(jnp.asarray(stats["var"], jnp.float32) + module.epsilon)
  if module.use_scale:
    gain = gain * module.variables["params"]["scale"]
  return _concrete_float(f"BatchNorm {name}", jnp.max(jnp.abs(gain)))


def find_factors(
  apply_fn: ApplyFn, variables: Variables, input_shape: tuple[int, ...]
) -> list[Found]:
  """Runs the model once and returns what each module contributes, in call order.

  A module inside a contributing one is not looked at (its path extends the
  contributor's), nor are the layer copies `SpectralNorm` applies to measure
  its own norm (named `LINEAR_PART`).

  Args:
    apply_fn: `apply_fn(variables, x) -> logits`, inference mode, not jitted.
    variables: the model's variables.
    input_shape: the shape of one input example.

  Returns:
    (module name, kind, example shape, payload) for each contributing module
    (`Found`).
  """
  found: list[list[Any]] = []  # [path, (name, kind, example, payload)], filled as calls return

  def interceptor(next_fun: Callable[..., Any], args: tuple, kwargs: dict, context: Any) -> Any:
    module = context.module
    path = tuple(module.path)
    if (
      context.method_name != "__call__"
      or module.name == LINEAR_PART
      or any(path[: len(p)] == p for p, _ in found)
    ):
      return next_fun(*args, **kwargs)
    kind = _classify(module)
    if kind == "transparent":
      return next_fun(*args, **kwargs)
    entry = [path, None]
    found.append(entry)
    out = next_fun(*args, **kwargs)
    entry[1] = _factor(module, kind, args, kwargs)
    return out

  dummy = jnp.full((1, *input_shape), 0.5, jnp.float32)
  with nn.intercept_methods(interceptor):
    apply_fn(variables, dummy)
  checks.require(
    found,
    "lipschitz_bound found no Dense, Conv, BatchNorm or "
    "lipschitz_constant() module: apply_fn must call a Linen "
    "model's apply (not a jitted function)",
  )
  return [factor for _, factor in found]


def _factor(module: nn.Module, kind: str, args: tuple, kwargs: dict[str, Any]) -> Found:
  """(name, kind, example shape, payload) of a module that contributes."""
  name = _module_name(module)
  example = tuple(jnp.shape(args[0]))[1:]
  payload: Any
  if kind == "linear":
    params = dict(module.variables["params"])
    checks.require(
      checks.is_concrete(params["kernel"]),
      f"the kernel of {name} is abstract: pass an apply_fn that is not jitted",
    )
    example = example_shape(jnp.shape(args[0]), params["kernel"].ndim)
    payload = (module.clone(parent=None), params)
  elif kind == "batch_norm":
    payload = _batch_norm_constant(cast(nn.BatchNorm, module), args, kwargs)
  else:
    payload = _concrete_float(f"{name}.lipschitz_constant()", module.lipschitz_constant())
    checks.require(
      payload >= 0 and math.isfinite(payload),
      f"{name}.lipschitz_constant() must be finite and >= 0, got {payload!r}",
    )
  return name, kind, example, payload


def _window_factors(
  jaxpr: jex_core.Jaxpr, dependent: set[Any]
) -> Iterator[tuple[str, tuple[int, ...], float]]:
  """Yields (primitive, input shape, factor) for the window reductions in
  `jaxpr` (and the jaxprs nested in it) that depend on the `dependent` vars
  (the factors as `pool_factors` says)."""
  uses: dict[Any, list[jex_core.JaxprEqn]] = {}
  for eqn in jaxpr.eqns:
    for var in eqn.invars:
      if not isinstance(var, jex_core.Literal):
        uses.setdefault(var, []).append(eqn)
  for eqn in jaxpr.eqns:
    inputs = [v for v in eqn.invars if not isinstance(v, jex_core.Literal)]
    if not any(v in dependent for v in inputs):
      continue  # computes a constant, e.g. the window sizes of an average
    dependent.update(eqn.outvars)
    for sub in jex_core.jaxprs_in_params(eqn.params):
      yield from _window_factors(sub, set(sub.invars))
    name = eqn.primitive.name
    if not name.startswith("reduce_window"):
      continue
    checks.require(
      name in ("reduce_window_max", "reduce_window_min", "reduce_window_sum"),
      f"lipschitz_bound cannot bound the window reduction {name}",
    )
    params = eqn.params
    checks.require(
      all(d == 1 for d in params["base_dilation"]),
      f"lipschitz_bound cannot bound a {name} with base dilation {params['base_dilation']}",
    )
    windows = params["window_dimensions"]
    covering = math.prod(
      min(w, -(-((w - 1) * d + 1) // s))
      for w, s, d in zip(windows, params["window_strides"], params["window_dilation"])
    )
    factor = math.sqrt(covering)
    if name == "reduce_window_sum":
      factor *= math.sqrt(math.prod(windows))
      consumers = uses.get(eqn.outvars[0], [])
      if (
        len(consumers) == 1
        and consumers[0].primitive.name == "div"
        and consumers[0].invars[0] is eqn.outvars[0]
        and isinstance(consumers[0].invars[1], jex_core.Literal)
      ):
        factor /= abs(float(consumers[0].invars[1].val))
    if factor != 1.0:
      yield name, tuple(eqn.invars[0].aval.shape)[1:], factor  # type: ignore[attr-defined]


def pool_factors(
  apply_fn: ApplyFn, variables: Variables, input_shape: tuple[int, ...]
) -> list[LayerFactor]:
  """The factors of the window reductions on the network's input path.

  Max- and min-pools: |max_W a - max_W b| <= max_W |a - b|, so
  ||pool(a) - pool(b)||^2 <= c ||a - b||^2 for c the largest number of
  windows covering one pixel: factor sqrt(c), 1 without overlap. Sum pools:
  (sum_W d)^2 <= |W| sum_W d^2 (Cauchy-Schwarz), factor sqrt(c |W|), divided
  by q when the sum's only use is a division by a constant q (`nn.avg_pool`:
  q = |W|, e.g. 1/2 for 2x2 windows with stride 2). Other window reductions
  are refused (InputError).

  Args:
    apply_fn: `apply_fn(variables, x) -> logits`, inference mode.
    variables: the model's variables.
    input_shape: the shape of one input example.

  Returns:
    A `LayerFactor` of kind "pool" for each reduction whose factor is not 1.
  """
  dummy = jnp.full((1, *input_shape), 0.5, jnp.float32)
  jaxpr = jax.make_jaxpr(lambda x: apply_fn(variables, x))(dummy).jaxpr
  return [
    LayerFactor(name, "pool", shape, factor, "formula")
    for name, shape, factor in _window_factors(jaxpr, set(jaxpr.invars))
  ]
