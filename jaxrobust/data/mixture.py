"""Batches mixed from two data sets: a fixed share of every batch from the second.

The recipes of Gowal et al. 2021, Rebuffi et al. 2021 and Wang et al. 2023
train on real images mixed with generated ones (30 % real, 70 % generated in
every batch). `mixed_batches` draws `round(extra_fraction * B)` examples of
every batch of B from the extra data set and the rest from the first.
"""

from collections.abc import Iterator
from typing import Any

import numpy as np

from jaxrobust.checks import InputError, in_interval, integer_at_least, require
from jaxrobust.data.batches import TrainPlan, _check_examples
from jaxrobust.data.stream import EpochOrder, serve

_EXTRA_SALT = 1  # the extra data set's epoch orders: their own random stream
_ROWS_SALT = 2  # where in the batch its extra examples go


def check_extra_fraction(extra_fraction: float) -> float:
  """Returns `extra_fraction` if it lies in [0, 1), else raises InputError.

  Args:
    extra_fraction: the share of every batch drawn from the extra data set.

  Returns:
    It, as a float.
  """
  require(
    isinstance(extra_fraction, int | float) and not isinstance(extra_fraction, bool),
    f"extra_fraction must be a number in [0, 1), got {extra_fraction!r}",
  )
  in_interval("extra_fraction", extra_fraction, 0.0, 1.0, closed=(True, False))
  return float(extra_fraction)


def extra_count(batch_size: int, extra_fraction: float) -> int:
  """How many examples of every batch come from the extra data set.

  Args:
    batch_size: the global batch size B.
    extra_fraction: the share in [0, 1).

  Returns:
    `round(extra_fraction * B)` (Python's rounding, half to even).
  """
  return round(check_extra_fraction(extra_fraction) * batch_size)


def steps_per_epoch(n: int, batch_size: int, extra_fraction: float = 0.0) -> int:
  """Steps in one epoch of the first data set: `n // (B - extra_count(B, fraction))`.

  Args:
    n: examples in the first data set.
    batch_size: the global batch size B.
    extra_fraction: the share of every batch from the extra data set.

  Returns:
    The number of steps after which every example of the first data set was
    seen once.
  """
  return n // (batch_size - extra_count(batch_size, extra_fraction))


class MixturePlan:
  """Step -> the rows of its batch: `B - k` from the first data set, `k` from the extra.

  The first data set's examples are batch `s % steps` of its epoch `s //
  steps` (`epoch_permutation`, batches of `B - k`); the extra data set's are
  taken likewise from its own epochs (orders of their own random stream,
  batches of `k`); the rows are then shuffled by a permutation of the seed
  and the step. Every row is a function of (seed, step) only.
  """

  def __init__(self, n_first: int, n_extra: int, batch_size: int, extra: int, seed: int) -> None:
    self.batch_size, self.extra, self.seed = batch_size, extra, seed
    self.first = TrainPlan(n_first, batch_size - extra, seed)
    self.extra_order = EpochOrder(n_extra, seed, salt=_EXTRA_SALT)
    self.extra_steps = n_extra // extra

  def epoch(self, step: int) -> int:
    """The epoch of step `step`, counted on the first data set."""
    return self.first.epoch(step)

  def __call__(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    _, first = self.first(step)
    epoch, position = divmod(step, self.extra_steps)
    start = position * self.extra
    extra = self.extra_order(epoch)[start : start + self.extra]
    which = np.concatenate([np.zeros(len(first), np.int8), np.ones(self.extra, np.int8)])
    index = np.concatenate([first, extra])
    rows = np.random.default_rng([self.seed, step, _ROWS_SALT]).permutation(self.batch_size)
    return which[rows], index[rows]


def mixed_batches(
  first: tuple[Any, Any],
  extra: tuple[Any, Any],
  batch_size: int,
  *,
  extra_fraction: float,
  seed: int,
  start_step: int = 0,
  rows: tuple[int, int] | None = None,
  workers: int = 0,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Training batches of which `round(extra_fraction * B)` examples come from `extra`.

  Epochs are counted on `first` (`steps_per_epoch`): step `s` takes batch
  `s % steps` of `first`'s epoch `s // steps`, as `train_batches` would with
  batches of `B - k`; `extra` is walked through its own epochs. Each batch is
  a function of (seed, step) only, so a run resumed at `start_step` sees the
  uninterrupted run's batches. With `extra_fraction` 0 this is
  `train_batches(*first, ...)`.

  Args:
    first: (images, labels) of the first data set (a `Dataset` will do).
    extra: (images, labels) of the extra data set: the same image shape.
    batch_size: examples per (global) batch B.
    extra_fraction: the share in [0, 1) of every batch drawn from `extra`.
    seed: a non-negative integer that fixes the order.
    start_step: the global step of the first batch.
    rows: serve only rows `[start, stop)` of every batch (`process_rows`).
    workers: grain worker processes that read and decode (0: this process).

  Returns:
    An infinite iterator of numpy pairs `(xb, yb)`. When one data set is
    uint8 and the other float, the uint8 rows are divided by 255 (float32).
  """
  (x1, y1), (x2, y2) = _check_examples(*first), _check_examples(*extra)
  integer_at_least("batch_size", batch_size, 1)
  integer_at_least("seed", seed, 0)
  integer_at_least("start_step", start_step, 0)
  k = extra_count(batch_size, extra_fraction)
  require(
    tuple(x1.shape[1:]) == tuple(x2.shape[1:]),
    f"the extra data set's images are {list(x2.shape[1:])}, the first's {list(x1.shape[1:])}",
  )
  require(
    batch_size - k <= len(x1),
    f"batch_size {batch_size} takes {batch_size - k} examples of the first data set, "
    f"which has {len(x1)}",
  )
  require(k <= len(x2), f"batch_size {batch_size} takes {k} extra examples; there are {len(x2)}")
  classes = [getattr(dataset, "num_classes", None) for dataset in (first, extra)]
  require(
    None in classes or classes[0] == classes[1],
    f"the first data set has {classes[0]} classes but the extra one {classes[1]}",
  )
  if k == 0:
    plan: Any = TrainPlan(len(x1), batch_size, seed)
    return serve([(x1, y1)], plan, batch_size, start_step=start_step, rows=rows, workers=workers)
  if x1.dtype != x2.dtype and np.uint8 not in (x1.dtype, x2.dtype):
    raise InputError(f"the data sets' images are {x1.dtype} and {x2.dtype}: not mixable")
  plan = MixturePlan(len(x1), len(x2), batch_size, k, seed)
  return serve(
    [(x1, y1), (x2, y2)], plan, batch_size, start_step=start_step, rows=rows, workers=workers
  )
