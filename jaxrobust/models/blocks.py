"""The models' building blocks: input normalisation, padded convolutions, residual blocks."""

import functools
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxrobust import checks
from jaxrobust.models import layers
from jaxrobust.types import Images

# nn.Conv with the kernel gradient XLA:CPU computes fast (`layers`).
Conv = functools.partial(nn.Conv, conv_general_dilated=layers.conv_general_dilated)

# How the residual networks pad their convolutions (`padding_pair`).
PADDINGS = ("same", "torch", "dm")
# What a pre-activation block's shortcut convolves (`PreActBlock`).
SHORTCUTS = ("activation", "input")
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {"relu": nn.relu, "swish": nn.swish}

# `nn.Conv`'s padding argument: "SAME", or (before, after) per spatial axis.
ConvPadding: TypeAlias = str | list[tuple[int, int]]


def padding_pair(mode: str, size: int, kernel: int, stride: int) -> tuple[int, int]:
  """Zeros padded before and after one spatial axis of a convolution.

  For an axis of length n, k taps and stride s, the total padding p is split
  as (floor(p / 2), p - floor(p / 2)):

  * "same": XLA's SAME, p = max((ceil(n / s) - 1) s + k - n, 0); a stride-2
    3x3 convolution on an even size pads (0, 1).
  * "torch": PyTorch's `padding=k // 2`, (k // 2, k // 2) whatever the
    stride (RobustBench's ResNet-18 and WideResNet).
  * "dm": p = max(k - s, 0), XLA's SAME for a size the stride divides, the
    same for every size (DeepMind's WideResNet: (1, 1) at stride 1, (0, 1)
    at stride 2).

  Args:
    mode: one of `PADDINGS`.
    size: the axis' length n ("same" only).
    kernel: the number of taps k along the axis.
    stride: the stride s along the axis.

  Returns:
    `(before, after)`, the zeros padded at each end.
  """
  if mode == "torch":
    return (kernel // 2, kernel // 2)
  if mode == "same":
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
  else:
    total = max(kernel - stride, 0)
  return (total // 2, total - total // 2)


def conv_padding(mode: str, kernel: int, stride: int) -> ConvPadding:
  """`nn.Conv`'s padding argument for a square convolution padded as `mode`.

  Args:
    mode: one of `PADDINGS` (see `padding_pair`).
    kernel: the kernel's size along each spatial axis.
    stride: the stride along each spatial axis.

  Returns:
    "SAME", or the `padding_pair` of both spatial axes.
  """
  checks.one_of("padding", mode, PADDINGS)
  if mode == "same":
    return "SAME"
  return [padding_pair(mode, 0, kernel, stride)] * 2


class Normalize(nn.Module):
  """Per-channel standardisation of images in [0, 1].

  normalize(x) = (x - mean) / std, an affine map with Lipschitz constant
  1 / min(std).

  Attributes:
    mean: the per-channel mean.
    std: the per-channel standard deviation.
  """

  mean: Sequence[float]
  std: Sequence[float]

  def __call__(self, x: Images) -> jax.Array:
    x = jnp.asarray(x)
    return (x - jnp.asarray(self.mean, x.dtype)) / jnp.asarray(self.std, x.dtype)

  def lipschitz_constant(self) -> float:
    """The Lipschitz constant 1 / min(std) (any norm, channels scaled separately)."""
    return 1.0 / min(self.std)


def batch_norm(train: bool, axis_name: str | None) -> Callable[..., nn.BatchNorm]:
  """A maker of BatchNorm layers with the models' settings.

  Args:
    train: whether the layers normalise with the batch's statistics (and
      update the running ones) or with the running ones.
    axis_name: the named axis to average batch statistics over in training.

  Returns:
    A function returning `nn.BatchNorm(momentum=0.9)`, its keyword
    arguments (e.g. `name`) passed on.
  """
  return lambda **kwargs: nn.BatchNorm(
    use_running_average=not train, momentum=0.9, axis_name=axis_name if train else None, **kwargs
  )


def _shortcut_conv(features: int, strides: int, padding: str) -> nn.Conv:
  """The strided 1x1 convolution of a residual block's shortcut."""
  return Conv(features, (1, 1), strides, use_bias=False, padding=conv_padding(padding, 1, strides))


def _conv3x3(features: int, strides: int, padding: str) -> nn.Conv:
  """A 3x3 convolution without bias, padded as `padding`."""
  return Conv(features, (3, 3), strides, use_bias=False, padding=conv_padding(padding, 3, strides))


class PreActBlock(nn.Module):
  """Pre-activation residual block: BN-act-conv, BN-act-conv, plus the shortcut.

  block(x) = conv(act(BN(conv_s(act(BN(x)))))) + shortcut, the shortcut
  being x, or a strided 1x1 convolution of act(BN(x)) when the stride or
  the width changes.

  Attributes:
    features: the output channels.
    strides: the stride of the first convolution.
    norm: a maker of normalisation layers (`batch_norm`).
    activation: a key of `ACTIVATIONS`.
    padding: one of `PADDINGS`.
    shortcut_from: "activation" (the shortcut convolves act(BN(x))) or
      "input" (it convolves x itself: RobustBench's `PreActBlock` and
      DeepMind's PreAct ResNet).
    shortcut_kernel: the side of the shortcut's kernel (1, or DeepMind's 3).

  References:
    He et al., 2016 (https://arxiv.org/abs/1603.05027)
  """

  residual = True  # the Lipschitz bound refuses: a product of layer norms is no bound
  features: int
  strides: int
  norm: Callable[..., Any]
  activation: str = "relu"
  padding: str = "same"
  shortcut_from: str = "activation"
  shortcut_kernel: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    act = ACTIVATIONS[self.activation]
    out = act(self.norm()(x))
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.features:
      k = self.shortcut_kernel
      conv = Conv(
        self.features,
        (k, k),
        self.strides,
        use_bias=False,
        padding=conv_padding(self.padding, k, self.strides),
      )
      shortcut = conv(out if self.shortcut_from == "activation" else x)
    out = _conv3x3(self.features, self.strides, self.padding)(out)
    out = act(self.norm()(out))
    out = _conv3x3(self.features, 1, self.padding)(out)
    return out + shortcut


class BasicBlock(nn.Module):
  """ResNet block: relu(BN(conv(relu(BN(conv_s(x))))) + shortcut(x)).

  The shortcut is x, or BN of a strided 1x1 convolution of x when the stride
  or the width changes.

  Attributes:
    features: the output channels.
    strides: the stride of the first convolution.
    norm: a maker of normalisation layers (`batch_norm`).
    padding: one of `PADDINGS`.

  References:
    He et al., 2015 (https://arxiv.org/abs/1512.03385)
  """

  residual = True
  features: int
  strides: int
  norm: Callable[..., Any]
  padding: str = "same"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    out = _conv3x3(self.features, self.strides, self.padding)(x)
    out = nn.relu(self.norm()(out))
    out = self.norm()(_conv3x3(self.features, 1, self.padding)(out))
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = self.norm()(_shortcut_conv(self.features, self.strides, self.padding)(x))
    return nn.relu(out + shortcut)
