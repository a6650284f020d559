"""Converted models as JAX-native checkpoints: orbax variables and a JSON description, no PyTorch.

A checkpoint is a directory:

* `variables/`: the model's variables (`{"params": ..., "batch_stats": ...}`),
  written by orbax's `StandardCheckpointer` as numpy arrays;
* `jaxrobust.json`: what the model is: `format` and `format_version`, the
  architecture's name (`arch`, e.g. "wrn-28-10"), the jaxrobust model and
  its settings (`model`, `settings`: `models.create`'s), `num_classes`, the
  input normalisation (`mean`, `std`), `input_hw` for the models whose
  weights depend on the image size, and, for a model of RobustBench's zoo,
  `zoo`: the entry's name, data set, threat model and eps.

`save` writes the directory into a temporary sibling and renames it, so the
directory exists complete or not at all, and never overwrites one; `load`
reads it back as `(model, variables, metadata)` without importing PyTorch, so
that a TPU host evaluates a zoo model converted elsewhere.
"""

import json
import shutil
import uuid
from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxrobust import checks, models
from jaxrobust.interop import architectures
from jaxrobust.types import Variables

FORMAT = "jaxrobust-flax"
FORMAT_VERSION = 1
METADATA_FILE = "jaxrobust.json"
VARIABLES_DIR = "variables"
# The metadata every checkpoint holds (`zoo`, `input_hw` and `source` are optional).
REQUIRED = ("format", "format_version", "arch", "model", "settings", "num_classes", "mean", "std")


def check_new_directory(path: str | PathLike[str], flag: str = "flax checkpoint") -> Path:
  """The path of a checkpoint `save` can write, checked before the work that makes it.

  Args:
    path: the directory to create.
    flag: how messages name it (e.g. "--export-flax").

  Returns:
    `path` as a `Path`.

  Raises:
    InputError: an empty name, an existing file or directory (never
      overwritten), or a parent folder that does not exist or cannot be written.
  """
  path = Path(path)
  checks.require(str(path).strip(), f"{flag} needs a directory name")
  checks.require(
    not path.exists(),
    f"{flag} {str(path)!r} exists; give a new directory (an existing one is never overwritten)",
  )
  checks.writable_folder(flag, path)
  return path


def describe(
  model: nn.Module,
  variables: Variables,
  *,
  arch: str | None = None,
  zoo: Mapping[str, Any] | None = None,
  source: str | None = None,
) -> dict[str, Any]:
  """The metadata `save` writes for `model`.

  Args:
    model: a jaxrobust model without spectral normalisation or noise.
    variables: its variables.
    arch: the architecture's name (default: the jaxrobust model's).
    zoo: for a zoo model, `{"entry", "dataset", "threat", "eps"}`.
    source: the file converted (recorded as `source`).

  Returns:
    The JSON-ready metadata.

  Raises:
    InputError: a randomized or spectrally normalised model, or another module.
  """
  checks.require(
    not models.is_randomized(model),
    "a randomized model is not exported as a flax checkpoint: export its base classifier, "
    "model.classifier",
  )
  name = architectures.model_name(model)
  checks.require(
    not getattr(model, "spectral", None),
    f"{name} with spectral normalisation is not exported as a flax checkpoint "
    "(export a model without model.spectral)",
  )
  hw = architectures.input_hw(model, variables["params"])
  meta: dict[str, Any] = {
    "format": FORMAT,
    "format_version": FORMAT_VERSION,
    "arch": arch or name,
    "model": name,
    "settings": architectures.model_settings(model),
    "num_classes": int(model.num_classes),
    "mean": [float(v) for v in model.mean],
    "std": [float(v) for v in model.std],
    "input_hw": None if hw is None else list(hw),
  }
  if zoo is not None:
    meta["zoo"] = dict(zoo)
  if source is not None:
    meta["source"] = str(source)
  return meta


def save(
  path: str | PathLike[str],
  model: nn.Module,
  variables: Variables,
  *,
  arch: str | None = None,
  zoo: Mapping[str, Any] | None = None,
  source: str | None = None,
) -> Path:
  """Writes a model as a flax checkpoint directory, atomically.

  Args:
    path: the directory to create (it must not exist).
    model: a jaxrobust model without spectral normalisation or noise.
    variables: its variables.
    arch: the architecture's name (default: the jaxrobust model's).
    zoo: for a zoo model, `{"entry", "dataset", "threat", "eps"}`.
    source: the file converted (recorded as `source`).

  Returns:
    `path` as a `Path`.

  Raises:
    InputError: an existing `path`, a folder that cannot be written, or a
      model `describe` refuses.
  """
  path = check_new_directory(path)
  meta = describe(model, variables, arch=arch, zoo=zoo, source=source)
  arrays = jax.tree.map(np.asarray, jax.device_get(dict(variables)))
  partial = path.absolute().with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
  partial.mkdir()
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(partial / VARIABLES_DIR, arrays)
    (partial / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    check_new_directory(path)  # made meanwhile: kept, and this one dropped
    partial.rename(path)
  except BaseException:
    shutil.rmtree(partial, ignore_errors=True)
    raise
  return path


def is_checkpoint(path: str | PathLike[str]) -> bool:
  """Whether `path` is a directory holding a flax checkpoint's metadata file."""
  return (Path(path) / METADATA_FILE).is_file()


def read_metadata(path: str | PathLike[str]) -> dict[str, Any]:
  """The metadata of the flax checkpoint `path`, checked.

  Args:
    path: the checkpoint's directory.

  Returns:
    The metadata (`describe`'s), settings' lists as tuples.

  Raises:
    InputError: a missing directory or metadata file, one that is not JSON,
      not this format, of a later version, or without a required field.
  """
  path = Path(path)
  checks.require(path.exists(), f"flax checkpoint {str(path)!r} not found")
  checks.require(path.is_dir(), f"flax checkpoint {str(path)!r} is not a directory")
  file = path / METADATA_FILE
  checks.require(
    file.is_file(),
    f"{str(path)!r} is not a flax checkpoint: it has no {METADATA_FILE} "
    "(eval.py --export-flax writes one)",
  )
  try:
    meta = json.loads(file.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise checks.InputError(f"cannot read {str(file)!r}: not JSON ({e})") from None
  checks.require(
    isinstance(meta, dict) and meta.get("format") == FORMAT,
    f'{str(file)!r} does not describe a flax checkpoint (no "format": {FORMAT!r})',
  )
  missing = [k for k in REQUIRED if k not in meta]
  checks.require(not missing, f"{str(file)!r} lacks {', '.join(map(repr, missing))}")
  checks.require(
    isinstance(meta["format_version"], int) and meta["format_version"] <= FORMAT_VERSION,
    f"{str(file)!r} has format_version {meta['format_version']!r}; this jaxrobust reads "
    f"versions up to {FORMAT_VERSION}",
  )
  checks.require(
    isinstance(meta["settings"], dict), f"{str(file)!r}: settings must be a JSON object"
  )
  hw = meta.get("input_hw")
  checks.require(
    hw is None or (isinstance(hw, list) and len(hw) == 2 and all(_positive_int(v) for v in hw)),
    f"{str(file)!r}: input_hw must be null or [height, width], got {hw!r}",
  )
  meta["settings"] = {k: _tuples(v) for k, v in meta["settings"].items()}
  return meta


def _positive_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _tuples(value: Any) -> Any:
  """JSON's lists as tuples (model settings are hashable)."""
  return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def build(meta: Mapping[str, Any], where: str = "the metadata") -> nn.Module:
  """The model the metadata describes.

  Args:
    meta: `read_metadata`'s result.
    where: how messages name its source.

  Returns:
    The Flax module (`models.create`).

  Raises:
    InputError: an unknown model or settings it does not take.
  """
  checks.require(
    meta["model"] in models.MODELS,
    f"{where} names model {meta['model']!r}; jaxrobust has {', '.join(models.MODELS)}",
  )
  try:
    return models.create(
      meta["model"],
      num_classes=int(meta["num_classes"]),
      mean=tuple(float(v) for v in meta["mean"]),
      std=tuple(float(v) for v in meta["std"]),
      **meta["settings"],
    )
  except (TypeError, ValueError) as e:
    raise checks.InputError(f"{where}: model {meta['model']!r} cannot be built: {e}") from None


def _expected_shapes(model: nn.Module, meta: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
  """`{"params/Conv_0/kernel": shape}` of every variable of the model."""
  hw = tuple(meta.get("input_hw") or (32, 32))
  x = jax.ShapeDtypeStruct((1, *hw, len(model.mean)), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  return _by_path(shapes)


def _by_path(tree: Any) -> dict[str, tuple[int, ...]]:
  """`{"a/b/c": shape}` of a nested mapping's leaves."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {
    "/".join(str(getattr(k, "key", k)) for k in path): tuple(np.shape(leaf))
    for path, leaf in leaves
  }


def check_fits(
  stored: Mapping[str, Sequence[int]], expected: Mapping[str, Sequence[int]], what: str
) -> None:
  """Refuses variables that are not those of the architecture, naming the first that differs.

  Args:
    stored: `{"params/.../kernel": shape}` of the checkpoint.
    expected: the same of the architecture.
    what: how the message names the checkpoint and its architecture.

  Raises:
    InputError: a shape that differs, a variable missing, or one too many.
  """
  first = lambda keys: sorted(keys, key=lambda k: (not k.startswith("params/"), k))  # noqa: E731
  for key in first(set(stored) & set(expected)):
    if tuple(stored[key]) != tuple(expected[key]):
      raise checks.InputError(
        f"{what}: {key!r} has shape {tuple(stored[key])} in the checkpoint, "
        f"the architecture needs {tuple(expected[key])}"
      )
  missing, unknown = first(set(expected) - set(stored)), first(set(stored) - set(expected))
  checks.require(not missing, f"{what}: it lacks {_some(missing)}, which the architecture needs")
  checks.require(not unknown, f"{what}: it has {_some(unknown)}, which the architecture does not")


def _some(keys: Sequence[str]) -> str:
  """'first' (and N more) of `keys`."""
  return f"{keys[0]!r}" + (f" (and {len(keys) - 1} more)" if len(keys) > 1 else "") if keys else ""


def _restore(path: Path) -> Any:
  """The arrays orbax wrote in `path`."""
  checks.require(path.is_dir(), f"flax checkpoint {str(path.parent)!r} has no {VARIABLES_DIR}/")
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      return checkpointer.restore(path.absolute())
  except Exception as e:  # pylint: disable=broad-except  # orbax raises many kinds
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise checks.InputError(
      f"cannot read the variables of flax checkpoint {str(path.parent)!r} (orbax: {reason[:200]})"
    ) from None


def load(path: str | PathLike[str]) -> tuple[nn.Module, Variables, dict[str, Any]]:
  """A flax checkpoint's model, variables and metadata; PyTorch is not imported.

  Args:
    path: the directory `save` wrote.

  Returns:
    `(model, variables, metadata)`: `model.apply(variables, x)` on NHWC
    images in [0, 1], and `read_metadata`'s result.

  Raises:
    InputError: a missing or corrupt directory or metadata, or variables that
      do not fit the architecture (naming the first that differs).
  """
  path = Path(path)
  meta = read_metadata(path)
  model = build(meta, f"{str(path / METADATA_FILE)!r}")
  arrays = _restore(path / VARIABLES_DIR)
  checks.require(isinstance(arrays, dict), f"flax checkpoint {str(path)!r} holds no variables")
  what = f"flax checkpoint {str(path)!r} does not fit its architecture {meta['arch']}"
  check_fits(_by_path(arrays), _expected_shapes(model, meta), what)
  variables = jax.tree.map(jnp.asarray, arrays)
  return model, variables, meta


__all__ = [
  "FORMAT",
  "FORMAT_VERSION",
  "METADATA_FILE",
  "VARIABLES_DIR",
  "build",
  "check_fits",
  "check_new_directory",
  "describe",
  "is_checkpoint",
  "load",
  "read_metadata",
  "save",
]
