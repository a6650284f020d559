"""Networks of single RobustBench entries: RaWideResNet (with MeanSparse), WRN-A4, Chen et al.'s ensemble."""

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxrobust import checks
from jaxrobust.models.blocks import ACTIVATIONS, Conv, MeanSparse, Normalize, PreActBlock
from jaxrobust.models.blocks import batch_norm, conv_padding
from jaxrobust.models.resnet import CIFAR10_MEAN, CIFAR10_STD
from jaxrobust.models.resnet50 import bottleneck_blocks
from jaxrobust.models.wide_resnet import RobustWideResNet
from jaxrobust.types import Images, Logits


class RaWideResNet(nn.Module):
  """DeepMind's WideResNet with its own widths and depths, squeeze-excitation and MeanSparse.

  A 3x3 stem to `stem_width` channels, then stage s of `depths[s]`
  `PreActBlock`s ("dm" padding, `activation`, a `SqueezeExcitation` of a
  quarter of the block's channels on the residual branch when
  `se_ratio=0.25`) to `widths[s]` channels, stride 2 at the start of every
  stage but the first, final BN-activation, global average pooling, dense.
  Its PyTorch layout is RobustBench's `NormalizedWideResNet`
  (`robustarch_wide_resnet.py`: `init_conv`, `layer.0.block.0.se.fc1`,
  `logits`). The defaults are Peng et al.'s RaWideResNet-70-16; with
  `meansparse=True`, Amini et al.'s MeanSparse networks (`MeanSparse` after
  every BN and block, `meansparse_end` after the final BN), which with
  `se_ratio=0` and widths 16 w, 32 w, 64 w are DeepMind's WideResNet-D-W
  plus MeanSparse (`Meansparse_wrn_70_16.py`, `Meansparse_wrn_94_16.py`).

  Attributes:
    num_classes: the number of classes K.
    mean: the per-channel mean of `Normalize` (CIFAR-10's by default).
    std: the per-channel standard deviation of `Normalize`.
    stem_width: the stem's channels.
    depths: the blocks of each stage.
    widths: the channels of each stage.
    se_ratio: the squeeze-excitation's channels over the block's (0: none).
    activation: a key of `ACTIVATIONS`.
    meansparse: the MeanSparse layers.
    axis_name: the named axis BatchNorm averages over in training.

  References:
    Peng et al., 2023 (https://arxiv.org/abs/2308.16258);
    Amini et al., 2024 (https://arxiv.org/abs/2406.05927)
  """

  num_classes: int
  mean: Sequence[float] = CIFAR10_MEAN
  std: Sequence[float] = CIFAR10_STD
  stem_width: int = 96
  depths: Sequence[int] = (30, 31, 10)
  widths: Sequence[int] = (216, 432, 864)
  se_ratio: float = 0.25
  activation: str = "swish"
  meansparse: bool = False
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x: Images, train: bool = False) -> Logits:
    checks.one_of("activation", self.activation, tuple(ACTIVATIONS))
    checks.require(
      len(self.depths) == len(self.widths),
      f"RaWideResNet needs a width per stage, got {self.widths} for depths {self.depths}",
    )
    norm = batch_norm(train, self.axis_name)
    x = Normalize(self.mean, self.std)(x)
    x = Conv(self.stem_width, (3, 3), use_bias=False, padding=conv_padding("dm", 3, 1))(x)
    for stage, (blocks, width) in enumerate(zip(self.depths, self.widths, strict=True)):
      for block in range(blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        x = PreActBlock(
          width,
          strides,
          norm,
          self.activation,
          "dm",
          se_ratio=self.se_ratio,
          meansparse=self.meansparse,
        )(x)
    x = jnp.asarray(norm()(x))
    if self.meansparse:
      x = MeanSparse()(x)
    x = ACTIVATIONS[self.activation](x)
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


class RobustResNet(RobustWideResNet):
  """Huang et al.'s WRN-A4: `RobustWideResNet` with SiLU, in RobustBench's `robust_resnet` layout.

  The same network as `RobustWideResNet` (its defaults WRN-A4's: channels
  16, 160, 448, 384, depths 27, 28, 13, SiLU); its PyTorch layout is
  RobustBench's `PreActResNet` of `robust_resnet.py` (`stem_conv`,
  `blocks.0.layer.0.shortcut.0`, `norm1`, `fc`, buffers `mu` and `sigma`).

  Attributes:
    num_classes: the number of classes K.
    mean: the per-channel mean of `Normalize`.
    std: the per-channel standard deviation of `Normalize`.
    channels: the stem's channels, then each stage's.
    depths: the blocks of each stage.
    axis_name: the named axis BatchNorm averages over in training.
    activation: a key of `ACTIVATIONS`.

  References:
    Huang et al., 2022 (https://arxiv.org/abs/2212.11005)
  """

  channels: Sequence[int] = (16, 160, 448, 384)
  depths: Sequence[int] = (27, 28, 13)
  activation: str = "swish"


def _conv(features: int, kernel: int, strides: int, name: str) -> nn.Conv:
  """A convolution without bias padded as PyTorch's `padding=kernel // 2`."""
  padding = conv_padding("torch", kernel, strides)
  return Conv(features, (kernel, kernel), strides, use_bias=False, padding=padding, name=name)


class PreActBottleneck(nn.Module):
  """Chen et al.'s bottleneck block: pre = relu(BN(x)), then 1x1, 3x3 (strided), 1x1.

  block(x) = conv3(relu(BN(conv2_s(relu(BN(conv1(pre))))))) + shortcut, the
  shortcut being x, or BN of a strided 1x1 convolution of pre when the
  stride or the width changes (RobustBench's `BottleneckChen2020AdversarialNet`).

  Attributes:
    planes: the block outputs 4 `planes` channels.
    strides: the stride of the 3x3 convolution.
    norm: a maker of normalisation layers (`batch_norm`).
  """

  residual = True
  planes: int
  strides: int
  norm: Callable[..., Any]

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    norm = lambda name: self.norm(name=name)
    pre = nn.relu(norm("bn0")(x))
    out = nn.relu(norm("bn1")(_conv(self.planes, 1, 1, "conv1")(pre)))
    out = nn.relu(norm("bn2")(_conv(self.planes, 3, self.strides, "conv2")(out)))
    out = _conv(4 * self.planes, 1, 1, "conv3")(out)
    if self.strides != 1 or x.shape[-1] != 4 * self.planes:
      conv = _conv(4 * self.planes, 1, self.strides, "shortcut_conv")
      return out + norm("shortcut_bn")(conv(pre))
    return out + x


class PreActResNet50Branch(nn.Module):
  """One branch of `PreActResNet50Ensemble`: its logits on normalised images.

  Attributes:
    num_classes: the number of classes K.
    norm: a maker of normalisation layers (`batch_norm`).
    width: the planes of the first stage.
    stage_blocks: the blocks of each stage.
  """

  num_classes: int
  norm: Callable[..., Any]
  width: int = 64
  stage_blocks: Sequence[int] = (3, 4, 6, 3)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.relu(self.norm(name="bn1")(_conv(self.width, 3, 1, "conv1")(x)))
    for k, (_, planes, strides) in enumerate(bottleneck_blocks(self.width, self.stage_blocks)):
      h = PreActBottleneck(planes, strides, self.norm, name=f"block{k}")(h)
    return nn.Dense(self.num_classes, name="fc")(jnp.mean(h, axis=(1, 2)))


class PreActResNet50Ensemble(nn.Module):
  """Chen et al.'s network: the mean of the softmax of `branches` pre-activation ResNet-50s.

  f(x) = (1 / B) sum_b softmax(g_b(x)), each g_b a CIFAR ResNet-50 (3x3
  stem with BN-ReLU, 3-4-6-3 `PreActBottleneck`s, global average pooling,
  dense). It returns probabilities, not logits, as RobustBench's
  `Chen2020AdversarialNet` does (its leaderboard's AutoAttack ran on them).
  Its PyTorch layout is that class's (`branch1.layer1.0.bn0`, the same
  weights again under `models.0.`, buffers `mu` and `sigma`).

  Attributes:
    num_classes: the number of classes K.
    mean: the per-channel mean of `Normalize`.
    std: the per-channel standard deviation of `Normalize`.
    branches: the number of ResNet-50s.
    width: the planes of the first stage.
    stage_blocks: the blocks of each stage.
    axis_name: the named axis BatchNorm averages over in training.

  References:
    Chen et al., 2020 (https://arxiv.org/abs/2003.12862)
  """

  num_classes: int
  mean: Sequence[float]
  std: Sequence[float]
  branches: int = 3
  width: int = 64
  stage_blocks: Sequence[int] = (3, 4, 6, 3)
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x: Images, train: bool = False) -> Logits:
    norm = batch_norm(train, self.axis_name)
    x = Normalize(self.mean, self.std)(x)
    probs = [
      jax.nn.softmax(
        PreActResNet50Branch(
          self.num_classes, norm, self.width, self.stage_blocks, name=f"branch{b + 1}"
        )(x),
        axis=-1,
      )
      for b in range(self.branches)
    ]
    return sum(probs[1:], probs[0]) / self.branches
