"""Data sets prepared by tensorflow-datasets, read without TensorFlow."""

import os
from pathlib import Path

import numpy as np

from jaxrobust.checks import InputError, require
from jaxrobust.data.dataset import Dataset, make_dataset


def _tfds_data_dir(data_dir: str | None) -> str:
  """The data directory tensorflow-datasets uses for `data_dir`."""
  return str(
    Path(data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets").expanduser()
  )


def _tfds_not_prepared(name: str, data_dir: str | None, reason: str) -> InputError:
  root = _tfds_data_dir(data_dir)
  return InputError(
    f"tfds:{name} is not prepared in {root} ({reason}), and this machine "
    f"cannot download it. Prepare it once where it can be downloaded: "
    f'`pip install tensorflow-cpu`, then `python -c "import '
    f"tensorflow_datasets as tfds; tfds.builder('{name}', "
    f"data_dir='{root}').download_and_prepare()\"`; or copy a prepared "
    f"{name}/ directory into {root}."
  )


def load_tfds(name: str, split: str, data_dir: str | None) -> Dataset:
  """A data set prepared by tensorflow-datasets, read as `jaxrobust.data.load` says.

  Nothing is downloaded.

  Args:
    name: the tensorflow-datasets name, e.g. "mnist".
    split: "train" or "test".
    data_dir: tensorflow-datasets' data directory (None: its default).

  Returns:
    The split's `Dataset`.
  """
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise _tfds_not_prepared(
      name, data_dir, f"tensorflow_datasets cannot be imported: {error}"
    ) from error
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.DatasetNotFoundError as error:
    raise InputError(
      f"unknown tensorflow-datasets data set {name!r} (see tfds.list_builders())"
    ) from error
  try:
    records = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  # tfds raises several types (NotImplementedError, FileNotFoundError, ...)
  # for a data set that is not prepared; which one depends on its state.
  except Exception as error:  # pylint: disable=broad-except
    if not builder.is_prepared():
      raise _tfds_not_prepared(name, data_dir, "no prepared files") from error
    raise InputError(
      f"cannot read split {split!r} of tfds:{name} from {builder.data_dir}: {error}"
    ) from error
  features = builder.info.features
  require(
    "image" in features and "label" in features,
    f"tfds:{name} must have features 'image' and 'label', it has {', '.join(features.keys())}",
  )
  # One record at a time: tfds' mock data source does not support batched
  # `__getitems__`.
  examples = [records[i] for i in range(len(records))]
  images = np.stack([example["image"] for example in examples])
  labels = np.asarray([example["label"] for example in examples])
  label = features["label"]
  return make_dataset(
    images, labels, label.num_classes, list(label.names), f"tfds:{name} ({split})"
  )
