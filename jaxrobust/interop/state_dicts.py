"""PyTorch state dicts (numpy arrays) of jaxrobust models, and models from them; no PyTorch needed.

BatchNorm: scale, bias = weight, bias; mean, var = running_mean,
running_var (eps 1e-5 on both sides, Flax's momentum 0.9 is PyTorch's 0.1);
`num_batches_tracked` is PyTorch's alone: read, ignored, written as 0. The
normalisation: buffers `mean` and `std` [C, 1, 1] (DeepMind's WideResNet,
and every twin) become the model's mean and std; a checkpoint without them
gets the `mean`/`std` settings, else the architecture's default (identity
for RobustBench's plain models, which take [0, 1]).
"""

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxrobust import checks, models
from jaxrobust.interop import architectures, layouts
from jaxrobust.types import Variables

StateDict = dict[str, np.ndarray]


def torch_state_dict(
  model: nn.Module, variables: Variables, *, input_hw: Sequence[int] | None = None
) -> StateDict:
  """The PyTorch `state_dict` of a jaxrobust model, as numpy arrays.

  Args:
    model: a jaxrobust model without spectral normalisation or noise.
    variables: its variables.
    input_hw: the image size of `small_cnn`/`seed_cnn` (default: the square
      one their weights imply).

  Returns:
    `{torch key: array}` in PyTorch's layout and key names, with the
    normalisation as buffers `mean` and `std` [C, 1, 1].

  Raises:
    InputError: a model without a PyTorch twin.
  """
  name = architectures.model_name(model)
  checks.require(
    not getattr(model, "spectral", None),
    f"{name} with spectral normalisation has no PyTorch twin; its kernels are "
    "rescaled on the fly (export a model without model.spectral)",
  )
  variables = jax.device_get(variables)
  params = variables["params"]
  hw = architectures.input_hw(model, params, input_hw)
  state: StateDict = {}
  for key, path, kind in layouts.layout(model, params, hw):
    if kind == "count" or path is None:
      state[key] = np.zeros((), np.int64)
    else:
      array = np.asarray(layouts.get_path(variables, path), np.float32)
      state[key] = layouts.to_torch_layout(kind, array)
  state["mean"] = np.asarray(model.mean, np.float32).reshape(-1, 1, 1)
  state["std"] = np.asarray(model.std, np.float32).reshape(-1, 1, 1)
  return state


def _numpy(key: str, value: Any) -> np.ndarray:
  if isinstance(value, np.ndarray):
    return value
  if hasattr(value, "detach"):  # a torch tensor (bfloat16 has no numpy dtype)
    value = value.detach().cpu()
    return (value.float() if value.is_floating_point() else value).numpy()
  raise checks.InputError(
    f"not a state_dict: key {key!r} holds a {type(value).__name__}, not a tensor"
  )


def state_dict_of(checkpoint: Any) -> StateDict:
  """The flat state dict in a checkpoint, as RobustBench's are stored.

  Args:
    checkpoint: a state dict of tensors or arrays, possibly nested under
      "state_dict" or "model" entries, its keys possibly prefixed "module."
      (saved from `nn.DataParallel`), or RobustBench's `normalize_model`
      wrapping ("normalize.mean", "normalize.std", "model." + the network's);
      buffers "mu" and "sigma" (RobustBench's standardising subclasses).

  Returns:
    `{key: numpy array}`, unwrapped, without the "module." or "model."
    prefix or the safetensors "__metadata__"; a wrapper's normalisation as
    "mean" and "std".

  Raises:
    InputError: no tensors, or a value that is not one.
  """
  state = checkpoint
  while isinstance(state, dict):
    inner = next(
      (state[k] for k in ("state_dict", "model") if isinstance(state.get(k), dict)), None
    )
    if inner is None:
      break
    state = inner
  checks.require(
    isinstance(state, dict) and state,
    f"not a state_dict: a {type(checkpoint).__name__} without tensors",
  )
  state = {k: v for k, v in state.items() if k != "__metadata__"}
  checks.require(state, "not a state_dict: a checkpoint without tensors")
  if all(k.startswith("module.") for k in state):
    state = {k.removeprefix("module."): v for k, v in state.items()}
  if "normalize.mean" in state and all(k.startswith(("model.", "normalize.")) for k in state):
    renamed = {"normalize.mean": "mean", "normalize.std": "std"}
    state = {renamed.get(k, k.removeprefix("model.")): v for k, v in state.items()}
  if "mu" in state and "sigma" in state and "mean" not in state:  # RobustBench's own buffers
    state = {{"mu": "mean", "sigma": "std"}.get(k, k): v for k, v in state.items()}
  return {k: _numpy(k, v) for k, v in state.items()}


def ensemble_state_dict(branches: Sequence[Any]) -> StateDict:
  """The state dict of `preact_resnet50_ensemble` made of its branches' own.

  RobustBench stores its ensemble entry (Chen2020Adversarial) as one file a
  branch (`<entry>_m0.pt`, `_m1.pt`, `_m2.pt`), each the state dict of one
  ResNet (`conv1`, ..., `linear`); the ensemble holds branch b's under
  `branch<b + 1>.` and again under `models.<b>.`.

  Args:
    branches: the branches' state dicts (or checkpoints holding them), in order.

  Returns:
    `{key: numpy array}` with every branch's keys under both prefixes.

  Raises:
    InputError: a branch that is no state dict.
  """
  state: StateDict = {}
  for b, branch in enumerate(branches):
    for k, v in state_dict_of(branch).items():
      state[f"branch{b + 1}.{k}"] = state[f"models.{b}.{k}"] = v
  return state


def _some(keys: Iterable[str]) -> str:
  """'first' (and N more) of `keys`."""
  ordered = sorted(keys)
  return f"{ordered[0]!r}" + (f" (and {len(ordered) - 1} more)" if len(ordered) > 1 else "")


def _check_ends(
  state: StateDict, name: str, arch: str, settings: Mapping[str, Any]
) -> tuple[int, int]:
  """(input channels, classes) of the first conv and the classifier of `arch`'s layout."""
  first, last = architectures.model_ends(name, settings)
  for key in (f"{first}.weight", f"{last}.weight"):
    checks.require(
      key in state,
      f"checkpoint does not fit arch {arch!r}: it has no "
      f"{key!r} (its keys begin {', '.join(list(state)[:3])})",
    )
  conv, dense = state[f"{first}.weight"], state[f"{last}.weight"]
  checks.require(
    conv.ndim == 4 and dense.ndim == 2,
    f"checkpoint does not fit arch {arch!r}: {first}.weight and {last}.weight "
    f"have shapes {conv.shape} and {dense.shape}, not a conv's and a dense layer's",
  )
  return int(conv.shape[1]), int(dense.shape[0])


def _check_fits(
  state: StateDict, entries: list[layouts.Entry], shapes: Mapping[str, Any], name: str, arch: str
) -> None:
  """InputError naming the first key of `state` whose shape, presence or absence is wrong."""
  needed = {k for k, _, kind in entries if kind != "count"}
  optional = {k for k, _, kind in entries if kind == "count"} | {"mean", "std"}
  if name == "wide_resnet":  # TRADES-derived WideResNets keep an unused copy of block1
    optional |= {k for k in state if k.startswith("sub_block1.")}
  for key, path, kind in entries:  # shapes first: they say the most (e.g. another width)
    if key in state and path is not None and kind != "count":
      want = layouts.torch_shape(kind, layouts.get_path(shapes, path))
      if tuple(state[key].shape) != want:
        raise checks.InputError(
          f"checkpoint does not fit arch {arch!r}: {key!r} has shape "
          f"{tuple(state[key].shape)} in the checkpoint, the architecture needs {want}"
        )
  missing, unknown = needed - set(state), set(state) - needed - optional
  if missing:
    raise checks.InputError(
      f"checkpoint does not fit arch {arch!r}: it lacks "
      f"{_some(missing)}, which the architecture needs"
    )
  if unknown:
    raise checks.InputError(
      f"checkpoint does not fit arch {arch!r}: it has "
      f"{_some(unknown)}, which the architecture does not"
    )


def from_torch(
  state_dict: Any, arch: str, *, input_hw: Sequence[int] | None = None, **settings: Any
) -> tuple[nn.Module, Variables]:
  """A jaxrobust model and variables computing what the PyTorch model does.

  Args:
    state_dict: a PyTorch `state_dict` (tensors or numpy arrays), or a
      checkpoint holding one (see `state_dict_of`); for
      "preact-resnet-50-x3", also a list of its branches' (see
      `ensemble_state_dict`).
    arch: the architecture (see `architecture`): e.g. "wrn-28-10" for
      RobustBench's WideResNet-28-10, "dm-wrn-70-16" for DeepMind's.
    input_hw: the image size of `small_cnn`/`seed_cnn` (default: square).
    **settings: the model's settings (`models.create`), e.g. mean and std
      for a checkpoint without normalisation buffers; a checkpoint holding
      them ("mean"/"std", "mu"/"sigma") must hold these values.

  Returns:
    `(model, variables)`, `model.apply(variables, x)` on NHWC images in [0, 1].

  Raises:
    InputError: an unknown architecture, or a state dict that does not fit
      it (a missing or unknown key, or a shape), named with both shapes; or
      normalisation buffers that differ from the mean or std given, naming
      the buffer and both values.
  """
  if isinstance(state_dict, list | tuple):
    state = ensemble_state_dict(state_dict)
  else:
    state = state_dict_of(state_dict)
  name, settings = architectures.architecture(arch, **settings)
  channels, num_classes = _check_ends(state, name, arch, settings)
  mean, std = _normalisation(state, name, channels, settings)
  model = models.create(name, num_classes=num_classes, mean=mean, std=std, **settings)
  hw: tuple[int, ...] = (32, 32)
  if name in architectures.FLATTENS:
    hw = (
      architectures.square_hw(state, name, arch, settings) if input_hw is None else tuple(input_hw)
    )
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *hw, channels)))
  shapes = jax.tree.map(lambda s: s.shape, shapes)
  entries = layouts.layout(model, shapes["params"], hw)
  _check_fits(state, entries, shapes, name, arch)
  variables: dict[str, Any] = {}
  for key, path, kind in entries:
    if kind != "count" and path is not None:
      array = layouts.from_torch_layout(kind, state[key])
      layouts.set_path(variables, path, jnp.asarray(array, jnp.float32))
  return model, variables


_ALIAS = {"mean": "mu", "std": "sigma"}


def _normalisation(
  state: StateDict, name: str, channels: int, settings: dict[str, Any]
) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """(mean, std): the checkpoint's buffers, else `settings`', else the default.

  Pops "mean" and "std" from `settings`.
  """
  default = (
    (models.CIFAR10_MEAN, models.CIFAR10_STD)
    if name in architectures.DM_MODELS and channels == 3
    else ((0.0,) * channels, (1.0,) * channels)
  )
  out = []
  for i, which in enumerate(("mean", "std")):
    given = settings.pop(which, None)
    if which in state:
      # float32 buffers: the shortest decimals that round-trip in float32 (0.49, not
      # 0.49000000953674316), so a model exported and read back compares equal.
      stored = tuple(float(str(v)) for v in np.asarray(state[which], np.float32).reshape(-1))
      checks.require(
        len(stored) == channels,
        f"the checkpoint's {which} has {len(stored)} values for {channels} input channels",
      )
      checks.require(
        given is None or np.allclose(given, stored, rtol=1e-6, atol=0),
        f"the checkpoint's buffer {which!r} (RobustBench's {_ALIAS[which]!r}) holds "
        f"{stored}, not the {which} {tuple(given or ())} given",
      )
      out.append(stored)
    else:
      out.append(tuple(default[i] if given is None else given))
  return out[0], out[1]
