"""Converted checkpoints in `jaxrobust-eval`: --torch-checkpoint, --export-torch,
--flax-checkpoint and --export-flax."""

from typing import Any, NamedTuple

import jax
import ml_collections
from flax import linen as nn

from jaxrobust import checks, cli, interop, zoo
from jaxrobust.configs import common
from jaxrobust.interop import flax_files
from jaxrobust.programs import eval_flags as opts
from jaxrobust.training import config as config_lib
from jaxrobust.types import Variables


class Loaded(NamedTuple):
  """A --torch-checkpoint's model state: its variables, never trained here."""

  variables: Variables
  step: int


def data_config(name: str | None, flag: str = "--torch-checkpoint") -> ml_collections.ConfigDict:
  """The config a --torch-checkpoint is evaluated with on data set `name`.

  Args:
    name: a setting of `jaxrobust.configs.common`, or a data-set name.
    flag: the checkpoint's flag, for the message.

  Returns:
    That setting's config, or CIFAR-10's with data `name`.
  """
  checks.require(
    name,
    f"{flag} needs --data: {', '.join(common.SETTINGS)}, or a jaxrobust data-set name",
  )
  if name in common.SETTINGS:
    return common.setting(name)
  config = common.setting("cifar10")
  config.data = dict(name=name, data_dir="")
  return config


def convert_torch_checkpoint(path: str, arch: str | None) -> tuple[str, nn.Module, Variables]:
  """The jaxrobust model of a PyTorch checkpoint.

  Args:
    path: the checkpoint (.pt, .pth or .safetensors).
    arch: its architecture (default: the one it records).

  Returns:
    (architecture, model, variables).
  """
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
  return arch, model, variables


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
  arch, model, variables = convert_torch_checkpoint(path, arch)
  resolved = fit_data(
    config, model, variables, ("PyTorch checkpoint", path), arch, data_name, split
  )
  about = dict(torch_checkpoint=str(path), arch=arch, data=data_name)
  return resolved, model, Loaded(variables, 0), about


def load_flax_checkpoint(
  path: str, data_name: str | None, split: str
) -> tuple[dict[str, Any], Any, Loaded, dict[str, Any]]:
  """A flax checkpoint (`interop.flax_files`) to evaluate, read without PyTorch.

  Args:
    path: the checkpoint's directory.
    data_name: the data set it is evaluated on (`data_config`).
    split: the split evaluated.

  Returns:
    (resolved config, model, state, what the report says of them).
  """
  config = data_config(data_name, "--flax-checkpoint")
  model, variables, meta = flax_files.load(path)
  arch = meta["arch"]
  resolved = fit_data(config, model, variables, ("flax checkpoint", path), arch, data_name, split)
  about = dict(flax_checkpoint=str(path), arch=arch, data=data_name)
  return resolved, model, Loaded(variables, 0), about


def load_converted() -> tuple[dict[str, Any], nn.Module, Loaded, dict[str, Any]]:
  """The model of --torch-checkpoint or --flax-checkpoint (not of a zoo entry), checked
  against eval.py's other flags.

  Returns:
    (resolved config, model, state, what the report says of them).
  """
  flag = "--torch-checkpoint" if opts.TORCH.value else "--flax-checkpoint"
  checks.require(
    not (opts.TORCH.value and opts.FLAX.value),
    "give either --torch-checkpoint or --flax-checkpoint, not both",
  )
  checks.require(not opts.WORKDIR.value, f"give either --workdir or {flag}, not both")
  for other, value in (
    ("--export-torch", opts.EXPORT),
    ("--transfer-from", opts.TRANSFER),
    ("--certify", opts.CERTIFY),
  ):
    checks.require(not value.value, f"{other} needs a --workdir, not a {flag}")
  if opts.FLAX.value:
    checks.require(
      opts.ARCH.value is None, "--arch goes with --torch-checkpoint (a flax checkpoint records it)"
    )
    return load_flax_checkpoint(opts.FLAX.value, opts.DATA.value, opts.SPLIT.value)
  return load_torch_checkpoint(
    str(opts.TORCH.value), opts.ARCH.value, opts.DATA.value, opts.SPLIT.value
  )


def fit_data(
  config: ml_collections.ConfigDict,
  model: nn.Module,
  variables: Variables,
  source: tuple[str, str],
  arch: str,
  data_name: str | None,
  split: str,
) -> dict[str, Any]:
  """The resolved config of a converted model on data set `data_name`, checked to fit.

  Args:
    config: the data set's config (`data_config`).
    model: the model.
    variables: its variables.
    source: (its kind, "PyTorch checkpoint" or "flax checkpoint", its path).
    arch: its architecture's name.
    data_name: the data set.
    split: the split evaluated.

  Returns:
    The config as a dict, with the model's name and settings.

  Raises:
    InputError: images of other channels or another number of classes.
  """
  kind, path = source
  what = f"{path!r}" if kind == "PyTorch checkpoint" else f"{kind} {path!r}"
  test_set = config_lib.load_split(config, split)
  channels = test_set.x.shape[-1]
  checks.require(
    len(model.mean) == channels,
    f"arch {arch!r} from {what} takes {len(model.mean)}-channel images; data "
    f"set {data_name!r} has {channels} channels",
  )
  checks.require(
    model.num_classes == test_set.num_classes,
    f"{what} has {model.num_classes} classes; data set {data_name!r} has {test_set.num_classes}",
  )
  resolved = config.to_dict()
  resolved["model"] = {"name": interop.model_name(model), **interop.model_settings(model)}
  n_params = sum(a.size for a in jax.tree.leaves(variables["params"]))
  print(
    f"{kind} {path}: arch {arch} (jaxrobust {resolved['model']['name']}, "
    f"{n_params:,} parameters), data {data_name} ({split} split, "
    f"{config.data['name']})"
  )
  return resolved


def export_torch(model: nn.Module, state: Any, path: str) -> None:
  """Writes the workdir's model as a PyTorch checkpoint recording its architecture."""
  with cli.writing(path):
    interop.save_checkpoint(path, model, jax.device_get(state.variables))
  print(
    f"wrote {path}: {interop.model_name(model)} {interop.model_settings(model)}, "
    f"a PyTorch state_dict (jaxrobust.interop.from_torch or eval.py "
    f"--torch-checkpoint read it back)"
  )


def export_flax(model: nn.Module, variables: Variables, path: str, **about: Any) -> None:
  """Writes a model as a flax checkpoint (`interop.flax_files.save`) and says so.

  Args:
    model: the model.
    variables: its variables.
    path: the directory to create.
    **about: `flax_files.save`'s `arch`, `zoo` and `source`.
  """
  with cli.writing(path):
    flax_files.save(path, model, jax.device_get(variables), **about)
  print(
    f"wrote {path}: {interop.model_name(model)} {interop.model_settings(model)}, a flax "
    f"checkpoint (eval.py --flax-checkpoint or jaxrobust.interop.flax_files.load read it "
    f"back, without PyTorch)"
  )


def export_converted(
  zoo_name: str | None, torch_path: str | None, arch: str | None, out: str
) -> None:
  """--export-flax OUT of --zoo ENTRY --torch-checkpoint F, or of --torch-checkpoint F [--arch A].

  Args:
    zoo_name: the zoo entry, or None.
    torch_path: the PyTorch checkpoint (required).
    arch: its architecture (without `zoo_name`; default: the one it records).
    out: the directory to create.
  """
  checks.require(
    torch_path, "--export-flax needs --torch-checkpoint (with --zoo or --arch) or --workdir"
  )
  assert torch_path is not None
  if zoo_name is None:
    arch, model, variables = convert_torch_checkpoint(torch_path, arch)
    export_flax(model, variables, out, arch=arch, source=torch_path)
    return
  checks.require(arch is None, "--arch goes without --zoo: the entry names the architecture")
  with cli.writing(out):
    zoo.export_entry(zoo_name, torch_path, out)
  entry = zoo.find(zoo_name)
  print(
    f"wrote {out}: zoo entry {zoo.key(entry)} ({entry.arch}, {entry.threat} eps {entry.eps}), "
    f"a flax checkpoint (eval.py --flax-checkpoint {out} evaluates it, without PyTorch)"
  )


def flax_zoo_entry(path: str | None) -> str | None:
  """The zoo entry a --flax-checkpoint records, or None (no checkpoint, or not a zoo model)."""
  if not path:
    return None
  zoo_about = flax_files.read_metadata(path).get("zoo")
  return zoo_about.get("entry") if isinstance(zoo_about, dict) else None
