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
| `records:<dir>` | ArrayRecord shards of uint8 images (`convert` writes them), read lazily |
| `imagenet:<dir>` | ImageNet in the ILSVRC layout, or its records conversion, cropped when read |

In `npz:`, `idx:` and `folder:` paths, `{split}` is replaced by the split name,
so one name can point at a training and a test file.

Batches are numpy arrays: `train_batches` (shuffled, resumable at any step,
per process), `mixed_batches` (a fixed fraction of every batch from a second
data set), `eval_batches` (in order, padded and masked); `to_devices` splits
one over a mesh, `local_to_global` assembles one from each process's rows. A
`records:` data set's images stay uint8 on the host: `as_float` makes them
float32 on the device.
"""

import os
from pathlib import Path
from typing import Any

from jaxrobust.checks import InputError, one_of, require
from jaxrobust.data.arrays import load_digits, load_idx, load_npz
from jaxrobust.data.batches import (
  channel_stats,
  epoch_permutation,
  eval_batches,
  pixel_histogram,
  to_devices,
  train_batches,
)
from jaxrobust.data.dataset import SPLITS, Dataset, path_for_split
from jaxrobust.data.encoded import EncodedImages
from jaxrobust.data.folder import cache_directory, load_folder
from jaxrobust.data.imagenet import load_imagenet
from jaxrobust.data.mixture import check_extra_fraction, extra_count, mixed_batches, steps_per_epoch
from jaxrobust.data.records import RecordImages, load_records
from jaxrobust.data.stream import as_float, host_float, local_to_global, process_rows
from jaxrobust.data.tfds import load_tfds

SOURCES = (
  "digits",
  "npz:<path>",
  "idx:<dir>",
  "folder:<path>",
  "tfds:<name>",
  "records:<dir>",
  "imagenet:<dir>",
)


def load(
  name: str,
  split: str,
  *,
  data_dir: str | None = None,
  cache_dir: str | os.PathLike[str] | None = None,
  image_size: int = 224,
) -> Dataset:
  """Loads split `split` ("train" or "test") of the data set `name`.

  Sources:
    `digits`: the 1,797 8x8 grey digits bundled with scikit-learn, pixel
      values divided by 16, 10 classes. Fixed split, stratified: the examples
      are shuffled by `np.random.default_rng(0).permutation(1797)` and the
      first 30 of each class in that order (300) form "test"; the other 1,497
      form "train". Both are returned in that shuffled order.
    `npz:<path>`: arrays `x_<split>` and `y_<split>` when the file holds both,
      else `x` and `y`, else `image` and `label` (the layout of the generated
      images of Gowal et al. 2021 and Wang et al. 2023), so a file holding
      only `x` and `y` serves either split: name two files with `{split}`. Images are uint8 (divided by 255)
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
    `records:<dir>`: a directory written by `jaxrobust.data.convert`
      (`jaxrobust-data convert SOURCE DIR`): ArrayRecord shards read with
      random access. `x` is a `RecordImages`: uint8 [N, H, W, C], read only
      where indexed; `y` int32 labels. `as_float` turns its batches into the
      float32 values of the other sources (an `imagenet:` conversion's `x`
      is an `EncodedImages`).
    `imagenet:<dir>`: ImageNet in the ILSVRC layout or its records
      conversion (`jaxrobust.data.imagenet`); `x` an `EncodedImages` uint8
      [N, S, S, 3] of crops (S: `image_size`), decoded when read.

  Args:
    name: one of the sources above.
    split: "train" or "test".
    data_dir: tensorflow-datasets' data directory (default: `$TFDS_DATA_DIR`,
      else `~/tensorflow_datasets`); other sources ignore it.
    cache_dir: where `folder:` caches decoded images (default:
      `$JAXROBUST_CACHE`, else `~/.cache/jaxrobust`).
    image_size: the side of `imagenet:`'s crops; other sources ignore it.

  Returns:
    A `Dataset` (`x, y = load(...)` unpacks the images and labels): x float32
    in [0, 1], except `records:`'s uint8 `RecordImages` and `imagenet:`'s
    uint8 `EncodedImages`.

  Raises:
    InputError: for an unknown name or split, a missing, unreadable or
      inconsistent file, or a data set that is not prepared.
  """
  one_of("split", split, SPLITS)
  require(isinstance(name, str), f"data set name must be a string, got {name!r}")
  dataset = _load_source(name, split, data_dir, cache_dir, image_size)
  if dataset is None:
    raise InputError(f"unknown data set {name!r}; the sources are {', '.join(SOURCES)}")
  return dataset


def _load_source(
  name: str, split: str, data_dir: str | None, cache_dir: Any, image_size: int
) -> Dataset | None:
  """Split `split` of the source `name` names (None: no source of that name)."""
  source, _, argument = name.partition(":")
  if name == "digits":
    return load_digits(split)
  if not argument:
    return None
  if source == "npz":
    return load_npz(path_for_split(argument, split), split)
  if source == "idx":
    return load_idx(path_for_split(argument, split), split)
  if source == "folder":
    return load_folder(path_for_split(argument, split), split, cache_directory(cache_dir))
  if source == "tfds":
    return load_tfds(argument, split, data_dir)
  if source == "records":
    return load_records(path_for_split(argument, split), split, image_size)
  if source == "imagenet":
    return load_imagenet(Path(argument), split, image_size)
  return None
