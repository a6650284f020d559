"""Serving batches from a plan: which example of which source fills each row.

A plan maps a global step to two arrays over the rows of its global batch:
the source of each row and the index of its example in that source; it
also tells the epoch of a step and holds the seed, from which encoded
images (`EncodedImages`) draw their training crops. Serving
a plan reads, for one process, only the rows it owns (`process_rows`), in
this process or in grain's worker processes; both give the same batches,
since a batch is a function of the step alone.
"""

from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxrobust import parallel
from jaxrobust.checks import integer_at_least, require
from jaxrobust.data.encoded import EncodedImages


class Plan(Protocol):
  """Step -> (source of each row, index of each row's example in its source)."""

  seed: int  # the seed of the order, and of the crops of encoded images

  def __call__(self, step: int) -> tuple[np.ndarray, np.ndarray]: ...

  def epoch(self, step: int) -> int:
    """The epoch of step `step`."""
    ...


# (images, labels) of one source: numpy arrays, or `RecordImages` and labels
Source = tuple[Any, Any]
Batch = tuple[np.ndarray, np.ndarray]
_UNIT_VALUES = np.arange(256, dtype=np.uint8) / np.float32(255)  # float32 pixel / 255


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


class EpochOrder:
  """`epoch_permutation(n, seed, epoch)` (with `salt`: a separate stream), the last one kept.

  Calling it with an epoch returns that epoch's order; consecutive steps of
  one epoch compute it once.
  """

  def __init__(self, n: int, seed: int, salt: int | None = None) -> None:
    self.n, self.seed, self.salt = n, seed, salt
    self._kept: tuple[int, np.ndarray] | None = None

  def __call__(self, epoch: int) -> np.ndarray:
    if self._kept is None or self._kept[0] != epoch:
      if self.salt is None:
        order = epoch_permutation(self.n, self.seed, epoch)
      else:
        order = np.random.default_rng([self.seed, epoch, self.salt]).permutation(self.n)
      self._kept = (epoch, order)
    return self._kept[1]


def process_rows(
  batch_size: int,
  mesh: Mesh | None = None,
  *,
  process_index: int | None = None,
  process_count: int | None = None,
) -> tuple[int, int]:
  """The rows `[start, stop)` of every global batch that this process feeds.

  With `mesh`, the rows of this process's devices under
  `parallel.batch_sharding(mesh)` (what `parallel.global_batch` takes);
  without, block `process_index` of `process_count` equal blocks (defaults:
  `jax.process_index()`, `jax.process_count()`).

  Args:
    batch_size: the global batch size.
    mesh: the training mesh, or None.
    process_index: this process's index (without `mesh`).
    process_count: the number of processes (without `mesh`).

  Returns:
    `(start, stop)`.
  """
  if mesh is not None:
    indices = parallel.batch_sharding(mesh).addressable_devices_indices_map((batch_size,))
    spans = sorted({index[0].indices(batch_size)[:2] for index in indices.values() if index})
    start, stop = spans[0][0], spans[-1][1]
    require(sum(b - a for a, b in spans) == stop - start, "a process's rows must be contiguous")
    return start, stop
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  integer_at_least("process_count", count, 1)
  require(0 <= index < count, f"process_index {index} must lie in [0, {count})")
  require(
    batch_size % count == 0,
    f"batch_size {batch_size} must be divisible by the {count} processes",
  )
  share = batch_size // count
  return index * share, (index + 1) * share


class Gather:
  """Reads the rows `rows` of a plan's batch at a step from its sources."""

  def __init__(self, sources: Sequence[Source], plan: Plan, rows: tuple[int, int]) -> None:
    self.sources, self.plan, self.rows = list(sources), plan, rows

  def __call__(self, step: int) -> Batch:
    which, index = self.plan(step)
    start, stop = self.rows
    which, index = which[start:stop], index[start:stop]
    if len(self.sources) == 1:  # one read, in row order
      x, y = self.sources[0]
      return self._images(x, index, step, 0), y[index]
    dtypes = {np.dtype(x.dtype) for x, _ in self.sources}
    dtype = np.dtype(np.uint8) if dtypes == {np.dtype(np.uint8)} else np.dtype(np.float32)
    images = np.empty((len(index), *self.sources[0][0].shape[1:]), dtype)
    labels = np.empty(len(index), np.asarray(self.sources[0][1][:0]).dtype)
    for s, (x, y) in enumerate(self.sources):
      mine = np.flatnonzero(which == s)
      if len(mine):
        rows = self._images(x, index[mine], step, s)
        images[mine] = rows / np.float32(255) if rows.dtype != dtype else rows
        labels[mine] = y[index[mine]]
    return images, labels

  def _images(self, x: Any, index: np.ndarray, step: int, source: int) -> np.ndarray:
    """The images at `index` of source `source`: cropped for training when encoded."""
    if isinstance(x, EncodedImages):
      return x.augmented(index, self.plan.seed, self.plan.epoch(step), source)
    return x[index]


def serve(
  sources: Sequence[Source],
  plan: Plan,
  batch_size: int,
  *,
  start_step: int,
  rows: tuple[int, int] | None,
  workers: int,
) -> Iterator[Batch]:
  """The batches of `plan` from step `start_step` on, forever: rows `rows` of each.

  Args:
    sources: the (images, labels) the plan indexes.
    plan: step -> (source of each row, example index of each row).
    batch_size: the global batch size.
    start_step: the first step.
    rows: `(start, stop)` rows of each global batch to read (None: all).
    workers: 0 reads (and decodes) in this process; more read in that many
      grain worker processes.

  Returns:
    An iterator of `(xb, yb)`.
  """
  integer_at_least("workers", workers, 0)
  rows = (0, batch_size) if rows is None else (int(rows[0]), int(rows[1]))
  require(
    0 <= rows[0] < rows[1] <= batch_size,
    f"rows {rows} must be a non-empty span of the {batch_size} rows of a batch",
  )
  gather = Gather(sources, plan, rows)
  if workers == 0:
    return map(gather, _steps(start_step))
  return _grain_batches(gather, start_step, workers)


def _steps(start: int) -> Iterator[int]:
  step = start
  while True:
    yield step
    step += 1


def _grain_batches(gather: Gather, start_step: int, workers: int) -> Iterator[Batch]:
  """`gather` of every step from `start_step` on, computed by grain's worker processes."""
  import grain  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top

  if not flags.FLAGS.is_parsed():  # grain reads its absl flags
    flags.FLAGS.mark_as_parsed()
  steps = grain.MapDataset.range(start_step, 2**62).map(gather)
  options = grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2)
  return iter(steps.to_iter_dataset().mp_prefetch(options))


def as_float(x: jax.Array | np.ndarray) -> jax.Array:
  """Images as float32 in [0, 1]: uint8 pixels divided by 255, floats unchanged.

  Usable under `jax.jit`. uint8 pixels are looked up in a table of the 256
  values `np.arange(256, dtype=np.uint8) / np.float32(255)`, so the result
  equals the host's `x / np.float32(255)` (the in-memory sources' images)
  exactly; XLA would compile a division by the constant 255 into a
  multiplication by its reciprocal, which differs in the last bit.

  Args:
    x: uint8 or float images (a `RecordImages` is read).

  Returns:
    The float images.
  """
  if not isinstance(x, jax.Array):
    x = np.asarray(x)  # a `RecordImages` (view) is read here
  x = jnp.asarray(x)
  if x.dtype == jnp.uint8:
    return jnp.asarray(_UNIT_VALUES)[x.astype(jnp.int32)]
  return x


def host_float(x: Any) -> np.ndarray:
  """Images as a numpy float32 array in [0, 1] on the host: uint8 divided by 255.

  For the places that need the images on the host as floats (an evaluation
  set); a `RecordImages` is read whole. Float images are returned as they are.

  Args:
    x: uint8 images (numpy or `RecordImages`), or float images.

  Returns:
    float images, C-contiguous.
  """
  images = np.asarray(x)
  if images.dtype == np.uint8:
    return np.ascontiguousarray(images / np.float32(255))
  return images


def local_to_global(local: Any, mesh: Mesh, batch_size: int) -> Any:
  """A global batch on `mesh` from this process's rows (`process_rows(batch_size, mesh)`).

  Args:
    local: a pytree of numpy arrays, this process's rows of the global batch.
    mesh: the training mesh.
    batch_size: the global batch size.

  Returns:
    The pytree of global `jax.Array`s, split by `parallel.batch_sharding`.
  """
  sharding = parallel.batch_sharding(mesh)
  return jax.tree.map(
    lambda a: jax.make_array_from_process_local_data(sharding, a, (batch_size, *a.shape[1:])),
    local,
  )
