"""`records:<dir>`: data sets stored as ArrayRecord shards of uint8 images.

A records directory holds, for each split it has:

  <split>-NNNNN-of-MMMMM.array_record   the images, one record each, in order
  <split>-labels.npy                    the int32 labels, in the same order

and one `metadata.json` (`METADATA`) that gives the encoding ("raw": the
H * W * C pixel bytes; "png" or "jpeg": an encoded image), the image shape
[H, W, C] (null: the original files of an `imagenet:` folder, of any size,
read as `EncodedImages` crops), the number of classes and their names, and
per split the count,
the shard file names, the records in each shard and a per-channel histogram
of the pixel values (so that the channel statistics need no pass over the
images). `jaxrobust.data.convert` writes such directories.

Images are read by index, with random access, only when asked for:
`RecordImages` is the array-like `x` of a record-backed `Dataset`.
"""

import copy
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxrobust.checks import InputError, require
from jaxrobust.data.dataset import Dataset
from jaxrobust.data.encoded import EncodedImages
from jaxrobust.data.lazy import LazyRows

METADATA = "metadata.json"
FORMAT = "jaxrobust.records"
VERSION = 1
ENCODINGS = ("raw", "png", "jpeg")


def shard_name(split: str, index: int, count: int) -> str:
  """The file name of shard `index` of `count` of split `split`.

  Args:
    split: "train" or "test".
    index: the shard's index, from 0.
    count: the number of shards of the split.

  Returns:
    `<split>-NNNNN-of-MMMMM.array_record`.
  """
  return f"{split}-{index:05d}-of-{count:05d}.array_record"


def labels_name(split: str) -> str:
  """The file name of split `split`'s labels.

  Args:
    split: "train" or "test".

  Returns:
    `<split>-labels.npy`.
  """
  return f"{split}-labels.npy"


def decode(record: bytes, encoding: str, shape: Sequence[int], where: object) -> np.ndarray:
  """The uint8 pixels [H, W, C] of one record.

  Args:
    record: the record's bytes.
    encoding: "raw", "png" or "jpeg".
    shape: the image shape [H, W, C] every record must have.
    where: the record's place, for the messages.

  Returns:
    The image.
  """
  if encoding == "raw":
    require(
      len(record) == math.prod(shape),
      f"{where} holds {len(record)} bytes, not the {math.prod(shape)} of a "
      f"{'x'.join(map(str, shape))} uint8 image",
    )
    return np.frombuffer(record, np.uint8).reshape(shape)
  from PIL import Image  # pylint: disable=g-import-not-at-top

  try:
    with Image.open(io.BytesIO(record)) as image:
      grey = image.mode in ("1", "L", "LA")
      pixels = np.asarray(image.convert("L" if grey else "RGB"))
  except (OSError, SyntaxError, ValueError) as error:
    raise InputError(f"cannot decode the {encoding} image in {where}: {error}") from error
  pixels = pixels.reshape(*pixels.shape[:2], -1)
  if grey and shape[-1] == 3:  # a grey image among colour ones, as `folder:` reads it
    pixels = np.repeat(pixels, 3, axis=-1)
  require(
    pixels.shape == tuple(shape),
    f"{where} is a {'x'.join(map(str, pixels.shape))} image, not {'x'.join(map(str, shape))}",
  )
  return pixels


def read_metadata(directory: Path) -> dict[str, Any]:
  """The checked metadata of the records directory `directory`.

  Args:
    directory: the directory.

  Returns:
    The metadata (see the module's docstring).
  """
  require(directory.is_dir(), f"records directory {directory} does not exist")
  path = directory / METADATA
  require(
    path.is_file(), f"{directory} holds no {METADATA}; write one with `jaxrobust-data convert`"
  )
  try:
    metadata = json.loads(path.read_text())
  except (OSError, ValueError) as error:
    raise InputError(f"cannot read {path}: {error}") from error
  require(
    isinstance(metadata, dict) and metadata.get("format") == FORMAT,
    f"{path} is not the metadata of a jaxrobust records directory",
  )
  require(metadata.get("encoding") in ENCODINGS, f"{path}: unknown encoding")
  require(
    metadata.get("shape") is not None or metadata["encoding"] != "raw",
    f"{path}: raw records need an image shape",
  )
  return metadata


def count_pixels(images: Any) -> np.ndarray:
  """How often each value occurs in each channel of uint8 images, read in chunks.

  Args:
    images: uint8 images [N, H, W, C] (numpy, or anything sliced into them).

  Returns:
    int64 counts [C, 256].
  """
  channels = images.shape[-1]
  counts = np.zeros((channels, 256), np.int64)
  chunk = max(1, 2**22 // math.prod(images.shape[1:]))
  for start in range(0, len(images), chunk):
    block = np.asarray(images[start : start + chunk]).reshape(-1, channels)
    for c in range(channels):
      counts[c] += np.bincount(block[:, c], minlength=256)
  return counts


class RecordImages(LazyRows):
  """The uint8 images [N, H, W, C] of one split of a records directory, read lazily.

  Indexing by integers reads only the records asked for: `images[i]` (one
  image), `images[indices]` (an integer array, any order, repeats allowed).
  A slice `images[a:b]` is, as in numpy, a view: a `RecordImages` of those
  rows, read when indexed. `np.asarray(images)` reads every record.

  Attributes:
    shape: (N, H, W, C).
    dtype: uint8.
    reads: how many records this object and its views have read (in this
      process).
  """

  dtype = np.dtype(np.uint8)
  ndim = 4

  def __init__(
    self,
    paths: Sequence[Path],
    counts: Sequence[int],
    shape: Sequence[int],
    encoding: str,
    histogram: Any = None,
  ) -> None:
    self.paths = [str(path) for path in paths]
    self.counts = [int(count) for count in counts]
    self.shape = (sum(self.counts), *map(int, shape))
    self.encoding = encoding
    self.histogram = None if histogram is None else np.asarray(histogram, np.int64)
    self.start = 0  # a view's first row among all the records
    self._reads = [0]  # shared with the views
    self._source: Any = None

  @property
  def reads(self) -> int:
    """Records read by this object and its views, in this process."""
    return self._reads[0]

  def __len__(self) -> int:
    return self.shape[0]

  def __getstate__(self) -> dict[str, Any]:
    return {**self.__dict__, "_source": None}  # each process opens its own readers

  def __repr__(self) -> str:
    rows = f", rows {self.start}:{self.start + len(self)}" if len(self) != sum(self.counts) else ""
    return f"RecordImages(uint8{list(self.shape)}, {self.encoding}, {len(self.paths)} shards{rows})"

  def view(self, start: int, stop: int) -> "RecordImages":
    """Rows `[start, stop)` of these images, unread.

    Args:
      start: the first row.
      stop: the row after the last.

    Returns:
      A `RecordImages` of those rows (sharing this one's open readers and
      read count).
    """
    view = copy.copy(self)
    view.start, view.shape = self.start + start, (stop - start, *self.shape[1:])
    return view

  def pixel_counts(self) -> np.ndarray:
    """The histogram [C, 256] of these images' pixel values.

    From the stored histogram of the split: for a view, less the counts of
    the rows outside it when those are fewer, else counted from its rows.

    Returns:
      int64 counts [C, 256].
    """
    total = sum(self.counts)
    if self.histogram is None or len(self) < total - len(self):
      return count_pixels(self)
    whole = self.view(-self.start, total - self.start)
    before, after = whole[: self.start], whole[self.start + len(self) :]
    return self.histogram - sum(
      (count_pixels(part) for part in (before, after) if len(part)), np.zeros_like(self.histogram)
    )

  def source(self) -> Any:
    """The grain `ArrayRecordDataSource` over the shards (opened on first use).

    Returns:
      The data source: `len`, `__getitem__` and `__getitems__` by global index.
    """
    if self._source is None:
      import grain  # pylint: disable=g-import-not-at-top

      try:
        source = grain.sources.ArrayRecordDataSource(self.paths)
      except Exception:  # array_record raises bare RuntimeErrors  # noqa: BLE001
        source = None
      if source is None or len(source) != sum(self.counts):
        self._check_shards(grain.sources.ArrayRecordDataSource)
      self._source = source
    return self._source

  def _check_shards(self, open_shard: Any) -> None:
    """Raises InputError naming the first shard that cannot be read or holds too few records."""
    for path, count in zip(self.paths, self.counts):
      try:
        found = len(open_shard([path]))
      except Exception as error:  # noqa: BLE001
        raise InputError(f"cannot read the record shard {path}: {error}") from error
      require(
        found == count,
        f"the record shard {path} holds {found} records, but the metadata says {count}",
      )
    raise InputError(f"cannot read the record shards {', '.join(self.paths)}")

  def read(self, indices: np.ndarray) -> np.ndarray:
    """The images at `indices`, decoded.

    Args:
      indices: integer indices in [0, N), any order.

    Returns:
      uint8 images [len(indices), H, W, C].
    """
    indices = np.asarray(indices, np.int64).reshape(-1)
    out = np.empty((len(indices), *self.shape[1:]), np.uint8)
    if not len(indices):
      return out
    require(
      indices.min() >= 0 and indices.max() < len(self),
      f"record indices must lie in [0, {len(self)})",
    )
    records = self.records(indices + self.start)
    self._reads[0] += len(indices)
    for row, (index, record) in enumerate(zip(indices + self.start, records)):
      out[row] = decode(record, self.encoding, self.shape[1:], self.where(int(index)))
    return out

  def records(self, indices: np.ndarray) -> list[bytes]:
    """The stored bytes of the records at `indices` among all the shards' records.

    Args:
      indices: integer indices, any order.

    Returns:
      The records, undecoded.
    """
    return list(self.source().__getitems__(np.asarray(indices, np.int64).tolist()))

  def where(self, index: int) -> str:
    """Record `index` (among all) as "record i of <shard>", for the messages.

    Args:
      index: the record's index among all the shards' records.

    Returns:
      Its place.
    """
    for path, count in zip(self.paths, self.counts):
      if index < count:
        return f"record {index} of {path}"
      index -= count
    return f"record {index}"


def load_records(directory: Path, split: str, image_size: int = 224) -> Dataset:
  """Split `split` of a records directory, its images read lazily.

  Args:
    directory: the records directory.
    split: "train" or "test".
    image_size: the side S of the crops of images stored as their original
      files (metadata `"shape": null`, an ImageNet conversion).

  Returns:
    A `Dataset` whose `x` is a `RecordImages` (uint8), or for original files
    an `EncodedImages` of their crops, and `y` int32 labels.
  """
  metadata = read_metadata(directory)
  splits = metadata.get("splits", {})
  require(
    split in splits,
    f"{directory} has no {split} split (it has {', '.join(sorted(splits)) or 'none'})",
  )
  info = splits[split]
  paths = [directory / name for name in info["shards"]]
  for path in paths:
    require(path.is_file(), f"record shard {path} is missing")
  labels_path = directory / labels_name(split)
  try:
    labels = np.load(labels_path, allow_pickle=False)
  except (OSError, ValueError, EOFError) as error:
    raise InputError(f"cannot read the labels {labels_path}: {error}") from error
  count, classes = int(info["count"]), int(metadata["classes"])
  require(
    labels.shape == (count,) and np.issubdtype(labels.dtype, np.integer),
    f"{labels_path} must hold {count} integer labels, got {labels.dtype}{list(labels.shape)}",
  )
  require(
    count == 0 or (labels.min() >= 0 and labels.max() < classes),
    f"labels in {labels_path} must lie in [0, {classes})",
  )
  shape = metadata["shape"] or (0,)  # null: original files of any size
  images = RecordImages(paths, info["records"], shape, metadata["encoding"], info.get("histogram"))
  require(len(images) == count, f"{directory / METADATA}: {split} shard counts do not sum to count")
  x: Any = images if metadata["shape"] else EncodedImages(images, count, image_size)
  return Dataset(x, labels.astype(np.int32), classes, metadata.get("class_names"))
