"""ResNet-50: bottleneck blocks, with the CIFAR stem or torchvision's ImageNet stem."""

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxrobust import checks
from jaxrobust.models.blocks import Conv, Normalize, batch_norm, conv_padding
from jaxrobust.types import Images, Logits

# The stems of `ResNet50`: "cifar" (3x3 convolution) and "imagenet" (7x7 at
# stride 2 and a 3x3 max-pool at stride 2).
STEMS = ("cifar", "imagenet")


def _conv(features: int, kernel: int, strides: int, name: str) -> nn.Conv:
  """A convolution without bias padded as PyTorch's `padding=kernel // 2`."""
  padding = conv_padding("torch", kernel, strides)
  return Conv(features, (kernel, kernel), strides, use_bias=False, padding=padding, name=name)


class Bottleneck(nn.Module):
  """Bottleneck block: 1x1, 3x3 (strided), 1x1 to 4 `planes`, each after BN-ReLU's input.

  block(x) = relu(BN(conv3(relu(BN(conv2_s(relu(BN(conv1(x)))))))) + shortcut),
  the shortcut being x, or BN of a strided 1x1 convolution of x when the
  stride or the width changes. The stride sits on the 3x3 convolution
  (torchvision's ResNet v1.5, RobustBench's CIFAR `Bottleneck`).

  Attributes:
    planes: the block outputs 4 `planes` channels.
    strides: the stride of the 3x3 convolution.
    norm: a maker of normalisation layers (`batch_norm`).
    inner: the channels of the inner convolutions (default `planes`;
      torchvision's `wide_resnet50_2`: 2 `planes`).

  References:
    He et al., 2015 (https://arxiv.org/abs/1512.03385)
  """

  residual = True
  planes: int
  strides: int
  norm: Callable[..., Any]
  inner: int | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    norm = lambda name: self.norm(name=name)
    inner = self.inner or self.planes
    out = nn.relu(norm("bn1")(_conv(inner, 1, 1, "conv1")(x)))
    out = nn.relu(norm("bn2")(_conv(inner, 3, self.strides, "conv2")(out)))
    out = norm("bn3")(_conv(4 * self.planes, 1, 1, "conv3")(out))
    shortcut = x
    if self.strides != 1 or x.shape[-1] != 4 * self.planes:
      shortcut = norm("shortcut_bn")(_conv(4 * self.planes, 1, self.strides, "shortcut_conv")(x))
    return nn.relu(out + shortcut)


def bottleneck_blocks(width: int, stage_blocks: Sequence[int]) -> list[tuple[int, int, int]]:
  """The bottleneck blocks of a ResNet, in order.

  Stage s has `stage_blocks[s]` blocks of `width` 2^s planes, stride 2 at
  the start of every stage but the first.

  Args:
    width: the planes of the first stage.
    stage_blocks: the number of blocks of each stage.

  Returns:
    `[(stage, planes, stride)]`.
  """
  return [
    (s, width * 2**s, 2 if s > 0 and b == 0 else 1)
    for s, n in enumerate(stage_blocks)
    for b in range(n)
  ]


class ResNet50(nn.Module):
  """ResNet-50: a stem, 3-4-6-3 `Bottleneck`s, global average pooling, dense.

  `stem="cifar"` is RobustBench's CIFAR `ResNet50` (3x3 stem with BN-ReLU);
  `stem="imagenet"` is torchvision's `resnet50` (7x7 stem at stride 2,
  BN-ReLU, 3x3 max-pool at stride 2 padded (1, 1)). The normalisation
  RobustBench wraps around torchvision's network (`normalize_model`) is the
  model's `Normalize`.

  Attributes:
    num_classes: the number of classes K.
    mean: the per-channel mean of `Normalize`.
    std: the per-channel standard deviation of `Normalize`.
    axis_name: the named axis BatchNorm averages over in training.
    stem: one of `STEMS`.
    width: the planes of the first stage (64; the first stage outputs 4 `width`).
    stage_blocks: the blocks of each stage ((3, 4, 6, 3): ResNet-50).
    group_width: torchvision's `width_per_group`: the inner convolutions
      have `group_width / 64` times a block's planes (128:
      `wide_resnet50_2`).

  References:
    He et al., 2015 (https://arxiv.org/abs/1512.03385)
  """

  num_classes: int
  mean: Sequence[float]
  std: Sequence[float]
  axis_name: str | None = None
  stem: str = "cifar"
  width: int = 64
  stage_blocks: Sequence[int] = (3, 4, 6, 3)
  group_width: int = 64

  @nn.compact
  def __call__(self, x: Images, train: bool = False) -> Logits:
    checks.one_of("stem", self.stem, STEMS)
    norm = batch_norm(train, self.axis_name)
    h = Normalize(self.mean, self.std)(x)
    if self.stem == "cifar":
      h = nn.relu(norm(name="bn1")(_conv(self.width, 3, 1, "conv1")(h)))
    else:
      h = nn.relu(norm(name="bn1")(_conv(self.width, 7, 2, "conv1")(h)))
      h = nn.max_pool(h, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for k, (_, planes, strides) in enumerate(bottleneck_blocks(self.width, self.stage_blocks)):
      inner = planes * self.group_width // 64
      h = Bottleneck(planes, strides, norm, inner, name=f"block{k}")(h)
    return nn.Dense(self.num_classes, name="fc")(jnp.mean(h, axis=(1, 2)))
