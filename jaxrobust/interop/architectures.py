"""Architecture names: RobustBench's and jaxrobust's, and what a model's weights imply."""

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import numpy as np

from jaxrobust import checks, models

# RobustBench's names for the zoo's architectures: (jaxrobust model, settings).
ZOO: dict[str, tuple[str, dict[str, Any]]] = {
  "preact-resnet-18": ("preact_resnet18", {"padding": "torch"}),
  "preact-resnet-18-plain": (
    "preact_resnet18",
    {"padding": "torch", "final_bn": False, "shortcut_from": "input"},
  ),
  "dm-preact-resnet-18": ("dm_preact_resnet18", {}),
  "resnet-18": ("resnet18", {"padding": "torch"}),
  "resnet-50": ("resnet50", {"stem": "imagenet"}),
  "resnet-50-cifar": ("resnet50", {"stem": "cifar"}),
  "wide-resnet-50-2": ("resnet50", {"stem": "imagenet", "group_width": 128}),
  "resnet-18-imagenet": ("resnet18", {"stem": "imagenet", "padding": "torch"}),
  "ra-wrn-70-16": ("ra_wide_resnet", {}),
  "ra-wrn-70-16-meansparse": ("ra_wide_resnet", {"meansparse": True}),
  "preact-resnet-50-x3": ("preact_resnet50_ensemble", {}),
  "wrn-a4": ("robust_resnet", {}),
}
_WRN = re.compile(r"(?P<dm>dm-)?wrn-(?P<d>\d+)-(?P<w>\d+)(?P<variant>-[a-z-]+)?")
# The variants "wrn-D-W-<variant>" of RobustBench's WideResNet, and their settings.
_WRN_VARIANTS: dict[str, dict[str, Any]] = {
  "": {},
  "-cosine": {"head": "cosine"},
  "-per-image": {"per_image": True},
  "-pssilu": {"activation": "pssilu"},
}
_ROBUST_WRN = re.compile(r"robust-wrn-(\d+)-(\d+)-(\d+)-(\d+)-(\d+)-(\d+)-(\d+)")
ARCHS = (
  *models.MODELS,
  *ZOO,
  "wrn-<depth>-<width> (wrn-28-10, wrn-34-10, wrn-34-20, wrn-70-16)",
  "wrn-<depth>-<width>-cosine (wrn-34-20-cosine: RobustBench's BoostingWideResNet)",
  "wrn-<depth>-<width>-per-image (wrn-28-4-per-image: Ding et al.'s MMA network)",
  "wrn-<depth>-<width>-pssilu (wrn-28-10-pssilu: Dai et al.'s PSSiLU WideResNet)",
  "dm-wrn-<depth>-<width> (dm-wrn-28-10, dm-wrn-70-16, dm-wrn-106-16)",
  "dm-wrn-<depth>-<width>-meansparse (dm-wrn-94-16-meansparse: Amini et al.'s MeanSparse)",
  "robust-wrn-<4 channels>-<3 depths> (robust-wrn-16-320-640-512-5-5-5)",
)

# (first conv, classifier) of each model's PyTorch layout: they fix the input
# channels and the classes.
ENDS = {
  "small_cnn": ("convs.0", "fc2"),
  "seed_cnn": ("conv1", "fc3"),
  "preact_resnet18": ("conv1", "linear"),
  "resnet18": ("conv1", "linear"),
  "wide_resnet": ("conv1", "fc"),
  "dm_wide_resnet": ("init_conv", "logits"),
  "dm_preact_resnet18": ("conv_2d", "logits"),
  "resnet50": ("conv1", "linear"),
  "robust_wide_resnet": ("stem_conv", "fc"),
  "ra_wide_resnet": ("init_conv", "logits"),
  "preact_resnet50_ensemble": ("branch1.conv1", "branch1.linear"),
  "robust_resnet": ("stem_conv", "fc"),
}
# DeepMind's architectures: without normalisation buffers, CIFAR-10's statistics.
DM_MODELS = ("dm_wide_resnet", "dm_preact_resnet18", "ra_wide_resnet")


def model_ends(name: str, settings: Mapping[str, Any]) -> tuple[str, str]:
  """The PyTorch names of model `name`'s first convolution and classifier.

  Args:
    name: a name of `models.MODELS`.
    settings: its settings (the `stem` of `resnet50` and `resnet18` picks
      torchvision's "fc").

  Returns:
    `(first conv, classifier)`, e.g. `("conv1", "linear")`.
  """
  if name in ("resnet50", "resnet18") and settings.get("stem", "cifar") == "imagenet":
    return ("conv1", "fc")
  return ENDS[name]


# The models with a dense layer after a flatten: their input size matters.
FLATTENS = ("small_cnn", "seed_cnn")


def architecture(arch: str, **settings: Any) -> tuple[str, dict[str, Any]]:
  """The jaxrobust model and settings of an architecture's name.

  Args:
    arch: a name of `models.MODELS`, of `ZOO`, "wrn-D-W" (RobustBench's
      WideResNet-D-W, PyTorch's padding), "wrn-D-W-cosine" (with the
      cosine head, `BoostingWideResNet`), "wrn-D-W-per-image" (each image
      standardised first), "wrn-D-W-pssilu" (one shared PSSiLU),
      "dm-wrn-D-W" (DeepMind's), "dm-wrn-D-W-meansparse" (with MeanSparse) or
      "robust-wrn-C0-C1-C2-C3-D1-D2-D3" (RobustBench's `RobustWideResNet`
      with `channel_configs` C and `depth_configs` D).
    **settings: settings that override the architecture's.

  Returns:
    `(name, settings)` for `models.create(name, **settings)`.

  Raises:
    InputError: an unknown architecture.
  """
  checks.require(isinstance(arch, str), f"arch must be a name, got {arch!r}")
  wrn = _WRN.fullmatch(arch)
  if wrn and wrn.group("variant") in (None, "-meansparse") and wrn.group("dm"):
    name, own = _dm_wide_resnet(int(wrn.group("d")), int(wrn.group("w")), wrn.group("variant"))
  elif wrn and not wrn.group("dm") and (wrn.group("variant") or "") in _WRN_VARIANTS:
    name = "wide_resnet"
    own = dict(depth=int(wrn.group("d")), width=int(wrn.group("w")), padding="torch")
    own.update(_WRN_VARIANTS[wrn.group("variant") or ""])
  elif _ROBUST_WRN.fullmatch(arch):
    sizes = [int(g) for g in _ROBUST_WRN.fullmatch(arch).groups()]  # type: ignore[union-attr]
    name, own = "robust_wide_resnet", dict(channels=tuple(sizes[:4]), depths=tuple(sizes[4:]))
  elif arch in ZOO:
    name, own = ZOO[arch][0], dict(ZOO[arch][1])
  else:
    checks.require(
      arch in models.MODELS and not wrn,
      f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}",
    )
    name, own = arch, {}
  return name, {**own, **settings}


def _dm_wide_resnet(depth: int, width: int, variant: str | None) -> tuple[str, dict[str, Any]]:
  """DeepMind's WideResNet-`depth`-`width`, with MeanSparse when `variant` says so."""
  if variant is None:
    return "dm_wide_resnet", dict(depth=depth, width=width)
  checks.require(
    (depth - 4) % 6 == 0 and depth >= 10,
    f"WideResNet depth must be 6n + 4 with n >= 1, got {depth}",
  )
  n = (depth - 4) // 6
  return "ra_wide_resnet", dict(
    stem_width=16,
    depths=(n, n, n),
    widths=(16 * width, 32 * width, 64 * width),
    se_ratio=0.0,
    meansparse=True,
  )


def model_name(model: object) -> str:
  """The `models.MODELS` name of a jaxrobust model.

  Args:
    model: a model `models.create` builds, without noise.

  Returns:
    Its name, e.g. "wide_resnet".

  Raises:
    InputError: a randomized model or another module (no PyTorch converter).
  """
  for name, cls in models.MODELS.items():
    if type(model) is cls:  # pylint: disable=unidiomatic-typecheck
      return name
  checks.require(
    not models.is_randomized(model),
    "no PyTorch converter for a randomized model (Randomized): convert its "
    "base classifier, model.classifier",
  )
  raise checks.InputError(
    f"no PyTorch converter for {type(model).__name__}; supported: "
    f"{', '.join(c.__name__ for c in models.MODELS.values())}"
  )


# Settings a checkpoint records only where they differ from these defaults, so
# that the models without them record what they always have.
_UNRECORDED: dict[str, Any] = {
  "head": "dense",
  "final_bn": True,
  "shortcut_from": "activation",
  "per_image": False,
}
# The same, for one model's settings only.
_UNRECORDED_OF: dict[str, dict[str, Any]] = {
  "wide_resnet": {"activation": "relu"},
  "resnet18": {"stem": "cifar"},
  "robust_wide_resnet": {"activation": "relu"},
}
_NONE = object()


def model_settings(model: nn.Module) -> dict[str, Any]:
  """The hyper-parameters of `model` that `models.create` takes, as a checkpoint records them.

  Args:
    model: a jaxrobust model.

  Returns:
    Its settings without classes, normalisation, axis name or spectral
    normalisation, e.g. `{"depth": 28, "width": 10, "padding": "torch"}`;
    `head`, `final_bn`, `shortcut_from`, `per_image` (and `activation` of
    `wide_resnet`, `stem` of `resnet18`) only where not at their defaults.
  """
  skip = {"num_classes", "mean", "std", "axis_name", "parent", "name", "spectral"}
  settings = {k: getattr(model, k) for k in type(model).__dataclass_fields__ if k not in skip}
  name = next((n for n, cls in models.MODELS.items() if type(model) is cls), "")
  defaults = {**_UNRECORDED, **_UNRECORDED_OF.get(name, {})}
  return {k: v for k, v in settings.items() if defaults.get(k, _NONE) != v}


def _image_hw(name: str, side: int) -> tuple[int, int]:
  """The square image size whose final map in CNN `name` has side `side`."""
  return (side * 4, side * 4) if name == "small_cnn" else ((side * 2 + 4) * 2 + 4,) * 2


def input_hw(
  model: nn.Module, params: Mapping[str, Any], hw: Sequence[int] | None = None
) -> tuple[int, int] | None:
  """The image size the flatten of `small_cnn`/`seed_cnn` is built for.

  Args:
    model: a jaxrobust model.
    params: its parameters (arrays or shapes).
    hw: the size if known.

  Returns:
    `hw`, else the square size the first dense layer's rows imply; None for
    a model without a flatten.

  Raises:
    InputError: the rows are those of no square image.
  """
  name = model_name(model)
  if name not in FLATTENS:
    return None
  if hw is not None:
    return (int(hw[0]), int(hw[1]))
  rows = np.shape(params["Dense_0"]["kernel"])[0]
  channels = 2 * model.width if name == "small_cnn" else 16
  side = math.isqrt(rows // channels)
  checks.require(
    side * side * channels == rows,
    f"{name}'s first dense layer has {rows} inputs, not those of a square "
    f"image; pass input_hw=(height, width)",
  )
  return _image_hw(name, side)


def square_hw(
  state: Mapping[str, np.ndarray], name: str, arch: str, settings: Mapping[str, Any]
) -> tuple[int, int]:
  """The square image size a PyTorch CNN's first dense layer implies.

  Args:
    state: the PyTorch state dict.
    name: "small_cnn" or "seed_cnn".
    arch: the architecture as the caller named it (for the error).
    settings: the model's settings (`width`).

  Returns:
    `(side, side)`.

  Raises:
    InputError: `fc1.weight` is missing or has the inputs of no square image.
  """
  rows = state["fc1.weight"].shape[1] if "fc1.weight" in state else 0
  channels = 2 * settings.get("width", 32) if name == "small_cnn" else 16
  side = math.isqrt(rows // channels) if rows else 0
  checks.require(
    side > 0 and side * side * channels == rows,
    f"checkpoint does not fit arch {arch!r}: fc1.weight has "
    f"{rows} inputs, not those of a square image; pass input_hw",
  )
  return _image_hw(name, side)
