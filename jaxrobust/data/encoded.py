"""Encoded images of any size, read as uint8 [N, S, S, 3] through ImageNet's crops.

ImageNet's JPEGs differ in size: they are stored as they are (as files, or
as records of their bytes) and decoded and cropped to S x S only when read,
in grain's worker processes when the trainer has workers. `EncodedImages`
is the array-like `x` of such a data set: indexing gives the evaluation crop
(`crops.eval_crop`), `augmented` the training crop and flip of an epoch
(`crops.train_crop`).
"""

import copy
from typing import Protocol

import numpy as np

from jaxrobust.checks import integer_at_least, require
from jaxrobust.data import crops
from jaxrobust.data.lazy import LazyRows


class Store(Protocol):
  """Where the encoded images lie: a folder of files or record shards."""

  def records(self, indices: np.ndarray) -> list[bytes]:
    """The encoded bytes of the images at global `indices`."""
    ...

  def where(self, index: int) -> str:
    """The place of image `index`, for the messages."""
    ...


class EncodedImages(LazyRows):
  """Encoded images seen as uint8 [N, S, S, 3]: their crops, decoded when read.

  Indexing by integers (`x[i]`, `x[indices]`, `np.asarray(x)`) decodes the
  images asked for and gives their evaluation crops (resize to S / 0.875,
  center crop S): deterministic. `augmented(indices, seed, epoch, source)`
  gives the training crops (random-resized-crop and flip, drawn from
  `crops.example_rng(seed, epoch, source, index)`). A slice `x[a:b]` is an
  unread view, as `RecordImages`'s.

  Attributes:
    shape: (N, S, S, 3).
    dtype: uint8.
    size: S.
    reads: how many images this object and its views have decoded (in
      this process).
  """

  dtype = np.dtype(np.uint8)
  ndim = 4

  def __init__(self, store: Store, count: int, size: int) -> None:
    integer_at_least("data.image_size", size, 1)
    self.store, self.size = store, int(size)
    self.shape = (int(count), self.size, self.size, 3)
    self.start = 0  # a view's first row among all the images
    self._reads = [0]  # shared with the views

  @property
  def reads(self) -> int:
    """Images decoded by this object and its views, in this process."""
    return self._reads[0]

  def __len__(self) -> int:
    return self.shape[0]

  def __repr__(self) -> str:
    return f"EncodedImages(uint8{list(self.shape)}, rows {self.start}:{self.start + len(self)})"

  def view(self, start: int, stop: int) -> "EncodedImages":
    """Rows `[start, stop)` of these images, unread.

    Args:
      start: the first row.
      stop: the row after the last.

    Returns:
      An `EncodedImages` of those rows.
    """
    view = copy.copy(self)
    view.start, view.shape = self.start + start, (stop - start, *self.shape[1:])
    return view

  def channel_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The per-channel mean and std the model normalises with: ImageNet's.

    torchvision's statistics of ImageNet (`crops.IMAGENET_MEAN`,
    `crops.IMAGENET_STD`), which its and RobustBench's ImageNet models use;
    a pass over 1.28M JPEGs is not made to recompute them.

    Returns:
      `(mean, std)`, 3 floats each.
    """
    return crops.IMAGENET_MEAN, crops.IMAGENET_STD

  def _encoded(self, indices: np.ndarray) -> tuple[np.ndarray, list[bytes]]:
    indices = np.asarray(indices, np.int64).reshape(-1)
    if len(indices):
      require(
        indices.min() >= 0 and indices.max() < len(self),
        f"image indices must lie in [0, {len(self)})",
      )
    rows = indices + self.start
    self._reads[0] += len(rows)
    return rows, self.store.records(rows) if len(rows) else []

  def read(self, indices: np.ndarray) -> np.ndarray:
    """The evaluation crops of the images at `indices`.

    Args:
      indices: integer indices in [0, N), any order.

    Returns:
      uint8 images [len(indices), S, S, 3].
    """
    rows, records = self._encoded(indices)
    out = np.empty((len(rows), *self.shape[1:]), np.uint8)
    for row, (index, record) in enumerate(zip(rows, records)):
      image = crops.open_rgb(record, self.store.where(int(index)))
      out[row] = crops.eval_crop(image, self.size)
    return out

  def augmented(self, indices: np.ndarray, seed: int, epoch: int, source: int = 0) -> np.ndarray:
    """The training crops and flips of the images at `indices` in epoch `epoch`.

    Args:
      indices: integer indices in [0, N), any order.
      seed: the run's seed.
      epoch: the epoch.
      source: which data set of a mixture (0: the first).

    Returns:
      uint8 images [len(indices), S, S, 3]; each a function of (seed, epoch,
      source, its index among all the rows).
    """
    rows, records = self._encoded(indices)
    out = np.empty((len(rows), *self.shape[1:]), np.uint8)
    for row, (index, record) in enumerate(zip(rows, records)):
      image = crops.open_rgb(record, self.store.where(int(index)))
      rng = crops.example_rng(seed, epoch, source, int(index))
      out[row] = crops.train_crop(image, rng, self.size)
    return out
