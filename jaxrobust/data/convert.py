"""Writes any data source as a `records:` directory of ArrayRecord shards.

`convert(source, out_dir)` reads each split of `source` (any name
`jaxrobust.data.load` takes) and writes its images as uint8 records, one
shard of `shard_size` images at a time, with the labels and the metadata
(`jaxrobust.data.records`). A `folder:` directory is read one file at a time
(never more than one shard of images in memory); the array sources (`digits`,
`npz:`, `idx:`, `tfds:`) are loaded whole, as `load` does. Float images
become `round(255 * x)` (exact for images that were uint8). An `imagenet:`
folder's files are stored as they are (their JPEG bytes, one file in memory
at a time), to be decoded and cropped when read.

The directory is written beside `out_dir` and moved into place when every
split is written, so a failed conversion leaves nothing behind and an
existing `out_dir` untouched.
"""

import functools
import io
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxrobust.checks import InputError, integer_at_least, one_of, require
from jaxrobust.data import folder as folder_lib
from jaxrobust.data import imagenet
from jaxrobust.data.dataset import SPLITS, path_for_split
from jaxrobust.data.records import FORMAT, METADATA, VERSION, labels_name, shard_name

ENCODINGS = ("raw", "png", "jpeg")
DEFAULT_SHARD_SIZE = 10_000


class SplitReader:
  """One split of a source, as uint8 images [H, W, C] and labels, in the source's order.

  Attributes:
    count: the number of examples.
    shape: (H, W, C).
    num_classes: the number of classes.
    class_names: their names, or None.
  """

  count: int
  shape: tuple[int, ...]
  num_classes: int
  class_names: list[str] | None

  def __iter__(self) -> Iterator[tuple[np.ndarray, int]]:
    raise NotImplementedError


class ArraySplit(SplitReader):
  """A split loaded whole by `jaxrobust.data.load` (the array sources, `records:`)."""

  def __init__(self, name: str, split: str, data_dir: str | None, cache_dir: Any) -> None:
    from jaxrobust.data import load  # pylint: disable=g-import-not-at-top

    dataset = load(name, split, data_dir=data_dir, cache_dir=cache_dir)
    self.x, self.y = dataset
    self.count, self.shape = len(self.y), tuple(self.x.shape[1:])
    self.num_classes, self.class_names = dataset.num_classes, dataset.class_names

  def __iter__(self) -> Iterator[tuple[np.ndarray, int]]:
    chunk = 1024
    for start in range(0, self.count, chunk):
      images = np.asarray(self.x[start : start + chunk])
      if images.dtype != np.uint8:
        images = np.round(images * np.float32(255)).astype(np.uint8)
      yield from zip(images, self.y[start : start + chunk].tolist())


class FolderSplit(SplitReader):
  """A `folder:` split, decoded one file at a time in `load`'s order (classes interleaved)."""

  def __init__(self, path: Path, split: str) -> None:
    from PIL import Image  # pylint: disable=g-import-not-at-top

    path = path.resolve()
    entries: list[folder_lib.Entry]
    if path.is_dir():
      files = sorted(f for f in path.rglob("*") if f.is_file())
      entries = [(folder_lib.PurePosixPath(f.relative_to(path).as_posix()), f) for f in files]
    else:  # a tarball: its files' (encoded) bytes are read into memory
      entries = folder_lib._tarball_entries(path)
    classes = folder_lib._class_files(entries, split, path)
    listed = [(label, entry) for label, group in enumerate(classes.values()) for entry in group]
    order = folder_lib.interleaved(np.asarray([label for label, _ in listed]))
    self.files = [(f"{path}/{listed[i][1][0]}", listed[i][1][1], listed[i][0]) for i in order]
    sizes: set[tuple[int, int]] = set()
    grey = True
    for name, data, _ in self.files:  # headers only: size and mode
      try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
          size, mode = (image.height, image.width), image.mode
      except (OSError, SyntaxError, ValueError) as error:
        raise InputError(f"cannot decode image {name}: {error}") from error
      if size not in sizes and sizes:
        first = self.files[0][0]
        raise InputError(
          f"image {name} is {size[0]}x{size[1]} pixels but {first} is "
          f"{'x'.join(map(str, next(iter(sizes))))}; all images must have one size"
        )
      sizes.add(size)
      grey &= mode in folder_lib._GREY_MODES
    self.count = len(self.files)
    self.shape = (*next(iter(sizes)), 1 if grey else 3)
    self.num_classes, self.class_names = len(classes), list(classes)

  def __iter__(self) -> Iterator[tuple[np.ndarray, int]]:
    for name, data, label in self.files:
      pixels = folder_lib._decode_image(data, name)
      yield np.broadcast_to(pixels, self.shape), label


def open_split(
  source: str, split: str, data_dir: str | None = None, cache_dir: Any = None
) -> SplitReader:
  """A reader of split `split` of `source`: streaming for `folder:`, else whole.

  Args:
    source: a data set name (`jaxrobust.data.load`'s).
    split: "train" or "test".
    data_dir: tensorflow-datasets' data directory.
    cache_dir: `folder:`'s cache (used by tarballs only through `load`).

  Returns:
    The reader.
  """
  kind, _, argument = source.partition(":")
  if kind == "folder" and argument:
    path = path_for_split(argument, split).expanduser()
    require(path.exists(), f"data path {path} does not exist")
    return FolderSplit(path, split)
  return ArraySplit(source, split, data_dir, cache_dir)


def _encode(image: np.ndarray, encoding: str) -> bytes:
  if encoding == "raw":
    return np.ascontiguousarray(image).tobytes()
  from PIL import Image  # pylint: disable=g-import-not-at-top

  buffer = io.BytesIO()
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
  return buffer.getvalue()


def _write_shard(path: Path, images: Sequence[np.ndarray], encoding: str) -> np.ndarray:
  """Writes one shard; returns the histogram [C, 256] of its pixels."""
  from array_record.python.array_record_module import (  # pylint: disable=g-import-not-at-top
    ArrayRecordWriter,
  )

  writer = ArrayRecordWriter(str(path), "group_size:1")
  try:
    for image in images:
      writer.write(_encode(image, encoding))
  finally:
    writer.close()
  pixels = np.stack(images).reshape(-1, images[0].shape[-1])
  return np.stack([np.bincount(pixels[:, c], minlength=256) for c in range(pixels.shape[1])])


def write_split(
  reader: SplitReader,
  directory: Path,
  split: str,
  *,
  shard_size: int,
  encoding: str,
  progress: bool,
) -> dict[str, Any]:
  """Writes split `split` of `reader` into `directory`: its shards and labels.

  Args:
    reader: the split.
    directory: where to write.
    split: "train" or "test".
    shard_size: images per shard.
    encoding: "raw" or "png".
    progress: show a progress bar (only when stderr is a terminal).

  Returns:
    The split's metadata: count, shards, records per shard, histogram.
  """
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  shards = max(1, -(-reader.count // shard_size))
  names: list[str] = []
  records: list[int] = []
  labels = np.empty(reader.count, np.int32)
  histogram = np.zeros((reader.shape[-1], 256), np.int64)
  batch: list[np.ndarray] = []
  bar = tqdm(
    total=reader.count, desc=split, unit="img", disable=not (progress and sys.stderr.isatty())
  )
  with bar:
    for i, (image, label) in enumerate(reader):
      batch.append(np.asarray(image, np.uint8))
      labels[i] = label
      if len(batch) == shard_size or i == reader.count - 1:
        names.append(shard_name(split, len(names), shards))
        histogram += _write_shard(directory / names[-1], batch, encoding)
        records.append(len(batch))
        bar.update(len(batch))
        batch = []
  np.save(directory / labels_name(split), labels)
  return {
    "count": reader.count,
    "shards": names,
    "records": records,
    "histogram": histogram.tolist(),
  }


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
  require(
    not out_dir.exists() or out_dir.is_dir(), f"output {out_dir} exists and is not a directory"
  )
  require(
    overwrite or not out_dir.exists() or not any(out_dir.iterdir()),
    f"output directory {out_dir} is not empty; pass --overwrite to replace it",
  )


def _check_splits_agree(readers: dict[str, SplitReader], source: str) -> None:
  first, *rest = readers
  for split in rest:
    a, b = readers[first], readers[split]
    require(
      a.shape == b.shape,
      f"{source}: {first} images are {list(a.shape)} but {split} images are {list(b.shape)}",
    )
    require(
      (a.num_classes, a.class_names) == (b.num_classes, b.class_names),
      f"{source}: {first} has {a.num_classes} classes but {split} has {b.num_classes} "
      f"(or other class names); records hold one set of classes",
    )


def convert(
  source: str,
  out_dir: str | os.PathLike[str],
  *,
  shard_size: int = DEFAULT_SHARD_SIZE,
  encoding: str | None = None,
  splits: Sequence[str] = SPLITS,
  overwrite: bool = False,
  progress: bool = True,
  data_dir: str | None = None,
  cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
  """Writes the splits `splits` of data set `source` as a records directory.

  Args:
    source: any name `jaxrobust.data.load` takes.
    out_dir: the directory to write; it must not exist or be empty, unless
      `overwrite` (then it is replaced once the new one is complete).
    shard_size: images per shard.
    encoding: "raw" (pixel bytes) or "png" (lossless, smaller, decoded when
      read); "jpeg" for an `imagenet:` source, whose files are stored as
      they are, one record each (metadata `"shape": null`: decoded and
      cropped when read). Default: "jpeg" for `imagenet:`, else "raw".
    splits: the splits to convert.
    overwrite: replace a non-empty `out_dir`.
    progress: show a progress bar per split when stderr is a terminal.
    data_dir: tensorflow-datasets' data directory, for `tfds:` sources.
    cache_dir: `folder:`'s cache of decoded tarballs.

  Returns:
    The directory, to load as `records:<it>`.

  Raises:
    InputError: for a bad source, setting or output directory; nothing is
      written then.
  """
  integer_at_least("shard_size", shard_size, 1)
  kind, _, argument = source.partition(":")
  files = kind == "imagenet" and bool(argument)
  encoding = encoding or ("jpeg" if files else "raw")
  one_of("encoding", encoding, ENCODINGS)
  require(
    files or encoding != "jpeg",
    "--encoding jpeg stores the original files of an imagenet: source; store other sources "
    "as raw or png",
  )
  require(
    not files or encoding == "jpeg",
    f"the images of {source} differ in size: they are stored as their original files "
    f"(--encoding jpeg), not {encoding}",
  )
  require(splits, "no splits to convert")
  for split in splits:
    one_of("split", split, SPLITS)
  out = Path(out_dir).expanduser().absolute()
  _check_out_dir(out, overwrite)
  if files:
    metadata, writers = _imagenet_writers(Path(argument).expanduser(), splits, shard_size, progress)
  else:
    metadata, writers = _array_writers(
      source, splits, shard_size, encoding, progress, data_dir, cache_dir
    )
  metadata = {"format": FORMAT, "version": VERSION, "source": source, **metadata, "splits": {}}
  partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
  shutil.rmtree(partial, ignore_errors=True)
  partial.mkdir(parents=True)
  try:
    for split, write in writers.items():
      metadata["splits"][split] = write(partial)
    (partial / METADATA).write_text(json.dumps(metadata, indent=1) + "\n")
    _move_into_place(partial, out)
  except BaseException:
    shutil.rmtree(partial, ignore_errors=True)
    raise
  return out


Writers = dict[str, Callable[[Path], dict[str, Any]]]


def _array_writers(
  source: str,
  splits: Sequence[str],
  shard_size: int,
  encoding: str,
  progress: bool,
  data_dir: str | None,
  cache_dir: Any,
) -> tuple[dict[str, Any], Writers]:
  """The metadata and the split writers of a source of decoded images of one shape."""
  readers = {split: open_split(source, split, data_dir, cache_dir) for split in splits}
  _check_splits_agree(readers, source)
  reader = readers[splits[0]]
  metadata = {
    "encoding": encoding,
    "shape": list(reader.shape),
    "classes": reader.num_classes,
    "class_names": reader.class_names,
  }
  writers: Writers = {
    split: functools.partial(
      write_split,
      split_reader,
      split=split,
      shard_size=shard_size,
      encoding=encoding,
      progress=progress,
    )
    for split, split_reader in readers.items()
  }
  return metadata, writers


def _imagenet_writers(
  root: Path, splits: Sequence[str], shard_size: int, progress: bool
) -> tuple[dict[str, Any], Writers]:
  """The metadata and the split writers of an ILSVRC-layout folder: its files' bytes."""
  require(
    not (root / METADATA).exists(), f"{root} is a records directory already; nothing to convert"
  )
  for split in splits:  # every split is checked before anything is written
    imagenet.list_split(root, split)
  wnids = imagenet.class_names(root)
  metadata = {"encoding": "jpeg", "shape": None, "classes": len(wnids), "class_names": wnids}
  writers: Writers = {
    split: functools.partial(
      imagenet.write_files_split, root, split, shard_size=shard_size, progress=progress
    )
    for split in splits
  }
  return metadata, writers


def _move_into_place(partial: Path, out: Path) -> None:
  """Replaces `out` (absent, empty, or to be overwritten) by `partial`."""
  old = out.with_name(f".{out.name}.old-{os.getpid()}")
  if out.exists():
    os.replace(out, old)
  os.replace(partial, out)
  shutil.rmtree(old, ignore_errors=True)
