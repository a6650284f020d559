"""Data sets stored as arrays: scikit-learn's digits, `.npz` files, MNIST's IDX files."""

import gzip
import math
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np

from jaxrobust.checks import InputError, require
from jaxrobust.data.dataset import Dataset, labels_max_plus_one, make_dataset, require_exists

DIGITS_TEST_PER_CLASS = 30
_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049
_IDX_PREFIX = {"train": "train", "test": "t10k"}


def load_digits(split: str) -> Dataset:
  """scikit-learn's 8x8 digits, split as `jaxrobust.data.load` says.

  Args:
    split: "train" or "test".

  Returns:
    The split's `Dataset`.
  """
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

  digits = load_digits()
  labels = digits.target
  order = np.random.default_rng(0).permutation(len(labels))
  is_test = np.zeros(len(labels), bool)
  for label in range(len(digits.target_names)):
    is_test[order[labels[order] == label][:DIGITS_TEST_PER_CLASS]] = True
  chosen = order[is_test[order] == (split == "test")]
  return make_dataset(
    digits.images[chosen] / 16,
    labels[chosen],
    len(digits.target_names),
    [str(name) for name in digits.target_names],
    "digits",
  )


def load_npz(path: Path, split: str) -> Dataset:
  """A data set from a `.npz` archive, read as `jaxrobust.data.load` says.

  Args:
    path: the archive.
    split: "train" or "test".

  Returns:
    The split's `Dataset`.
  """
  require_exists(path)
  try:
    archive = np.load(path, allow_pickle=False)
  except (ValueError, EOFError, zipfile.BadZipFile) as error:  # numpy's advice on pickles: not ours
    raise InputError(f"{path} is not a valid .npz archive (of arrays x and y)") from error
  except OSError as error:
    raise InputError(f"cannot read {path}: {error.strerror or error}") from error
  require(
    isinstance(archive, np.lib.npyio.NpzFile),
    f"{path} holds a single array; expected a .npz archive of x and y",
  )
  with archive:
    keys = set(archive.files)
    layouts = [(f"x_{split}", f"y_{split}"), ("x", "y"), ("image", "label")]
    found = [pair for pair in layouts if set(pair) <= keys]
    require(
      found,
      f"{path} must hold arrays x and y (or x_{split} and y_{split}, or image "
      f"and label); it holds {', '.join(sorted(keys)) or 'none'}",
    )
    images, labels = archive[found[0][0]], archive[found[0][1]]
    class_names = [str(name) for name in archive["class_names"]] if "class_names" in keys else None
  num_classes = len(class_names) if class_names is not None else labels_max_plus_one(labels)
  return make_dataset(images, labels, num_classes, class_names, path)


def load_idx(directory: Path, split: str) -> Dataset:
  """A data set from MNIST's IDX files, read as `jaxrobust.data.load` says.

  Args:
    directory: the folder of the files.
    split: "train" or "test".

  Returns:
    The split's `Dataset`.
  """
  require_exists(directory)
  prefix = _IDX_PREFIX[split]
  images, image_file = _read_idx(directory / f"{prefix}-images-idx3-ubyte", _IDX_IMAGES_MAGIC)
  labels, label_file = _read_idx(directory / f"{prefix}-labels-idx1-ubyte", _IDX_LABELS_MAGIC)
  require(
    len(images) == len(labels),
    f"{image_file} holds {len(images)} images but {label_file} holds {len(labels)} labels",
  )
  return make_dataset(images, labels, labels_max_plus_one(labels), None, image_file)


def _read_idx(stem: Path, magic: int) -> tuple[np.ndarray, Path]:
  """The uint8 array in IDX file `stem` or `stem.gz`, and that file's path.

  The header is the big-endian int32 `magic` (whose low byte is the number of
  dimensions), then one int32 per dimension; the data must fill the rest
  exactly.
  """
  path = stem if stem.exists() else stem.with_name(stem.name + ".gz")
  require(path.exists(), f"IDX file {stem} (or {path.name}) does not exist")
  try:
    data = path.read_bytes()
    if path.suffix == ".gz":
      data = gzip.decompress(data)
  except (OSError, EOFError, zlib.error) as error:
    raise InputError(f"cannot read IDX file {path}: {error}") from error
  ndim = magic & 0xFF
  header_size = 4 * (1 + ndim)
  require(
    len(data) >= header_size,
    f"IDX file {path} is truncated: {len(data)} bytes, less than its {header_size}-byte header",
  )
  found_magic, *shape = struct.unpack(f">{1 + ndim}i", data[:header_size])
  require(found_magic == magic, f"IDX file {path} has magic number {found_magic}, expected {magic}")
  size = math.prod(shape)
  require(
    len(data) - header_size == size,
    f"IDX file {path} is truncated or corrupt: its header gives shape "
    f"{tuple(shape)} ({size} bytes), but {len(data) - header_size} "
    f"bytes follow it",
  )
  return np.frombuffer(data, np.uint8, offset=header_size).reshape(shape), path
