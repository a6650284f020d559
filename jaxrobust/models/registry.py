"""The models by name, and `create`, which builds one from a config's settings."""

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn

from jaxrobust import checks, spectral as spectral_lib
from jaxrobust.models.blocks import ACTIVATIONS, PADDINGS, PARAMETRIC_ACTIVATIONS, SHORTCUTS
from jaxrobust.models.cnn import SeedCNN, SmallCNN, SpectralSettings
from jaxrobust.models.randomized import Randomized
from jaxrobust.models.resnet import DMPreActResNet18, PreActResNet18, ResNet18
from jaxrobust.models.resnet50 import STEMS, ResNet50
from jaxrobust.models.wide_resnet import HEADS, DMWideResNet, RobustWideResNet, WideResNet
from jaxrobust.models.zoo_nets import PreActResNet50Ensemble, RaWideResNet, RobustResNet

MODELS: dict[str, type[nn.Module]] = {
  "small_cnn": SmallCNN,
  "seed_cnn": SeedCNN,
  "preact_resnet18": PreActResNet18,
  "wide_resnet": WideResNet,
  "resnet18": ResNet18,
  "dm_wide_resnet": DMWideResNet,
  "dm_preact_resnet18": DMPreActResNet18,
  "resnet50": ResNet50,
  "robust_wide_resnet": RobustWideResNet,
  "ra_wide_resnet": RaWideResNet,
  "preact_resnet50_ensemble": PreActResNet50Ensemble,
  "robust_resnet": RobustResNet,
}


def spectral_settings(settings: Mapping[str, Any] | None) -> SpectralSettings | None:
  """Validated spectral-normalisation settings.

  Args:
    settings: a dict of `SpectralSettings` fields, or None.

  Returns:
    The `SpectralSettings`, or None when `settings` is empty (no normalisation).

  Raises:
    InputError: an unknown key, mode or rescale, a target <= 0 or n_steps < 1.
  """
  if not settings:
    return None
  settings = dict(settings)
  checks.known_keys("model.spectral", settings, SpectralSettings._fields)
  s = SpectralSettings(**settings)
  checks.one_of("model.spectral.mode", s.mode, spectral_lib.MODES)
  checks.one_of("model.spectral.rescale", s.rescale, spectral_lib.RESCALES)
  return s._replace(
    target=float(checks.positive("model.spectral.target", s.target)),
    n_steps=checks.integer_at_least("model.spectral.n_steps", s.n_steps, 1),
  )


def noise_settings(settings: Mapping[str, Any] | None) -> dict[str, Any] | None:
  """Validated settings of `Randomized`.

  Args:
    settings: a dict with `sigma` > 0 and optionally `samples` >= 1 (8) and
      `seed` >= 0 (0), or None.

  Returns:
    `{"sigma", "samples", "seed"}`, or None when `settings` is empty (no noise).

  Raises:
    InputError: an unknown key, no sigma, or a value out of range.
  """
  if not settings:
    return None
  settings = dict(settings)
  checks.known_keys("model.noise", settings, ("sigma", "samples", "seed"))
  checks.require(
    "sigma" in settings, "model.noise needs sigma (the noise's standard deviation, > 0)"
  )
  return {
    "sigma": float(checks.positive("model.noise.sigma", settings["sigma"])),
    "samples": checks.integer_at_least("model.noise.samples", settings.get("samples", 8), 1),
    "seed": checks.integer_at_least("model.noise.seed", settings.get("seed", 0), 0),
  }


def _check_hyperparameters(name: str, cls: type[nn.Module], kwargs: dict[str, Any]) -> None:
  """InputError for a hyper-parameter model `name` lacks, or a value it does not take."""
  fields = set(cls.__dataclass_fields__)
  checks.known_keys(
    f"model {name!r}",
    kwargs,
    fields - {"num_classes", "mean", "std", "axis_name", "parent", "name"},
  )
  if "padding" in kwargs:
    checks.one_of(f"model {name!r} padding", kwargs["padding"], PADDINGS)
  if "shortcut_from" in kwargs:
    checks.one_of(f"model {name!r} shortcut_from", kwargs["shortcut_from"], SHORTCUTS)
  if "head" in kwargs:
    checks.one_of(f"model {name!r} head", kwargs["head"], HEADS)
  if "stem" in kwargs:
    checks.one_of(f"model {name!r} stem", kwargs["stem"], STEMS)
  if "activation" in kwargs:
    parametric = PARAMETRIC_ACTIVATIONS if name == "wide_resnet" else ()
    checks.one_of(f"model {name!r} activation", kwargs["activation"], (*ACTIVATIONS, *parametric))


def create(
  name: str,
  *,
  num_classes: int,
  mean: Sequence[float],
  std: Sequence[float],
  axis_name: str | None = None,
  spectral: Mapping[str, Any] | None = None,
  noise: Mapping[str, Any] | None = None,
  **kwargs: Any,
) -> nn.Module:
  """Builds model `name` with its hyper-parameters.

  Args:
    name: one of `MODELS`.
    num_classes: the number of classes K.
    mean: the per-channel mean the model normalises with.
    std: the per-channel standard deviation.
    axis_name: the named axis BatchNorm averages over in training.
    spectral: `SpectralSettings` fields (SmallCNN, SeedCNN): every Conv and
      Dense layer spectrally normalised. Empty or None: off.
    noise: `noise_settings` (sigma > 0, samples >= 1, seed): the model
      wrapped in `Randomized`. Empty or None: off.
    **kwargs: the model's hyper-parameters (e.g. `width`, `depth`, `padding`).

  Returns:
    The Flax module, `apply(variables, x)` on NHWC images in [0, 1].

  Raises:
    InputError: an unknown model, hyper-parameter or value.
  """
  checks.one_of("model", name, tuple(MODELS))
  cls = MODELS[name]
  spectral_or_none = spectral_settings(spectral)
  if spectral_or_none is not None:
    checks.require(
      "spectral" in cls.__dataclass_fields__,
      f"model {name!r} has no spectral normalisation; use small_cnn or seed_cnn",
    )
    kwargs["spectral"] = spectral_or_none
  _check_hyperparameters(name, cls, kwargs)
  model = cls(
    num_classes=num_classes, mean=tuple(mean), std=tuple(std), axis_name=axis_name, **kwargs
  )
  noise_or_none = noise_settings(noise)
  return model if noise_or_none is None else Randomized(model, **noise_or_none)
