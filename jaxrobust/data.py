"""Image-classification data sets as numpy arrays, and their batches.

`load(name, split)` returns a `Dataset`: images `x` as float32 in [0, 1]
(NHWC, C-contiguous) and int32 labels `y`, from one of these sources:

| name | source |
| --- | --- |
| `digits` | scikit-learn's bundled 8x8 digits (offline; the default) |
| `npz:<path>` | a `.npz` file of arrays |
| `idx:<dir>` | MNIST-format IDX files, gzip'd or not |
| `folder:<path>` | one sub-folder of images per class, or a tarball of them |
| `tfds:<name>` | a prepared tensorflow-datasets data set |

In `npz:`, `idx:` and `folder:` paths, `{split}` is replaced by the split name,
so one name can point at a training and a test file.

Batches are numpy arrays: `train_batches` (shuffled, resumable at any step),
`eval_batches` (in order, padded and masked); `to_devices` splits one over a
mesh.
"""
import gzip
import hashlib
import io
import math
import os
import struct
import tarfile
import tempfile
import warnings
import zipfile
import zlib
from pathlib import Path, PurePosixPath

import jax
import numpy as np

from jaxrobust import parallel
from jaxrobust.checks import InputError, integer_at_least, one_of, require

SPLITS = ("train", "test")
SOURCES = ("digits", "npz:<path>", "idx:<dir>", "folder:<path>", "tfds:<name>")
DIGITS_TEST_PER_CLASS = 30
_CACHE_FORMAT = 1
_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049
_IDX_PREFIX = {"train": "train", "test": "t10k"}
_GREY_MODES = ("1", "L", "LA")


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
    return (f"Dataset(x={self.x.dtype}{list(self.x.shape)}, "
            f"y={self.y.dtype}{list(self.y.shape)}, "
            f"num_classes={self.num_classes})")


def load(name, split, *, data_dir=None, cache_dir=None):
  """Loads split `split` ("train" or "test") of the data set `name`.

  Sources:
    `digits`: the 1,797 8x8 grey digits bundled with scikit-learn, pixel
      values divided by 16, 10 classes. Fixed split, stratified: the examples
      are shuffled by `np.random.default_rng(0).permutation(1797)` and the
      first 30 of each class in that order (300) form "test"; the other 1,497
      form "train". Both are returned in that shuffled order.
    `npz:<path>`: arrays `x_<split>` and `y_<split>` when the file holds both,
      else `x` and `y` (so a file holding only `x` and `y` serves either
      split: name two files with `{split}`). Images are uint8 (divided by 255)
      or floats in [0, 1], [N, H, W] or [N, H, W, C]; labels are integers. An
      optional array `class_names` names the classes and fixes their number;
      without it the number of classes is the largest label + 1.
    `idx:<dir>`: `train-images-idx3-ubyte` and `train-labels-idx1-ubyte` for
      "train", `t10k-...` for "test", each optionally ending in `.gz`. Pixels
      are divided by 255; the number of classes is the largest label + 1.
    `folder:<path>`: a directory, or a tar archive (such as `.tar.gz`), of
      one sub-folder per class; class `i` is the `i`-th folder name in sorted
      order (classes are the folders that hold files). When the top level
      holds `train/` or `test/` folders, the class folders are read from
      `<split>/`. Every file under a class folder (at any depth; names
      starting with "." skipped) must be an image of one common size;
      examples are ordered by class, then relative file name. Images are
      decoded with Pillow to grey when all of them are grey (modes 1, L, LA),
      else to RGB. The decoded arrays are cached in `cache_dir`, keyed by the
      absolute path, size and modification time (of each file, for a
      directory). Tarballs are read as a stream, never extracted.
    `tfds:<name>`: `tfds.data_source(name, split=split, data_dir=data_dir)`
      of a data set prepared with tensorflow-datasets, with features "image"
      (uint8, divided by 255) and "label"; classes and their names come from
      the data set's info. Nothing is ever downloaded.

  Args:
    name: one of the sources above.
    split: "train" or "test".
    data_dir: tensorflow-datasets' data directory (default: `$TFDS_DATA_DIR`,
      else `~/tensorflow_datasets`); other sources ignore it.
    cache_dir: where `folder:` caches decoded images (default:
      `$JAXROBUST_CACHE`, else `~/.cache/jaxrobust`).

  Returns:
    A `Dataset` (`x, y = load(...)` unpacks the images and labels).

  Raises:
    InputError: for an unknown name or split, a missing, unreadable or
      inconsistent file, or a data set that is not prepared.
  """
  one_of("split", split, SPLITS)
  require(isinstance(name, str),
          f"data set name must be a string, got {name!r}")
  source, _, argument = name.partition(":")
  if name == "digits":
    return _load_digits(split)
  if source == "npz" and argument:
    return _load_npz(_path_for_split(argument, split), split)
  if source == "idx" and argument:
    return _load_idx(_path_for_split(argument, split), split)
  if source == "folder" and argument:
    return _load_folder(_path_for_split(argument, split), split,
                        _cache_directory(cache_dir))
  if source == "tfds" and argument:
    return _load_tfds(argument, split, data_dir)
  raise InputError(f"unknown data set {name!r}; the sources are "
                   f"{', '.join(SOURCES)}")


def _path_for_split(template, split):
  return Path(template.replace("{split}", split)).expanduser()


def _require_exists(path):
  require(path.exists(), f"data path {path} does not exist")
  return path


def _unit_images(images, where):
  """`images` as C-contiguous float32 [N, H, W, C] in [0, 1].

  uint8 images are divided by 255; float images must already lie in [0, 1];
  [N, H, W] images get a channel axis of size 1.
  """
  images = np.asarray(images)
  if images.ndim == 3:
    images = images[..., None]
  require(images.ndim == 4,
          f"images in {where} must have shape [N, H, W] or [N, H, W, C], "
          f"got {images.shape}")
  if images.dtype == np.uint8:
    return np.ascontiguousarray(images / np.float32(255))
  require(np.issubdtype(images.dtype, np.floating),
          f"images in {where} must be uint8 (0..255) or floats in [0, 1], "
          f"got dtype {images.dtype}")
  images = np.ascontiguousarray(images, dtype=np.float32)
  require(not np.isnan(images).any(), f"images in {where} contain NaN")
  low, high = float(images.min(initial=0.0)), float(images.max(initial=1.0))
  require(low >= 0.0 and high <= 1.0,
          f"float images in {where} must lie in [0, 1], got values in "
          f"[{low:g}, {high:g}]")
  return images


def _dataset(images, labels, num_classes, class_names, where):
  """A validated `Dataset` of `images` and integer `labels` from `where`."""
  x = _unit_images(images, where)
  labels = np.asarray(labels)
  require(labels.ndim == 1 and np.issubdtype(labels.dtype, np.integer),
          f"labels in {where} must be integers of shape [N], got "
          f"{labels.dtype} of shape {labels.shape}")
  require(len(x) == len(labels),
          f"{where} holds {len(x)} images but {len(labels)} labels")
  require(len(x) > 0, f"{where} holds no examples")
  outside = labels[(labels < 0) | (labels >= num_classes)]
  require(outside.size == 0,
          f"labels in {where} must lie in [0, {num_classes}), got "
          f"{sorted(set(outside.tolist()))[:5]}")
  require(class_names is None or len(class_names) == num_classes,
          f"{where} names {len(class_names or ())} classes but has "
          f"{num_classes}")
  return Dataset(x, labels.astype(np.int32), int(num_classes), class_names)


def _load_digits(split):
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  digits = load_digits()
  labels = digits.target
  order = np.random.default_rng(0).permutation(len(labels))
  is_test = np.zeros(len(labels), bool)
  for label in range(len(digits.target_names)):
    is_test[order[labels[order] == label][:DIGITS_TEST_PER_CLASS]] = True
  chosen = order[is_test[order] == (split == "test")]
  return _dataset(digits.images[chosen] / 16, labels[chosen],
                  len(digits.target_names),
                  [str(name) for name in digits.target_names], "digits")


def _load_npz(path, split):
  _require_exists(path)
  try:
    archive = np.load(path, allow_pickle=False)
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
    raise InputError(
        f"cannot read {path} as a .npz archive: {error}") from error
  require(isinstance(archive, np.lib.npyio.NpzFile),
          f"{path} holds a single array; expected a .npz archive of x and y")
  with archive:
    keys = set(archive.files)
    suffix = f"_{split}" if {f"x_{split}", f"y_{split}"} <= keys else ""
    require({f"x{suffix}", f"y{suffix}"} <= keys,
            f"{path} must hold arrays x and y (or x_{split} and y_{split}); "
            f"it holds {', '.join(sorted(keys)) or 'none'}")
    images, labels = archive[f"x{suffix}"], archive[f"y{suffix}"]
    class_names = ([str(name) for name in archive["class_names"]]
                   if "class_names" in keys else None)
  num_classes = (len(class_names) if class_names is not None
                 else _labels_max_plus_one(labels))
  return _dataset(images, labels, num_classes, class_names, path)


def _labels_max_plus_one(labels):
  labels = np.asarray(labels)
  return int(labels.max()) + 1 if labels.size else 0


def _load_idx(directory, split):
  _require_exists(directory)
  prefix = _IDX_PREFIX[split]
  images, image_file = _read_idx(directory / f"{prefix}-images-idx3-ubyte",
                                 _IDX_IMAGES_MAGIC)
  labels, label_file = _read_idx(directory / f"{prefix}-labels-idx1-ubyte",
                                 _IDX_LABELS_MAGIC)
  require(len(images) == len(labels),
          f"{image_file} holds {len(images)} images but {label_file} holds "
          f"{len(labels)} labels")
  return _dataset(images, labels, _labels_max_plus_one(labels), None,
                  image_file)


def _read_idx(stem, magic):
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
  require(len(data) >= header_size,
          f"IDX file {path} is truncated: {len(data)} bytes, less than its "
          f"{header_size}-byte header")
  found_magic, *shape = struct.unpack(f">{1 + ndim}i", data[:header_size])
  require(found_magic == magic,
          f"IDX file {path} has magic number {found_magic}, expected {magic}")
  size = math.prod(shape)
  require(len(data) - header_size == size,
          f"IDX file {path} is truncated or corrupt: its header gives shape "
          f"{tuple(shape)} ({size} bytes), but {len(data) - header_size} "
          f"bytes follow it")
  return np.frombuffer(data, np.uint8, offset=header_size).reshape(shape), path


def _cache_directory(cache_dir):
  return Path(cache_dir or os.environ.get("JAXROBUST_CACHE")
              or "~/.cache/jaxrobust").expanduser()


def _load_folder(path, split, cache_dir):
  path = _require_exists(path).resolve()
  if path.is_dir():
    entries = [(PurePosixPath(file.relative_to(path).as_posix()), file)
               for file in sorted(path.rglob("*")) if file.is_file()]
    fingerprint = [(str(relative), *_size_and_mtime(file))
                   for relative, file in entries]
  else:
    entries = None  # read from the tarball only on a cache miss
    fingerprint = _size_and_mtime(path)
  key = repr((_CACHE_FORMAT, str(path), split, fingerprint))
  cache_file = (cache_dir / f"{path.name}-{split}-"
                f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz")
  cached = _read_cache(cache_file)
  if cached is None:
    if entries is None:
      entries = _tarball_entries(path)
    classes = _class_files(entries, split, path)
    cached = _decode_classes(classes, path)
    _write_cache(cache_file, cached)
  class_names = [str(name) for name in cached["class_names"]]
  return _dataset(cached["images"], cached["labels"], len(class_names),
                  class_names, path)


def _size_and_mtime(path):
  status = path.stat()
  return status.st_size, status.st_mtime_ns


def _tarball_entries(path):
  """(relative path, bytes) of every regular file in the tar archive `path`."""
  entries = []
  try:
    with tarfile.open(path, "r|*") as tar:
      for member in tar:
        if member.isfile():
          entries.append((PurePosixPath(member.name),
                          tar.extractfile(member).read()))
  except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
    raise InputError(f"cannot read {path} as a directory or tar archive of "
                     f"class folders: {error}") from error
  return entries


def _class_files(entries, split, root):
  """Groups (relative path, data) entries into {class name: sorted entries}.

  Classes are the sorted top-level folders, or those under `<split>/` when
  the top level has `train/` or `test/` folders.
  """
  entries = [(relative, data) for relative, data in entries
             if not any(part.startswith(".") for part in relative.parts)]
  split_folders = {relative.parts[0] for relative, _ in entries
                   if len(relative.parts) > 1} & set(SPLITS)
  depth = 0
  if split_folders:
    require(split in split_folders,
            f"{root} has split folders {', '.join(sorted(split_folders))} but "
            f"no {split}/ folder")
    entries = [entry for entry in entries if entry[0].parts[0] == split]
    depth = 1
  classes = {}
  for relative, data in entries:
    if len(relative.parts) > depth + 1:  # not a file beside the class folders
      classes.setdefault(relative.parts[depth], []).append((relative, data))
  require(classes, f"{root} has no class folders holding files")
  return {name: sorted(classes[name], key=lambda entry: entry[0])
          for name in sorted(classes)}


def _decode_classes(classes, root):
  """Decodes {class name: [(relative path, data)]} into the arrays to cache."""
  names, images, labels = [], [], []
  for label, entries in enumerate(classes.values()):
    for relative, data in entries:
      names.append(f"{root}/{relative}")
      images.append(_decode_image(data, names[-1]))
      labels.append(label)
  size = images[0].shape[:2]
  for image, name in zip(images, names):
    require(image.shape[:2] == size,
            f"image {name} is {image.shape[0]}x{image.shape[1]} pixels but "
            f"{names[0]} is {size[0]}x{size[1]}; all images must have one size")
  channels = max(image.shape[2] for image in images)  # grey ones become RGB
  return {
      "images": np.stack([np.broadcast_to(image, (*size, channels))
                          for image in images]),
      "labels": np.asarray(labels, np.int32),
      "class_names": np.asarray(list(classes), dtype=str),
  }


def _decode_image(data, name):
  """uint8 pixels [H, W, 1] (grey) or [H, W, 3] (RGB) of image bytes or file."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    source = io.BytesIO(data) if isinstance(data, bytes) else data
    with Image.open(source) as image:
      grey = image.mode in _GREY_MODES
      pixels = np.asarray(image.convert("L" if grey else "RGB"))
  except (OSError, SyntaxError, ValueError,
          Image.DecompressionBombError) as error:
    raise InputError(f"cannot decode image {name}: {error}") from error
  return pixels[..., None] if grey else pixels


def _read_cache(path):
  """The arrays cached in `path`, or None if it is missing or unreadable."""
  try:
    with np.load(path, allow_pickle=False) as cached:
      return {key: cached[key] for key in ("images", "labels", "class_names")}
  except (KeyError, OSError, ValueError, EOFError, zipfile.BadZipFile,
          zlib.error):
    return None


def _write_cache(path, arrays):
  """Writes `arrays` to the .npz file `path` atomically; warns on failure."""
  temporary = None
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=".",
                                             suffix=".tmp")
    with os.fdopen(descriptor, "wb") as file:
      np.savez(file, **arrays)
    os.replace(temporary, path)
  except OSError as error:
    if temporary:
      Path(temporary).unlink(missing_ok=True)
    warnings.warn(f"could not cache decoded images in {path}: {error}")


def _tfds_data_dir(data_dir):
  """The data directory tensorflow-datasets uses for `data_dir`."""
  return str(Path(data_dir or os.environ.get("TFDS_DATA_DIR")
                  or "~/tensorflow_datasets").expanduser())


def _tfds_not_prepared(name, data_dir, reason):
  root = _tfds_data_dir(data_dir)
  return InputError(
      f"tfds:{name} is not prepared in {root} ({reason}), and this machine "
      f"cannot download it. Prepare it once where it can be downloaded: "
      f"`pip install tensorflow-cpu`, then `python -c \"import "
      f"tensorflow_datasets as tfds; tfds.builder('{name}', "
      f"data_dir='{root}').download_and_prepare()\"`; or copy a prepared "
      f"{name}/ directory into {root}.")


def _load_tfds(name, split, data_dir):
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise _tfds_not_prepared(
        name, data_dir, f"tensorflow_datasets cannot be imported: {error}"
    ) from error
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.DatasetNotFoundError as error:
    raise InputError(f"unknown tensorflow-datasets data set {name!r} (see "
                     f"tfds.list_builders())") from error
  try:
    records = tfds.data_source(name, split=split, data_dir=data_dir,
                               download=False)
  # tfds raises several types (NotImplementedError, FileNotFoundError, ...)
  # for a data set that is not prepared; which one depends on its state.
  except Exception as error:  # pylint: disable=broad-except
    if not builder.is_prepared():
      raise _tfds_not_prepared(name, data_dir, "no prepared files") from error
    raise InputError(f"cannot read split {split!r} of tfds:{name} from "
                     f"{builder.data_dir}: {error}") from error
  features = builder.info.features
  require("image" in features and "label" in features,
          f"tfds:{name} must have features 'image' and 'label', it has "
          f"{', '.join(features.keys())}")
  # One record at a time: tfds' mock data source does not support batched
  # `__getitems__`.
  examples = [records[i] for i in range(len(records))]
  images = np.stack([example["image"] for example in examples])
  labels = np.asarray([example["label"] for example in examples])
  label = features["label"]
  return _dataset(images, labels, label.num_classes, list(label.names),
                  f"tfds:{name} ({split})")


def epoch_permutation(n, seed, epoch):
  """The order in which epoch `epoch` visits `n` examples.

  Returns `np.random.default_rng([seed, epoch]).permutation(n)`: it depends
  only on `n`, `seed` and `epoch`.
  """
  integer_at_least("n", n, 0)
  integer_at_least("seed", seed, 0)
  integer_at_least("epoch", epoch, 0)
  return np.random.default_rng([seed, epoch]).permutation(n)


def _check_examples(x, y):
  x, y = np.asarray(x), np.asarray(y)
  require(x.ndim >= 1 and len(x) == len(y),
          f"x and y must have the same leading size, got shapes {x.shape} "
          f"and {y.shape}")
  return x, y


def train_batches(x, y, batch_size, *, seed, start_step=0):
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
  x, y = _check_examples(x, y)
  integer_at_least("batch_size", batch_size, 1)
  require(batch_size <= len(x),
          f"batch_size {batch_size} exceeds the {len(x)} examples")
  integer_at_least("seed", seed, 0)
  integer_at_least("start_step", start_step, 0)
  return _train_batches(x, y, batch_size, seed, start_step)


def _train_batches(x, y, batch_size, seed, start_step):
  steps_per_epoch = len(x) // batch_size
  epoch, position = divmod(start_step, steps_per_epoch)
  while True:
    order = epoch_permutation(len(x), seed, epoch)
    for step in range(position, steps_per_epoch):
      indices = order[step * batch_size:(step + 1) * batch_size]
      yield x[indices], y[indices]
    epoch, position = epoch + 1, 0


def eval_batches(x, y, batch_size, *, multiple_of=1):
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
  x, y = _check_examples(x, y)
  integer_at_least("batch_size", batch_size, 1)
  integer_at_least("multiple_of", multiple_of, 1)
  require(batch_size % multiple_of == 0,
          f"batch_size {batch_size} must be a multiple of multiple_of "
          f"{multiple_of}")
  return _eval_batches(x, y, batch_size, multiple_of)


def _eval_batches(x, y, batch_size, multiple_of):
  for start in range(0, len(x), batch_size):
    xb, yb = x[start:start + batch_size], y[start:start + batch_size]
    count = len(xb)
    padded = -(-count // multiple_of) * multiple_of
    if padded > count:
      indices = np.minimum(np.arange(padded), count - 1)
      xb, yb = xb[indices], yb[indices]
    yield xb, yb, np.arange(padded) < count


def to_devices(batch, mesh):
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
    require(len(shape) >= 1 and shape[0] % devices == 0,
            f"every array of the batch needs a leading size divisible by the "
            f"{devices} devices of the mesh, got shape {shape}")
  return jax.device_put(batch, parallel.batch_sharding(mesh))


def channel_stats(x):
  """Per-channel mean and standard deviation of images `x` [N, H, W, C].

  Both are taken over all N * H * W pixels, in float64; the standard deviation
  is the population one (divided by N * H * W).

  Returns:
    `(mean, std)`, each a tuple of C floats.
  """
  x = np.asarray(x)
  require(x.ndim == 4 and x.size > 0,
          f"channel_stats needs non-empty images [N, H, W, C], got shape "
          f"{x.shape}")
  axes = (0, 1, 2)
  mean = x.mean(axis=axes, dtype=np.float64)
  # In chunks, so that no float64 copy of a large data set is made.
  chunk = max(1, 2**22 // math.prod(x.shape[1:]))
  squares = sum(np.square(x[start:start + chunk] - mean).sum(axis=axes)
                for start in range(0, len(x), chunk))
  std = np.sqrt(squares / (x.size // x.shape[-1]))
  return tuple(map(float, mean)), tuple(map(float, std))
