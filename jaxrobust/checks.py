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

import jax
import jax.numpy as jnp
import numpy as np


class InputError(ValueError):
  """A bad argument, input array, file or setting supplied by the user."""


def require(condition, message):
  """Raises `InputError(message)` unless `condition` holds."""
  if not condition:
    raise InputError(message)


def positive(name, value):
  """Returns `value` if it is a finite number > 0, else raises `InputError`."""
  require(
    isinstance(value, numbers.Real) and math.isfinite(value) and value > 0,
    f"{name} must be a finite number > 0, got {value!r}",
  )
  return value


def non_negative(name, value):
  """Returns `value` if it is a finite number >= 0, else raises `InputError`."""
  require(
    isinstance(value, numbers.Real) and math.isfinite(value) and value >= 0,
    f"{name} must be a finite number >= 0, got {value!r}",
  )
  return value


def integer_at_least(name, value, minimum):
  """Returns `value` if it is an integer >= `minimum`, else raises `InputError`."""
  require(
    isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum,
    f"{name} must be an integer >= {minimum}, got {value!r}",
  )
  return int(value)


def in_interval(name, value, low, high, *, closed=(True, True)):
  """Returns `value` if it lies in the interval from `low` to `high`.

  `closed` says whether each end belongs to the interval.
  """
  ok_low = value >= low if closed[0] else value > low
  ok_high = value <= high if closed[1] else value < high
  require(
    isinstance(value, numbers.Real) and math.isfinite(value) and ok_low and ok_high,
    f"{name} must lie in {'[' if closed[0] else '('}{low}, {high}"
    f"{']' if closed[1] else ')'}, got {value!r}",
  )
  return value


def one_of(name, value, choices):
  """Returns `value` if it is one of `choices`, else raises `InputError`."""
  require(
    value in choices, f"unknown {name} {value!r}; choose one of {', '.join(map(repr, choices))}"
  )
  return value


def known_keys(what, given, allowed):
  """Refuses a setting of `what` that is not one of `allowed`, naming it."""
  unknown = sorted(set(given) - set(allowed))
  require(
    not unknown,
    f"{what} has no setting {unknown[0]!r}; choose from {', '.join(sorted(allowed))}"
    if unknown
    else "",
  )


def is_concrete(x):
  """True when the values of `x` are known (not a tracer inside `jax.jit`)."""
  return not isinstance(x, jax.core.Tracer)


def check_images(x, *, min_rank=2):
  """Checks a batch of images `x` of shape [B, ...]: rank, no NaN, values in [0, 1]."""
  require(
    np.ndim(x) >= min_rank,
    f"images must have shape [batch, ...] with rank >= {min_rank}, got shape {tuple(np.shape(x))}",
  )
  if is_concrete(x):
    x = np.asarray(x, np.float32)
    _image_values(int(np.isnan(x).sum()), x.min(initial=0.0), x.max(initial=1.0))


def check_labels(y, batch_size, num_classes=None):
  """Checks integer labels `y` of shape [batch_size] and, if known, their range."""
  require(
    np.shape(y) == (batch_size,),
    f"labels must have shape ({batch_size},) to match the images, got shape {tuple(np.shape(y))}",
  )
  if num_classes is not None and is_concrete(y):
    y = np.asarray(y)
    _label_values(y[(y < 0) | (y >= num_classes)][:5], num_classes)


def _image_values(nan_count, lo, hi):
  require(nan_count == 0, f"images contain NaN ({int(nan_count)} values)")
  lo, hi = float(lo), float(hi)
  require(
    lo >= 0.0 and hi <= 1.0,
    f"images must lie in [0, 1], got values in [{lo:g}, {hi:g}]"
    + (" (divide 8-bit images by 255)" if hi > 1.0 else ""),
  )


def _label_values(bad, num_classes):
  require(bad.size == 0, f"labels must lie in [0, {num_classes}), got {bad.tolist()}")


def _eps_values(bad, name):
  require(bad.size == 0, f"{name} must be finite and > 0, got {bad.tolist()}")


# ----------------------------------------------------------------------------
# Value checks of traced arrays.

_TRUSTED = contextvars.ContextVar("jaxrobust_trusted", default=False)


@contextlib.contextmanager
def trusted():
  """Within this context, `on_device` adds no check to what is traced.

  For the library's own programs (training and evaluation steps), whose
  inputs were checked on the host: enter it inside the traced function, so
  that it holds whenever that function is traced."""
  token = _TRUSTED.set(True)
  try:
    yield
  finally:
    _TRUSTED.reset(token)


def on_device(*, x=None, y=None, num_classes=None, eps=None, eps_name="eps"):
  """Checks the traced ones of images `x`, labels `y` (in [0, num_classes))
  and `eps` (finite, > 0) when the program runs: a host callback of a few
  reductions, raising `InputError` as the host checks would. Concrete
  arrays are left to the host checks; nothing is added inside `trusted()`."""
  if _TRUSTED.get():
    return
  scalars = {}
  if x is not None and not is_concrete(x):
    x32 = jnp.asarray(x, jnp.float32)
    finite = jnp.where(jnp.isnan(x32), 0.5, x32)
    scalars["x"] = (jnp.isnan(x32).sum(), finite.min(initial=0.0), finite.max(initial=1.0))
  if y is not None and num_classes is not None and not is_concrete(y) and jnp.ndim(y) == 1:
    y = jnp.asarray(y)
    bad = (y < 0) | (y >= num_classes)
    # The first bad label (0 if none) and how many there are.
    scalars["y"] = (y[jnp.argmax(bad)], bad.sum())
  if eps is not None and not is_concrete(eps):
    e = jnp.ravel(jnp.asarray(eps, jnp.float32))
    bad = ~(e > 0) | ~jnp.isfinite(e)
    scalars["eps"] = (e[jnp.argmax(bad)], bad.sum())
  if scalars:
    jax.debug.callback(_host_check, scalars, num_classes, eps_name)


def _host_check(scalars, num_classes, eps_name):
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
