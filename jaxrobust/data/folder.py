"""Image folders (one sub-folder per class), as directories or tar archives,
decoded with Pillow once and cached as arrays."""

import hashlib
import io
import os
import tarfile
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from jaxtyping import ArrayLike

from jaxrobust.checks import InputError, require
from jaxrobust.data.dataset import SPLITS, Dataset, make_dataset, require_exists

# (path relative to the root, the file's bytes or path)
Entry = tuple[PurePosixPath, Any]

_CACHE_FORMAT = 2  # 2: classes interleaved (`interleaved`)
_GREY_MODES = ("1", "L", "LA")


def cache_directory(cache_dir: str | os.PathLike[str] | None) -> Path:
  """Where `folder:` caches decoded images.

  Args:
    cache_dir: the folder, or None for `$JAXROBUST_CACHE`, else
      `~/.cache/jaxrobust`.

  Returns:
    The folder, `~` expanded.
  """
  return Path(cache_dir or os.environ.get("JAXROBUST_CACHE") or "~/.cache/jaxrobust").expanduser()


def load_folder(path: Path, split: str, cache_dir: Path) -> Dataset:
  """A data set from a folder of class folders, read as `jaxrobust.data.load` says.

  Args:
    path: a directory or a tar archive of class folders.
    split: "train" or "test".
    cache_dir: where the decoded images are cached.

  Returns:
    The split's `Dataset`.
  """
  path = require_exists(path).resolve()
  entries: list[Entry] | None
  fingerprint: Any
  if path.is_dir():
    entries = [
      (PurePosixPath(file.relative_to(path).as_posix()), file)
      for file in sorted(path.rglob("*"))
      if file.is_file()
    ]
    fingerprint = [(str(relative), *_size_and_mtime(file)) for relative, file in entries]
  else:
    entries = None  # read from the tarball only on a cache miss
    fingerprint = _size_and_mtime(path)
  key = repr((_CACHE_FORMAT, str(path), split, fingerprint))
  cache_file = (
    cache_dir / f"{path.name}-{split}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
  )
  cached = _read_cache(cache_file)
  if cached is None:
    if entries is None:
      entries = _tarball_entries(path)
    classes = _class_files(entries, split, path)
    cached = _decode_classes(classes, path)
    _write_cache(cache_file, cached)
  class_names = [str(name) for name in cached["class_names"]]
  return make_dataset(cached["images"], cached["labels"], len(class_names), class_names, path)


def interleaved(labels: ArrayLike) -> np.ndarray:
  """The order that takes the first image of every class, then the second, ...

  Within a class the files keep their sorted order. Any prefix or suffix of a
  folder data set (the first test images an evaluation takes, the validation
  slice held out at the end of the training set) then holds every class in
  proportion, not the first or last classes.

  Args:
    labels: integer labels [N].

  Returns:
    The indices [N] of the examples in that order.
  """
  labels = np.asarray(labels)
  rank = np.empty(len(labels), np.int64)
  for label in np.unique(labels):
    where = np.flatnonzero(labels == label)
    rank[where] = np.arange(len(where))
  return np.lexsort((labels, rank))


def _size_and_mtime(path: Path) -> tuple[int, int]:
  status = path.stat()
  return status.st_size, status.st_mtime_ns


def _tarball_entries(path: Path) -> list[Entry]:
  """(relative path, bytes) of every regular file in the tar archive `path`."""
  entries = []
  try:
    with tarfile.open(path, "r|*") as tar:
      for member in tar:
        if member.isfile():
          file = tar.extractfile(member)
          assert file is not None  # a regular file
          entries.append((PurePosixPath(member.name), file.read()))
  except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
    raise InputError(
      f"cannot read {path} as a directory or tar archive of class folders: {error}"
    ) from error
  return entries


def _class_files(entries: Sequence[Entry], split: str, root: Path) -> dict[str, list[Entry]]:
  """Groups (relative path, data) entries into {class name: sorted entries}.

  Classes are the sorted top-level folders, or those under `<split>/` when
  the top level has `train/` or `test/` folders.
  """
  visible = [
    (relative, data)
    for relative, data in entries
    if not any(part.startswith(".") for part in relative.parts)
  ]
  split_folders = {relative.parts[0] for relative, _ in visible if len(relative.parts) > 1} & set(
    SPLITS
  )
  depth = 0
  if split_folders:
    require(
      split in split_folders,
      f"{root} has split folders {', '.join(sorted(split_folders))} but no {split}/ folder",
    )
    visible = [entry for entry in visible if entry[0].parts[0] == split]
    depth = 1
  classes: dict[str, list[Entry]] = {}
  for relative, data in visible:
    if len(relative.parts) > depth + 1:  # not a file beside the class folders
      classes.setdefault(relative.parts[depth], []).append((relative, data))
  require(classes, f"{root} has no class folders holding files")
  return {name: sorted(classes[name], key=lambda entry: entry[0]) for name in sorted(classes)}


def _decode_classes(classes: dict[str, list[Entry]], root: Path) -> dict[str, np.ndarray]:
  """Decodes {class name: [(relative path, data)]} into the arrays to cache."""
  names: list[str] = []
  images: list[np.ndarray] = []
  label_list: list[int] = []
  for label, entries in enumerate(classes.values()):
    for relative, data in entries:
      names.append(f"{root}/{relative}")
      images.append(_decode_image(data, names[-1]))
      label_list.append(label)
  size = images[0].shape[:2]
  for image, name in zip(images, names):
    require(
      image.shape[:2] == size,
      f"image {name} is {image.shape[0]}x{image.shape[1]} pixels but "
      f"{names[0]} is {size[0]}x{size[1]}; all images must have one size",
    )
  channels = max(image.shape[2] for image in images)  # grey ones become RGB
  labels = np.asarray(label_list, np.int32)
  order = interleaved(labels)
  return {
    "images": np.stack([np.broadcast_to(images[i], (*size, channels)) for i in order]),
    "labels": labels[order],
    "class_names": np.asarray(list(classes), dtype=str),
  }


def _decode_image(data: Any, name: str) -> np.ndarray:
  """uint8 pixels [H, W, 1] (grey) or [H, W, 3] (RGB) of image bytes or file."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  try:
    source = io.BytesIO(data) if isinstance(data, bytes) else data
    with Image.open(source) as image:
      grey = image.mode in _GREY_MODES
      pixels = np.asarray(image.convert("L" if grey else "RGB"))
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
    raise InputError(f"cannot decode image {name}: {error}") from error
  return pixels[..., None] if grey else pixels


def _read_cache(path: Path) -> dict[str, np.ndarray] | None:
  """The arrays cached in `path`, or None if it is missing or unreadable."""
  try:
    with np.load(path, allow_pickle=False) as cached:
      return {key: cached[key] for key in ("images", "labels", "class_names")}
  except (KeyError, OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error):
    return None


def _write_cache(path: Path, arrays: dict[str, Any]) -> None:
  """Writes `arrays` to the .npz file `path` atomically; warns on failure."""
  temporary = None
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")
    with os.fdopen(descriptor, "wb") as file:
      np.savez(file, **arrays)
    os.replace(temporary, path)
  except OSError as error:
    if temporary:
      Path(temporary).unlink(missing_ok=True)
    warnings.warn(f"could not cache decoded images in {path}: {error}", stacklevel=2)
