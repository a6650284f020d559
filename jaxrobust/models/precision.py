"""Mixed precision: a model that computes in bfloat16 and keeps what it stores in float32.

`with_precision(model, precision="bfloat16")` is `model` (of the same class,
with the same fields and variables) whose `apply` runs the forward pass, and
so its backward pass, in bfloat16:

* bfloat16: the `params` collection's floating-point leaves, the input and
  every floating-point array keyword (a randomized model's `noise`) are
  cast to bfloat16 on entry, so every convolution and matrix product of the
  model runs on bfloat16 operands.
* float32: everything outside `apply`. The stored parameters (the cast is
  inside `apply`, so their gradients arrive in float32), the optimizer
  state, the other collections (batch statistics and spectral vectors are
  passed in as they are, BatchNorm reduces in float32, and the updated
  collections `mutable=` returns are cast to float32), the logits, and so
  the loss, an attack's iterates and its input gradients (the transpose of
  the cast).
* `init` is the model's: parameters are created in float32.

"float32" is the model itself. `apply_in(model, variables, x, ...,
compute_dtype=...)` is the same rule for any Flax Linen module, for callers
that keep their own wrapper.
"""

import dataclasses
import functools
from typing import Any, Literal, TypeAlias, cast

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxrobust import checks
from jaxrobust.types import Images, Variables

Precision: TypeAlias = Literal["float32", "bfloat16"]
PRECISIONS: tuple[Precision, ...] = ("float32", "bfloat16")
DEFAULT: Precision = "float32"
_FIELD = "compute_dtype"  # the field the mixed-precision class adds
_CLASSES: dict[type[nn.Module], type[nn.Module]] = {}


def check_precision(value: Any) -> Precision:
  """`value` if it is one of `PRECISIONS`, else an `InputError` naming it.

  Args:
    value: a config's or a flag's `precision`.

  Returns:
    `value`.
  """
  return cast(Precision, checks.one_of("precision", value, PRECISIONS))


def cast_floating(tree: Any, dtype: Any) -> Any:
  """`tree` with every floating-point array leaf cast to `dtype` (others unchanged).

  Args:
    tree: a pytree.
    dtype: the floating-point dtype.

  Returns:
    The cast tree.
  """

  def one(leaf: Any) -> Any:
    if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating):
      return leaf.astype(dtype)
    return leaf

  return jax.tree.map(one, tree)


def apply_in(
  model: nn.Module,
  variables: Variables,
  x: Images,
  *args: Any,
  compute_dtype: Any,
  **kwargs: Any,
) -> Any:
  """`model.apply(variables, x, *args, **kwargs)` computed in `compute_dtype`.

  The `params` collection, `x` and the floating-point array arguments are
  cast to `compute_dtype`; the other collections are passed as they are;
  every floating-point leaf of the result (logits, updated collections) is
  cast to float32.

  Args:
    model: a Flax Linen module.
    variables: its variables, float32.
    x: the input.
    *args: `apply`'s other positional arguments.
    compute_dtype: the dtype the model computes in (bfloat16).
    **kwargs: `apply`'s keywords (`train`, `mutable`, `method`, `noise`).

  Returns:
    What `model.apply` returns, its floating-point leaves float32.
  """
  return _cast_call(model.apply, variables, x, args, kwargs, compute_dtype)


def _cast_call(
  apply: Any, variables: Variables, x: Images, args: tuple, kwargs: dict, compute_dtype: Any
) -> Any:
  """`apply(variables, x, *args, **kwargs)` with `apply_in`'s casts."""
  variables = dict(variables)
  if "params" in variables:
    variables["params"] = cast_floating(variables["params"], compute_dtype)
  args, kwargs = cast_floating((args, kwargs), compute_dtype)
  out = apply(variables, cast_floating(x, compute_dtype), *args, **kwargs)
  return cast_floating(out, jnp.float32)


def _mixed_class(cls: type[nn.Module]) -> type[nn.Module]:
  """`cls` with a `compute_dtype` field and `apply` computing in it (one per class)."""
  if cls not in _CLASSES:

    def apply(self: nn.Module, variables: Variables, x: Images, *args: Any, **kwargs: Any) -> Any:
      plain = functools.partial(cls.apply, self)  # the class's own apply, uncast
      return _cast_call(plain, variables, x, args, kwargs, getattr(self, _FIELD))

    namespace = {
      "__annotations__": {_FIELD: str},
      _FIELD: "bfloat16",
      "apply": apply,
      "__module__": cls.__module__,
      "__qualname__": f"Mixed{cls.__qualname__}",
      "__doc__": f"{cls.__name__} computing in `{_FIELD}` (`jaxrobust.models.precision`).",
    }
    _CLASSES[cls] = type(f"Mixed{cls.__name__}", (cls,), namespace)
  return _CLASSES[cls]


def _fields(model: nn.Module) -> dict[str, Any]:
  skip = {"parent", "name", _FIELD}
  return {f.name: getattr(model, f.name) for f in dataclasses.fields(model) if f.name not in skip}


def precision_of(model: nn.Module) -> Precision:
  """The precision `model` computes in: "bfloat16" for `with_precision`'s, else "float32".

  Args:
    model: a Flax Linen module.

  Returns:
    One of `PRECISIONS`.
  """
  return cast(Precision, getattr(model, _FIELD, DEFAULT))


def float32_model(model: nn.Module) -> nn.Module:
  """The model `with_precision` was given: of the original class, computing in float32.

  Args:
    model: a Flax Linen module, mixed-precision or not.

  Returns:
    `model` itself when it computes in float32.
  """
  if precision_of(model) == DEFAULT:
    return model
  base = next(c for c in type(model).__mro__ if c not in _CLASSES.values())
  return base(**_fields(model))


def with_precision(model: nn.Module, *, precision: str) -> nn.Module:
  """`model` computing in `precision`, everything it stores and returns float32.

  Args:
    model: a Flax Linen module (a jaxrobust model, or any whose `apply`
      takes the input first).
    precision: one of `PRECISIONS`. "float32" gives the plain model.

  Returns:
    A module of a subclass of `model`'s class, with its fields and the same
    variables, whose `apply` casts as the module's doc says; equal models
    and precisions give equal (and equally hashed) modules.

  Raises:
    InputError: a precision not in `PRECISIONS`.
  """
  precision = check_precision(precision)
  plain = float32_model(model)
  if precision == DEFAULT:
    return plain
  return _mixed_class(type(plain))(**_fields(plain), **{_FIELD: precision})
