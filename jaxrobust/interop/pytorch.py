"""PyTorch modules and tensors: a jaxrobust model's twin, and images between layouts.

PyTorch is optional (`pip install "jaxrobust[torch]"`): it is imported only
by the functions that need it, and its absence raises `InputError`.
"""

from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import numpy as np

from jaxrobust import checks
from jaxrobust.interop import architectures, state_dicts
from jaxrobust.types import Variables

if TYPE_CHECKING:  # PyTorch is optional: imported for the annotations only
  import torch

INSTALL_TORCH = 'pip install "jaxrobust[torch]"'


def import_torch() -> ModuleType:
  """The `torch` module.

  Returns:
    `torch`.

  Raises:
    InputError: PyTorch is not installed, saying how to install it.
  """
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise checks.InputError(f"PyTorch is not installed; this needs it: {INSTALL_TORCH}") from None
  return torch


def twin(
  name: str,
  *,
  num_classes: int,
  mean: Sequence[float],
  std: Sequence[float],
  input_hw: Sequence[int] | None = None,
  **settings: Any,
) -> "torch.nn.Module":
  """A PyTorch twin of a jaxrobust model, randomly initialised, in evaluation mode.

  Args:
    name: a name of `models.MODELS`.
    num_classes: the number of classes K.
    mean: the per-channel mean (buffer `mean` [C, 1, 1]).
    std: the per-channel standard deviation (buffer `std`).
    input_hw: the image size of `small_cnn`/`seed_cnn` (default 32x32).
    **settings: the model's hyper-parameters (`architectures.model_settings`).

  Returns:
    The `torch.nn.Module` (`TWINS[name]` of `torch_twins`, `torch_twins_zoo`
    or `torch_twins_entries`), taking NCHW images in [0, 1].
  """
  import_torch()
  from jaxrobust.interop import (  # pylint: disable=g-import-not-at-top
    torch_twins,
    torch_twins_entries,
    torch_twins_zoo,
  )

  if name in architectures.FLATTENS:
    settings["input_hw"] = tuple(input_hw or (32, 32))
  twins = {**torch_twins.TWINS, **torch_twins_zoo.TWINS, **torch_twins_entries.TWINS}
  return twins[name](num_classes, mean, std, **settings).eval()


def to_torch(
  model: nn.Module, variables: Variables, input_hw: Sequence[int] | None = None
) -> "torch.nn.Module":
  """The PyTorch twin of a jaxrobust model with its weights, in evaluation mode.

  Args:
    model: a jaxrobust model without spectral normalisation or noise.
    variables: its variables.
    input_hw: the image size of `small_cnn`/`seed_cnn` (default: the square
      one their weights imply).

  Returns:
    A `torch.nn.Module` mapping NCHW float32 images in [0, 1] to the logits
    of `model.apply(variables, x, train=False)` (x NHWC).

  Raises:
    InputError: a model without a twin, or PyTorch not installed.
  """
  torch = import_torch()
  name = architectures.model_name(model)
  state = state_dicts.torch_state_dict(model, variables, input_hw=input_hw)
  hw = architectures.input_hw(model, variables["params"], input_hw)
  net = twin(
    name,
    num_classes=model.num_classes,
    mean=tuple(model.mean),
    std=tuple(model.std),
    input_hw=hw,
    **architectures.model_settings(model),
  )
  net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
  return net.eval()


def nhwc_to_nchw(x: Any) -> "torch.Tensor":
  """NHWC images (numpy or JAX) as a contiguous float32 torch NCHW tensor."""
  torch = import_torch()
  return torch.from_numpy(
    np.ascontiguousarray(np.transpose(np.asarray(x, np.float32), (0, 3, 1, 2)))
  )


def nchw_to_nhwc(x: "torch.Tensor") -> np.ndarray:
  """A torch NCHW tensor as a numpy NHWC array."""
  return np.ascontiguousarray(x.detach().cpu().numpy().transpose(0, 2, 3, 1))
