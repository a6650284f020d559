"""PyTorch checkpoints in `jaxrobust-eval`: --torch-checkpoint and --export-torch."""

from typing import Any, NamedTuple

import jax
import ml_collections
from flax import linen as nn

from jaxrobust import checks, cli, interop
from jaxrobust.configs import common
from jaxrobust.training import config as config_lib
from jaxrobust.types import Variables


class Loaded(NamedTuple):
  """A --torch-checkpoint's model state: its variables, never trained here."""

  variables: Variables
  step: int


def data_config(name: str | None) -> ml_collections.ConfigDict:
  """The config a --torch-checkpoint is evaluated with on data set `name`.

  Args:
    name: a setting of `jaxrobust.configs.common`, or a data-set name.

  Returns:
    That setting's config, or CIFAR-10's with data `name`.
  """
  checks.require(
    name,
    f"--torch-checkpoint needs --data: {', '.join(common.SETTINGS)}, or a jaxrobust data-set name",
  )
  if name in common.SETTINGS:
    return common.setting(name)
  config = common.setting("cifar10")
  config.data = dict(name=name, data_dir="")
  return config


def load_torch_checkpoint(
  path: str, arch: str | None, data_name: str | None, split: str
) -> tuple[dict[str, Any], Any, Loaded, dict[str, Any]]:
  """A PyTorch checkpoint to evaluate.

  Args:
    path: the checkpoint (.pt, .pth or .safetensors).
    arch: its architecture (default: the one it records).
    data_name: the data set it is evaluated on (`data_config`).
    split: the split evaluated.

  Returns:
    (resolved config, model, state, what the report says of them).
  """
  config = data_config(data_name)
  if arch:
    interop.architecture(arch)  # an unknown name is refused before the file is read
  checkpoint = interop.load_checkpoint(path)
  recorded = interop.checkpoint_architecture(checkpoint)
  checks.require(
    arch or recorded,
    f"{path!r} records no architecture; pass --arch (e.g. wrn-28-10, dm-wrn-70-16)",
  )
  if recorded and not arch:
    arch = recorded[0]
  settings = recorded[1] if recorded and recorded[0] == arch else {}
  assert arch is not None
  model, variables = interop.from_torch(checkpoint, arch, **settings)
  test_set = config_lib.load_split(config, split)
  channels = test_set.x.shape[-1]
  checks.require(
    len(model.mean) == channels,
    f"arch {arch!r} from {path!r} takes {len(model.mean)}-channel images; data "
    f"set {data_name!r} has {channels} channels",
  )
  checks.require(
    model.num_classes == test_set.num_classes,
    f"{path!r} has {model.num_classes} classes; data set {data_name!r} has {test_set.num_classes}",
  )
  resolved = config.to_dict()
  resolved["model"] = {"name": interop.model_name(model), **interop.model_settings(model)}
  n_params = sum(a.size for a in jax.tree.leaves(variables["params"]))
  print(
    f"PyTorch checkpoint {path}: arch {arch} (jaxrobust {resolved['model']['name']}, "
    f"{n_params:,} parameters), data {data_name} ({split} split, "
    f"{config.data['name']})"
  )
  about = dict(torch_checkpoint=str(path), arch=arch, data=data_name)
  return resolved, model, Loaded(variables, 0), about


def export_torch(model: nn.Module, state: Any, path: str) -> None:
  """Writes the workdir's model as a PyTorch checkpoint recording its architecture."""
  with cli.writing(path):
    interop.save_checkpoint(path, model, jax.device_get(state.variables))
  print(
    f"wrote {path}: {interop.model_name(model)} {interop.model_settings(model)}, "
    f"a PyTorch state_dict (jaxrobust.interop.from_torch or eval.py "
    f"--torch-checkpoint read it back)"
  )
