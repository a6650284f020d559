"""`Dataset`, and the checks every data source's arrays go through."""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from jaxtyping import ArrayLike

from jaxrobust.checks import require

SPLITS = ("train", "test")


class Dataset(tuple):
  """Images and labels of one split: unpacks as `x, y = dataset`.

  Attributes:
    x: float32 images in [0, 1], shape [N, H, W, C], C-contiguous; for a
      `records:` data set, its uint8 images read lazily (`RecordImages`).
    y: int32 labels in [0, num_classes), shape [N].
    num_classes: number of classes.
    class_names: the name of each class, or None when the source has none.
  """

  num_classes: int
  class_names: list[str] | None

  def __new__(
    cls, x: np.ndarray, y: np.ndarray, num_classes: int, class_names: list[str] | None = None
  ) -> "Dataset":
    dataset = super().__new__(cls, (x, y))
    dataset.num_classes = num_classes
    dataset.class_names = class_names
    return dataset

  def __getnewargs__(self) -> tuple[Any, ...]:  # type: ignore[override]
    return (self.x, self.y, self.num_classes, self.class_names)

  @property
  def x(self) -> np.ndarray:
    """The images [N, H, W, C]: float32 in [0, 1], or a `RecordImages` of uint8."""
    return self[0]

  @property
  def y(self) -> np.ndarray:
    """The labels, int32 [N]."""
    return self[1]

  def __repr__(self) -> str:
    return (
      f"Dataset(x={self.x.dtype}{list(self.x.shape)}, "
      f"y={self.y.dtype}{list(self.y.shape)}, "
      f"num_classes={self.num_classes})"
    )


def path_for_split(template: str, split: str) -> Path:
  """`template` with `{split}` replaced by `split`, `~` expanded.

  Args:
    template: a path, possibly holding `{split}`.
    split: "train" or "test".

  Returns:
    The path.
  """
  return Path(template.replace("{split}", split)).expanduser()


def require_exists(path: Path) -> Path:
  """Returns `path` if it exists, else raises InputError.

  Args:
    path: the path to check.

  Returns:
    `path`.
  """
  require(path.exists(), f"data path {path} does not exist")
  return path


def unit_images(images: ArrayLike, where: object) -> np.ndarray:
  """`images` as C-contiguous float32 [N, H, W, C] in [0, 1].

  uint8 images are divided by 255; float images must already lie in [0, 1];
  [N, H, W] images get a channel axis of size 1.

  Args:
    images: [N, H, W] or [N, H, W, C] images, uint8 or floats.
    where: where they come from, for the messages.

  Returns:
    The float32 images [N, H, W, C].
  """
  images = np.asarray(images)
  if images.ndim == 3:
    images = images[..., None]
  require(
    images.ndim == 4,
    f"images in {where} must have shape [N, H, W] or [N, H, W, C], got {images.shape}",
  )
  if images.dtype == np.uint8:
    return np.ascontiguousarray(images / np.float32(255))
  require(
    np.issubdtype(images.dtype, np.floating),
    f"images in {where} must be uint8 (0..255) or floats in [0, 1], got dtype {images.dtype}",
  )
  images = np.ascontiguousarray(images, dtype=np.float32)
  require(not np.isnan(images).any(), f"images in {where} contain NaN")
  low, high = float(images.min(initial=0.0)), float(images.max(initial=1.0))
  require(
    low >= 0.0 and high <= 1.0,
    f"float images in {where} must lie in [0, 1], got values in [{low:g}, {high:g}]",
  )
  return images


def make_dataset(
  images: ArrayLike,
  labels: ArrayLike,
  num_classes: int,
  class_names: Sequence[str] | None,
  where: object,
) -> Dataset:
  """A validated `Dataset` of `images` and integer `labels` from `where`.

  Args:
    images: the images (see `unit_images`).
    labels: integer labels [N] in [0, num_classes).
    num_classes: the number of classes.
    class_names: one name per class, or None.
    where: where they come from, for the messages.

  Returns:
    The data set.
  """
  x = unit_images(images, where)
  y = np.asarray(labels)
  require(
    y.ndim == 1 and np.issubdtype(y.dtype, np.integer),
    f"labels in {where} must be integers of shape [N], got {y.dtype} of shape {y.shape}",
  )
  require(len(x) == len(y), f"{where} holds {len(x)} images but {len(y)} labels")
  require(len(x) > 0, f"{where} holds no examples")
  outside = y[(y < 0) | (y >= num_classes)]
  require(
    outside.size == 0,
    f"labels in {where} must lie in [0, {num_classes}), got {sorted(set(outside.tolist()))[:5]}",
  )
  require(
    class_names is None or len(class_names) == num_classes,
    f"{where} names {len(class_names or ())} classes but has {num_classes}",
  )
  names = None if class_names is None else list(class_names)
  return Dataset(x, y.astype(np.int32), int(num_classes), names)


def labels_max_plus_one(labels: ArrayLike) -> int:
  """The number of classes when labels are all that is known: the largest + 1.

  Args:
    labels: integer labels.

  Returns:
    The largest label + 1, or 0 for no labels.
  """
  y = np.asarray(labels)
  return int(y.max()) + 1 if y.size else 0
