"""Batches of numpy arrays: shuffled training batches (resumable at any step),
evaluation batches (in order, padded and masked), and their placement on a mesh."""

import math
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from jaxtyping import ArrayLike

from jaxrobust import parallel
from jaxrobust.checks import integer_at_least, require
from jaxrobust.data.encoded import EncodedImages
from jaxrobust.data.records import RecordImages, count_pixels
from jaxrobust.data.stream import EpochOrder, epoch_permutation, serve

__all__ = [
  "TrainPlan",
  "channel_stats",
  "epoch_permutation",
  "eval_batches",
  "to_devices",
  "train_batches",
]


def _check_examples(x: ArrayLike, y: ArrayLike) -> tuple[Any, np.ndarray]:
  """`x` (numpy, or kept as it is when it reads lazily, like `RecordImages`) and `y`."""
  xs = x if isinstance(x, RecordImages | EncodedImages) else np.asarray(x)
  ys = np.asarray(y)
  require(
    len(xs.shape) >= 1 and len(xs) == len(ys),
    f"x and y must have the same leading size, got shapes {xs.shape} and {ys.shape}",
  )
  return xs, ys


class TrainPlan:
  """Step -> the examples of its batch: batch `s % steps` of `epoch_permutation`'s epoch `s // steps`."""

  def __init__(self, n: int, batch_size: int, seed: int) -> None:
    self.order = EpochOrder(n, seed)
    self.batch_size, self.seed = batch_size, seed
    self.steps_per_epoch = n // batch_size

  def epoch(self, step: int) -> int:
    """The epoch of step `step`."""
    return step // self.steps_per_epoch

  def __call__(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    epoch, position = divmod(step, self.steps_per_epoch)
    start = position * self.batch_size
    index = self.order(epoch)[start : start + self.batch_size]
    return np.zeros(self.batch_size, np.int8), index


def train_batches(
  x: ArrayLike,
  y: ArrayLike,
  batch_size: int,
  *,
  seed: int,
  start_step: int = 0,
  rows: tuple[int, int] | None = None,
  workers: int = 0,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Shuffled training batches, from global step `start_step` on, forever.

  Each epoch visits the examples in the order `epoch_permutation(len(x),
  seed, epoch)` and yields its `len(x) // batch_size` full batches, dropping
  the remainder. Step `s` yields batch `s % steps_per_epoch` of epoch
  `s // steps_per_epoch`, so a run resumed at `start_step` sees exactly the
  batches an uninterrupted run would have.

  Args:
    x: examples [N, ...]: a numpy array, or a record-backed data set's
      `RecordImages` (then only the rows served are read, as uint8).
    y: labels, a numpy array [N, ...].
    batch_size: examples per (global) batch, 1 to N.
    seed: a non-negative integer that fixes the order.
    start_step: the global step of the first batch.
    rows: serve only rows `[start, stop)` of every batch, and read only
      their examples (each process its own: `process_rows`); None: all.
    workers: 0 reads in this process; more read and decode in that many
      grain worker processes (the same batches).

  Returns:
    An infinite iterator of numpy pairs `(xb, yb)` of `batch_size` examples
    (`stop - start` with `rows`).
  """
  xs, ys = _check_examples(x, y)
  integer_at_least("batch_size", batch_size, 1)
  require(batch_size <= len(xs), f"batch_size {batch_size} exceeds the {len(xs)} examples")
  integer_at_least("seed", seed, 0)
  integer_at_least("start_step", start_step, 0)
  plan = TrainPlan(len(xs), batch_size, seed)
  return serve([(xs, ys)], plan, batch_size, start_step=start_step, rows=rows, workers=workers)


def eval_batches(
  x: ArrayLike, y: ArrayLike, batch_size: int, *, multiple_of: int = 1
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """All examples in order, in batches of `batch_size`, each counted once.

  The last batch holds the remaining examples, padded up to a multiple of
  `multiple_of` (the number of devices) by repeating the last example.

  Args:
    x: examples, a numpy array [N, ...].
    y: labels, a numpy array [N, ...].
    batch_size: examples per batch, a multiple of `multiple_of`.
    multiple_of: every batch size is a multiple of this.

  Returns:
    An iterator of numpy triples `(xb, yb, mask)`, where the boolean `mask`
    is False exactly on the padding.
  """
  xs, ys = _check_examples(x, y)
  integer_at_least("batch_size", batch_size, 1)
  integer_at_least("multiple_of", multiple_of, 1)
  require(
    batch_size % multiple_of == 0,
    f"batch_size {batch_size} must be a multiple of multiple_of {multiple_of}",
  )
  return _eval_batches(xs, ys, batch_size, multiple_of)


def _eval_batches(
  x: np.ndarray, y: np.ndarray, batch_size: int, multiple_of: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  for start in range(0, len(x), batch_size):
    xb, yb = np.asarray(x[start : start + batch_size]), y[start : start + batch_size]
    count = len(xb)
    padded = -(-count // multiple_of) * multiple_of
    if padded > count:
      indices = np.minimum(np.arange(padded), count - 1)
      xb, yb = xb[indices], yb[indices]
    yield xb, yb, np.arange(padded) < count


def to_devices(batch: Any, mesh: Mesh) -> Any:
  """Puts every array of `batch` on `mesh`, its leading axis split over it.

  Args:
    batch: an array or a pytree of arrays (such as `(xb, yb, mask)`) whose
      leading size is divisible by the number of devices in `mesh`.
    mesh: a mesh from `jaxrobust.parallel.mesh`.

  Returns:
    The same pytree of `jax.Array`s, sharded by
    `jaxrobust.parallel.batch_sharding(mesh)`.
  """
  devices = mesh.devices.size
  for array in jax.tree.leaves(batch):
    shape = np.shape(array)
    require(
      len(shape) >= 1 and shape[0] % devices == 0,
      f"every array of the batch needs a leading size divisible by the "
      f"{devices} devices of the mesh, got shape {shape}",
    )
  return jax.device_put(batch, parallel.batch_sharding(mesh))


def channel_stats(x: ArrayLike) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean and standard deviation of images `x` [N, H, W, C].

  Both are taken over all N * H * W pixels, in float64; the standard deviation
  is the population one (divided by N * H * W). uint8 images (a record-backed
  data set's) count as the float32 values `pixel / 255` they become on the
  device, from a histogram of their 256 values per channel: the one stored
  with the records, else one counted in chunks. Encoded images cropped when
  read (`EncodedImages`, ImageNet) give ImageNet's statistics
  (`EncodedImages.channel_stats`).

  Args:
    x: float images in [0, 1], or uint8 images (numpy or `RecordImages`).

  Returns:
    `(mean, std)`, each a tuple of C floats.
  """
  if isinstance(x, EncodedImages):  # images cropped when read: ImageNet's statistics
    return x.channel_stats()
  shape = tuple(np.shape(x)) if not isinstance(x, RecordImages) else x.shape
  require(
    len(shape) == 4 and math.prod(shape) > 0,
    f"channel_stats needs non-empty images [N, H, W, C], got shape {shape}",
  )
  if isinstance(x, RecordImages) or np.asarray(x).dtype == np.uint8:
    return _histogram_stats(pixel_histogram(x))
  x = np.asarray(x)
  axes = (0, 1, 2)
  mean = x.mean(axis=axes, dtype=np.float64)
  # In chunks, so that no float64 copy of a large data set is made.
  chunk = max(1, 2**22 // math.prod(x.shape[1:]))
  squares = sum(
    np.square(x[start : start + chunk] - mean).sum(axis=axes) for start in range(0, len(x), chunk)
  )
  std = np.sqrt(squares / (x.size // x.shape[-1]))
  return tuple(map(float, mean)), tuple(map(float, std))


def pixel_histogram(x: Any) -> np.ndarray:
  """How often each pixel value occurs in each channel of uint8 images `x`.

  Args:
    x: uint8 images [N, H, W, C], numpy or `RecordImages` (whose stored
      histogram is used: `RecordImages.pixel_counts`).

  Returns:
    int64 counts [C, 256].
  """
  if isinstance(x, RecordImages):
    return x.pixel_counts()
  return count_pixels(x)


def _histogram_stats(counts: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
  values = (np.arange(256, dtype=np.uint8) / np.float32(255)).astype(np.float64)
  total = counts.sum(axis=1)
  mean = (counts * values).sum(axis=1) / total
  std = np.sqrt((counts * np.square(values - mean[:, None])).sum(axis=1) / total)
  return tuple(map(float, mean)), tuple(map(float, std))
