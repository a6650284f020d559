"""`Dataset`, and the checks every data source's arrays go through."""

from pathlib import Path

import numpy as np

from jaxrobust.checks import require

SPLITS = ("train", "test")


class Dataset(tuple):
  """Images and labels of one split: unpacks as `x, y = dataset`.

  Attributes:
    x: float32 images in [0, 1], shape [N, H, W, C], C-contiguous.
    y: int32 labels in [0, num_classes), shape [N].
    num_classes: number of classes.
    class_names: the name of each class, or None when the source has none.
  """

  def __new__(cls, x, y, num_classes, class_names=None):
    dataset = super().__new__(cls, (x, y))
    dataset.num_classes = num_classes
    dataset.class_names = class_names
    return dataset

  def __getnewargs__(self):
    return (self.x, self.y, self.num_classes, self.class_names)

  @property
  def x(self):
    return self[0]

  @property
  def y(self):
    return self[1]

  def __repr__(self):
    return (
      f"Dataset(x={self.x.dtype}{list(self.x.shape)}, "
      f"y={self.y.dtype}{list(self.y.shape)}, "
      f"num_classes={self.num_classes})"
    )


def path_for_split(template, split):
  return Path(template.replace("{split}", split)).expanduser()


def require_exists(path):
  require(path.exists(), f"data path {path} does not exist")
  return path


def unit_images(images, where):
  """`images` as C-contiguous float32 [N, H, W, C] in [0, 1].

  uint8 images are divided by 255; float images must already lie in [0, 1];
  [N, H, W] images get a channel axis of size 1.
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


def make_dataset(images, labels, num_classes, class_names, where):
  """A validated `Dataset` of `images` and integer `labels` from `where`."""
  x = unit_images(images, where)
  labels = np.asarray(labels)
  require(
    labels.ndim == 1 and np.issubdtype(labels.dtype, np.integer),
    f"labels in {where} must be integers of shape [N], got {labels.dtype} of shape {labels.shape}",
  )
  require(len(x) == len(labels), f"{where} holds {len(x)} images but {len(labels)} labels")
  require(len(x) > 0, f"{where} holds no examples")
  outside = labels[(labels < 0) | (labels >= num_classes)]
  require(
    outside.size == 0,
    f"labels in {where} must lie in [0, {num_classes}), got {sorted(set(outside.tolist()))[:5]}",
  )
  require(
    class_names is None or len(class_names) == num_classes,
    f"{where} names {len(class_names or ())} classes but has {num_classes}",
  )
  return Dataset(x, labels.astype(np.int32), int(num_classes), class_names)


def labels_max_plus_one(labels):
  labels = np.asarray(labels)
  return int(labels.max()) + 1 if labels.size else 0
