"""Argument and input validation shared by the library and the command lines.

Every user mistake raises `InputError` with one sentence naming the bad value.
The command-line tools print that sentence and exit with code 2 (no traceback).
Shape checks run when a function is called or traced. Value checks (images
in [0, 1] and not NaN, labels in range, eps finite and > 0) run on the host
when the values are concrete; when they are traced (inside `jax.jit`,
`lax.scan`, `vmap`, ...), `on_device` checks them where they are computed:
a host callback of a few scalars, which raises the same `InputError` when
the program runs (JAX wraps it in a `JaxRuntimeError` whose message ends
with ours). The library's own compiled programs, whose inputs it checked on
the host, trace their attacks inside `trusted()` and carry no callback.
"""

import contextlib
import contextvars
import math
import numbers
import os
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import ArrayLike

Number = TypeVar("Number", bound=float)  # int or float
T = TypeVar("T")


class InputError(ValueError):
  """A bad argument, input array, file or setting supplied by the user."""


def require(condition: Any, message: str) -> None:
  """Raises `InputError(message)` unless `condition` holds.

  Args:
    condition: the condition (its truth value).
    message: one sentence naming the bad value.

  Raises:
    InputError: when `condition` is false.
  """
  if not condition:
    raise InputError(message)


def writable_folder(flag: str, path: os.PathLike[str] | str) -> None:
  """Refuses an output `path` (given by `flag`) whose folder does not exist or
  cannot be written, naming the flag, the path and the folder.

  Args:
    flag: the option that named `path` ("--out").
    path: the file or directory to be written.
  """
  folder = Path(path).absolute().parent
  require(
    folder.is_dir(), f"cannot write {flag} {str(path)!r}: folder {str(folder)!r} does not exist"
  )
  require(
    os.access(folder, os.W_OK | os.X_OK),
    f"cannot write {flag} {str(path)!r}: no write permission in {str(folder)!r}",
  )


def positive(name: str, value: Number) -> Number:
  """Returns `value` if it is a finite number > 0, else raises `InputError`.

  Args:
    name: the argument's name, for the message.
    value: the value to check.

  Returns:
    `value`.
  """
  require(
    isinstance(value, numbers.Real) and math.isfinite(value) and value > 0,
    f"{name} must be a finite number > 0, got {value!r}",
  )
  return value


def non_negative(name: str, value: Number) -> Number:
  """Returns `value` if it is a finite number >= 0, else raises `InputError`.

  Args:
    name: the argument's name, for the message.
    value: the value to check.

  Returns:
    `value`.
  """
  require(
    isinstance(value, numbers.Real) and math.isfinite(value) and value >= 0,
    f"{name} must be a finite number >= 0, got {value!r}",
  )
  return value


def integer_at_least(name: str, value: int, minimum: int) -> int:
  """Returns `value` if it is an integer >= `minimum`, else raises `InputError`.

  Args:
    name: the argument's name, for the message.
    value: the value to check (a bool is refused).
    minimum: the smallest value allowed.

  Returns:
    `value` as a Python int.
  """
  require(
    isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum,
    f"{name} must be an integer >= {minimum}, got {value!r}",
  )
  return int(value)


def in_interval(
  name: str,
  value: Number,
  low: float,
  high: float,
  *,
  closed: tuple[bool, bool] = (True, True),
) -> Number:
  """Returns `value` if it lies in the interval from `low` to `high`.

  Args:
    name: the argument's name, for the message.
    value: the value to check (a finite number).
    low: the interval's lower end.
    high: its upper end.
    closed: whether each end belongs to the interval.

  Returns:
    `value`.
  """
  ok_low = value >= low if closed[0] else value > low
  ok_high = value <= high if closed[1] else value < high
  require(
    isinstance(value, numbers.Real) and math.isfinite(value) and ok_low and ok_high,
    f"{name} must lie in {'[' if closed[0] else '('}{low}, {high}"
    f"{']' if closed[1] else ')'}, got {value!r}",
  )
  return value


def one_of(name: str, value: T, choices: Collection[T]) -> T:
  """Returns `value` if it is one of `choices`, else raises `InputError`.

  Args:
    name: what the value names, for the message.
    value: the value to check.
    choices: the values allowed.

  Returns:
    `value`.
  """
  require(
    value in choices, f"unknown {name} {value!r}; choose one of {', '.join(map(repr, choices))}"
  )
  return value


def known_keys(what: str, given: Iterable[str], allowed: Iterable[str]) -> None:
  """Refuses a setting of `what` that is not one of `allowed`, naming it.

  Args:
    what: what the settings configure, for the message.
    given: the settings' names.
    allowed: the names allowed.
  """
  unknown = sorted(set(given) - set(allowed))
  require(
    not unknown,
    f"{what} has no setting {unknown[0]!r}; choose from {', '.join(sorted(allowed))}"
    if unknown
    else "",
  )


def is_concrete(x: Any) -> bool:
  """Whether the values of `x` are known (not a tracer inside `jax.jit`).

  Args:
    x: an array or a Python value.

  Returns:
    False for a JAX tracer, True otherwise.
  """
  return not isinstance(x, jax.core.Tracer)


def check_images(x: ArrayLike, *, min_rank: int = 2) -> None:
  """Checks a batch of images `x` of shape [B, ...]: rank, no NaN, values in [0, 1].

  The values are checked when they are concrete (see `on_device`).

  Args:
    x: the images.
    min_rank: the smallest rank allowed.
  """
  require(
    np.ndim(x) >= min_rank,
    f"images must have shape [batch, ...] with rank >= {min_rank}, got shape {tuple(np.shape(x))}",
  )
  if is_concrete(x):
    values = np.asarray(x, np.float32)
    _image_values(int(np.isnan(values).sum()), values.min(initial=0.0), values.max(initial=1.0))


def check_labels(y: ArrayLike, batch_size: int, num_classes: int | None = None) -> None:
  """Checks integer labels `y` of shape [batch_size] and, if known, their range.

  Args:
    y: the labels.
    batch_size: the number of images they label.
    num_classes: the number of classes, or None not to check the range.
  """
  require(
    np.shape(y) == (batch_size,),
    f"labels must have shape ({batch_size},) to match the images, got shape {tuple(np.shape(y))}",
  )
  if num_classes is not None and is_concrete(y):
    labels = np.asarray(y)
    _label_values(labels[(labels < 0) | (labels >= num_classes)][:5], num_classes)


def _image_values(nan_count: int, low: Any, high: Any) -> None:
  require(nan_count == 0, f"images contain NaN ({int(nan_count)} values)")
  lo, hi = float(low), float(high)
  require(
    lo >= 0.0 and hi <= 1.0,
    f"images must lie in [0, 1], got values in [{lo:g}, {hi:g}]"
    + (" (divide 8-bit images by 255)" if hi > 1.0 else ""),
  )


def _label_values(bad: np.ndarray, num_classes: int | None) -> None:
  require(bad.size == 0, f"labels must lie in [0, {num_classes}), got {bad.tolist()}")


def _eps_values(bad: np.ndarray, name: str) -> None:
  require(bad.size == 0, f"{name} must be finite and > 0, got {bad.tolist()}")


# ----------------------------------------------------------------------------
# Value checks of traced arrays.

_TRUSTED = contextvars.ContextVar("jaxrobust_trusted", default=False)


@contextlib.contextmanager
def trusted() -> Iterator[None]:
  """A context within which `on_device` adds no check to what is traced.

  For the library's own programs (training and evaluation steps), whose
  inputs were checked on the host: enter it inside the traced function, so
  that it holds whenever that function is traced.

  Yields:
    None.
  """
  token = _TRUSTED.set(True)
  try:
    yield
  finally:
    _TRUSTED.reset(token)


def on_device(
  *,
  x: ArrayLike | None = None,
  y: ArrayLike | None = None,
  num_classes: int | None = None,
  eps: ArrayLike | None = None,
  eps_name: str = "eps",
) -> None:
  """Checks traced images, labels and eps when the program runs.

  A host callback of a few reductions, raising `InputError` as the host
  checks would. Concrete arrays are left to the host checks; nothing is
  added inside `trusted()`.

  Args:
    x: images, which must lie in [0, 1] and hold no NaN.
    y: labels, which must lie in [0, num_classes).
    num_classes: the number of classes (None: `y` is not checked).
    eps: radii, which must be finite and > 0.
    eps_name: the name of `eps` in the message.
  """
  if _TRUSTED.get():
    return
  scalars: dict[str, tuple[Any, ...]] = {}
  if x is not None and not is_concrete(x):
    x32 = jnp.asarray(x, jnp.float32)
    finite = jnp.where(jnp.isnan(x32), 0.5, x32)
    scalars["x"] = (jnp.isnan(x32).sum(), finite.min(initial=0.0), finite.max(initial=1.0))
  if y is not None and num_classes is not None and not is_concrete(y) and jnp.ndim(y) == 1:
    labels = jnp.asarray(y)
    bad = (labels < 0) | (labels >= num_classes)
    # The first bad label (0 if none) and how many there are.
    scalars["y"] = (labels[jnp.argmax(bad)], bad.sum())
  if eps is not None and not is_concrete(eps):
    e = jnp.ravel(jnp.asarray(eps, jnp.float32))
    bad = ~(e > 0) | ~jnp.isfinite(e)
    scalars["eps"] = (e[jnp.argmax(bad)], bad.sum())
  if scalars:
    jax.debug.callback(_host_check, scalars, num_classes, eps_name)


def _host_check(
  scalars: dict[str, tuple[Any, ...]], num_classes: int | None, eps_name: str
) -> None:
  # Under vmap a callback may see a batch of each scalar: check every one.
  if "x" in scalars:
    nan, lo, hi = (np.asarray(v) for v in scalars["x"])
    _image_values(int(nan.sum()), lo.min(), hi.max())
  if "y" in scalars:
    first, count = (np.asarray(v) for v in scalars["y"])
    _label_values(np.ravel(first)[np.ravel(count) > 0][:5], num_classes)
  if "eps" in scalars:
    first, count = (np.asarray(v) for v in scalars["eps"])
    _eps_values(np.ravel(first)[np.ravel(count) > 0][:5], eps_name)
