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


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
  """The order in which epoch `epoch` visits `n` examples.

  Args:
    n: the number of examples.
    seed: a non-negative integer that fixes the order.
    epoch: the epoch's index.

  Returns:
    `np.random.default_rng([seed, epoch]).permutation(n)`: it depends only on
    `n`, `seed` and `epoch`.
  """
  integer_at_least("n", n, 0)
  integer_at_least("seed", seed, 0)
  integer_at_least("epoch", epoch, 0)
  return np.random.default_rng([seed, epoch]).permutation(n)


def _check_examples(x: ArrayLike, y: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
  xs, ys = np.asarray(x), np.asarray(y)
  require(
    xs.ndim >= 1 and len(xs) == len(ys),
    f"x and y must have the same leading size, got shapes {xs.shape} and {ys.shape}",
  )
  return xs, ys


def train_batches(
  x: ArrayLike, y: ArrayLike, batch_size: int, *, seed: int, start_step: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Shuffled training batches, from global step `start_step` on, forever.

  Each epoch visits the examples in the order `epoch_permutation(len(x),
  seed, epoch)` and yields its `len(x) // batch_size` full batches, dropping
  the remainder. Step `s` yields batch `s % steps_per_epoch` of epoch
  `s // steps_per_epoch`, so a run resumed at `start_step` sees exactly the
  batches an uninterrupted run would have.

  Args:
    x: examples, a numpy array [N, ...].
    y: labels, a numpy array [N, ...].
    batch_size: examples per batch, 1 to N.
    seed: a non-negative integer that fixes the order.
    start_step: the global step of the first batch.

  Returns:
    An infinite iterator of numpy pairs `(xb, yb)` of `batch_size` examples.
  """
  xs, ys = _check_examples(x, y)
  integer_at_least("batch_size", batch_size, 1)
  require(batch_size <= len(xs), f"batch_size {batch_size} exceeds the {len(xs)} examples")
  integer_at_least("seed", seed, 0)
  integer_at_least("start_step", start_step, 0)
  return _train_batches(xs, ys, batch_size, seed, start_step)


def _train_batches(
  x: np.ndarray, y: np.ndarray, batch_size: int, seed: int, start_step: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  steps_per_epoch = len(x) // batch_size
  epoch, position = divmod(start_step, steps_per_epoch)
  while True:
    order = epoch_permutation(len(x), seed, epoch)
    for step in range(position, steps_per_epoch):
      indices = order[step * batch_size : (step + 1) * batch_size]
      yield x[indices], y[indices]
    epoch, position = epoch + 1, 0


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
    xb, yb = x[start : start + batch_size], y[start : start + batch_size]
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
  is the population one (divided by N * H * W).

  Args:
    x: the images.

  Returns:
    `(mean, std)`, each a tuple of C floats.
  """
  x = np.asarray(x)
  require(
    x.ndim == 4 and x.size > 0,
    f"channel_stats needs non-empty images [N, H, W, C], got shape {x.shape}",
  )
  axes = (0, 1, 2)
  mean = x.mean(axis=axes, dtype=np.float64)
  # In chunks, so that no float64 copy of a large data set is made.
  chunk = max(1, 2**22 // math.prod(x.shape[1:]))
  squares = sum(
    np.square(x[start : start + chunk] - mean).sum(axis=axes) for start in range(0, len(x), chunk)
  )
  std = np.sqrt(squares / (x.size // x.shape[-1]))
  return tuple(map(float, mean)), tuple(map(float, std))
