"""`imagenet:<dir>`: ImageNet in the ILSVRC layout, or its records conversion.

The ILSVRC layout is

  <dir>/train/<wnid>/*.JPEG   the training images, one folder per class
  <dir>/val/<wnid>/*.JPEG     the validation images (the "test" split), sorted
                              into the same class folders

Class `i` is the `i`-th training folder (wnid) in sorted order: torchvision's
`ImageFolder` order, so the labels of RobustBench's ImageNet models match.
When `<dir>` holds a `metadata.json` it is read as the records directory
`jaxrobust-data convert imagenet:<dir> OUT` writes (the original JPEG bytes,
one record each). Either way the images are decoded and cropped only when
read (`EncodedImages`): nothing is read at load time but the file listing.
"""

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from jaxrobust.checks import InputError, require
from jaxrobust.data.dataset import Dataset
from jaxrobust.data.encoded import EncodedImages
from jaxrobust.data.folder import interleaved
from jaxrobust.data.records import METADATA, labels_name, load_records, shard_name

FOLDERS = {"train": "train", "test": "val"}
SUFFIXES = (".jpeg", ".jpg", ".png")


class FileStore:
  """Image files under `root`, by index: their relative names as bytes."""

  def __init__(self, root: Path, names: np.ndarray) -> None:
    self.root, self.names = str(root), names

  def records(self, indices: np.ndarray) -> list[bytes]:
    """The bytes of the files at `indices`.

    Args:
      indices: integer indices into the names.

    Returns:
      Each file's bytes.
    """
    out = []
    for index in np.asarray(indices).tolist():
      try:
        out.append(Path(self.where(index)).read_bytes())
      except OSError as error:
        raise InputError(f"cannot read the image {self.where(index)}: {error}") from error
    return out

  def where(self, index: int) -> str:
    """The path of file `index`.

    Args:
      index: the file's index.

    Returns:
      `root/name`.
    """
    return os.path.join(self.root, self.names[index].decode())


def class_folders(folder: Path) -> list[str]:
  """The class folders (wnids) of `folder`, sorted; names starting with "." skipped.

  Args:
    folder: a split's folder.

  Returns:
    The folder names.
  """
  return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def split_folder(root: Path, split: str) -> Path:
  """The folder of split `split` ("train": `train/`, "test": `val/`), checked.

  Args:
    root: the ImageNet directory.
    split: "train" or "test".

  Returns:
    The folder.
  """
  require(
    root.is_dir(),
    f"ImageNet directory {root} does not exist; it should hold the ILSVRC layout "
    f"train/<wnid>/*.JPEG and val/<wnid>/*.JPEG (or its records conversion)",
  )
  name = FOLDERS[split]
  folder = root / name
  require(
    folder.is_dir(),
    f"ImageNet directory {root} has no {name}/ folder (the ILSVRC layout: {name}/<wnid>/*.JPEG)",
  )
  return folder


def list_split(root: Path, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """The image files of split `split` of an ILSVRC-layout directory, and their labels.

  Files are listed, not opened. The order takes the first file of every
  class, then the second, ... (`folder.interleaved`), each class's files in
  sorted order, so any prefix holds every class.

  Args:
    root: the ImageNet directory.
    split: "train" or "test".

  Returns:
    (names relative to the split's folder as a bytes array, int32 labels,
    the wnids of the classes).
  """
  wnids = class_folders(split_folder(root, "train"))
  require(wnids, f"{root / 'train'} holds no class folders (train/<wnid>/*.JPEG)")
  folder = split_folder(root, split)
  found = class_folders(folder)
  require(
    found,
    f"{folder} holds no class folders: sort the validation images into "
    f"{FOLDERS[split]}/<wnid>/ (the ILSVRC layout torchvision's ImageFolder reads)",
  )
  unknown = sorted(set(found) - set(wnids))
  require(not unknown, f"{folder} has class folders not in {root / 'train'}: {unknown[:5]}")
  names: list[str] = []
  labels: list[int] = []
  for label, wnid in enumerate(wnids):
    if wnid not in found:
      continue
    files = sorted(
      e.name
      for e in os.scandir(folder / wnid)
      if e.is_file() and not e.name.startswith(".") and e.name.lower().endswith(SUFFIXES)
    )
    names += [f"{wnid}/{name}" for name in files]
    labels += [label] * len(files)
  require(names, f"{folder} holds no images ({', '.join(SUFFIXES)})")
  order = interleaved(np.asarray(labels))
  return np.asarray(names, np.bytes_)[order], np.asarray(labels, np.int32)[order], wnids


def load_imagenet(root: Path, split: str, image_size: int = 224) -> Dataset:
  """Split `split` of ImageNet at `root`: its records conversion, or the ILSVRC folders.

  Args:
    root: the directory.
    split: "train" or "test" (the `val/` folder).
    image_size: the side S of the crops.

  Returns:
    A `Dataset` whose `x` is an `EncodedImages` [N, S, S, 3], `y` int32
    labels, and the wnids as class names.
  """
  root = root.expanduser()
  if (root / METADATA).is_file():
    return load_records(root, split, image_size)
  names, labels, wnids = list_split(root, split)
  x: Any = EncodedImages(FileStore(split_folder(root, split), names), len(names), image_size)
  return Dataset(x, labels, len(wnids), wnids)


def write_files_split(
  root: Path, split: str, directory: Path, *, shard_size: int, progress: bool
) -> dict[str, Any]:
  """Writes the files of split `split` as records of their bytes (not decoded), streaming.

  One file is in memory at a time; shards hold `shard_size` records each,
  in `list_split`'s order.

  Args:
    root: the ILSVRC-layout directory.
    split: "train" or "test".
    directory: where to write the shards and the labels.
    shard_size: records per shard.
    progress: show a progress bar (only when stderr is a terminal).

  Returns:
    The split's metadata: count, shards, records per shard.
  """
  from array_record.python.array_record_module import (  # pylint: disable=g-import-not-at-top
    ArrayRecordWriter,
  )
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  names, labels, _ = list_split(root, split)
  store = FileStore(split_folder(root, split), names)
  shards = -(-len(names) // shard_size)
  shard_names = [shard_name(split, k, shards) for k in range(shards)]
  records = [min(shard_size, len(names) - k * shard_size) for k in range(shards)]
  bar = tqdm(
    total=len(names), desc=split, unit="img", disable=not (progress and sys.stderr.isatty())
  )
  with bar:
    for k, name in enumerate(shard_names):
      writer = ArrayRecordWriter(str(directory / name), "group_size:1")
      try:
        for index in range(k * shard_size, k * shard_size + records[k]):
          writer.write(store.records(np.asarray([index]))[0])
      finally:
        writer.close()
      bar.update(records[k])
  np.save(directory / labels_name(split), labels)
  return {"count": len(names), "shards": shard_names, "records": records}


def class_names(root: Path) -> list[str]:
  """The wnids of ImageNet at `root` (its training class folders), sorted.

  Args:
    root: the ILSVRC-layout directory.

  Returns:
    The wnids.
  """
  return class_folders(split_folder(root, "train"))
