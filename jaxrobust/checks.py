"""Argument and input validation shared by the library and the command lines.

Every user mistake raises `InputError` with one sentence naming the bad value.
The command-line tools print that sentence and exit with code 2 (no traceback).
Value checks on arrays (range, NaN) need concrete arrays: they run when the
caller passes numpy or committed jax arrays and are skipped under `jax.jit`,
where values are abstract; shape checks always run.
"""

import math
import numbers

import jax
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
    x = np.asarray(x)
    require(not np.isnan(x).any(), f"images contain NaN ({int(np.isnan(x).sum())} values)")
    lo, hi = float(x.min(initial=0.0)), float(x.max(initial=1.0))
    require(lo >= 0.0 and hi <= 1.0, f"images must lie in [0, 1], got values in [{lo:g}, {hi:g}]")


def check_labels(y, batch_size, num_classes=None):
  """Checks integer labels `y` of shape [batch_size] and, if known, their range."""
  require(
    np.shape(y) == (batch_size,),
    f"labels must have shape ({batch_size},) to match the images, got shape {tuple(np.shape(y))}",
  )
  if num_classes is not None and is_concrete(y):
    y = np.asarray(y)
    bad = y[(y < 0) | (y >= num_classes)]
    require(bad.size == 0, f"labels must lie in [0, {num_classes}), got {bad[:5].tolist()}")
