"""ResNet-18 and PreAct ResNet-18 in their CIFAR form (3x3 stem, no stem pooling)."""

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxrobust import checks

from jaxrobust.models.blocks import ACTIVATIONS, BasicBlock, Conv, Normalize, PreActBlock
from jaxrobust.models.blocks import batch_norm, conv_padding
from jaxrobust.types import Images, Logits

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)


def resnet18_blocks(width: int) -> list[tuple[int, int, int, int]]:
  """The 8 residual blocks of a CIFAR ResNet-18.

  Four stages of two blocks with `width` times 1, 2, 4, 8 channels, stride 2
  at the start of stages 2-4.

  Args:
    width: the channels of the first stage.

  Returns:
    `[(stage, in channels, out channels, stride)]`, in order.
  """
  blocks, cin = [], width
  for stage in range(4):
    cout = width * 2**stage
    for block in range(2):
      blocks.append((stage, cin, cout, 2 if stage > 0 and block == 0 else 1))
      cin = cout
  return blocks


class PreActResNet18(nn.Module):
  """PreAct ResNet-18: a 3x3 stem, eight `PreActBlock`s, BN-ReLU, pooling, dense.

  The blocks are `resnet18_blocks(width)`; the features are averaged over
  the whole final map. `padding="torch"` is the layout of RobustBench's
  `PreActResNet` with `PreActBlockV2` and `bn_before_fc`; with
  `final_bn=False` and `shortcut_from="input"` too, its plain
  `PreActResNet18` (`PreActBlock`, pooling without a final BN-ReLU).

  Attributes:
    num_classes: the number of classes K.
    mean: the per-channel mean of `Normalize`.
    std: the per-channel standard deviation of `Normalize`.
    axis_name: the named axis BatchNorm averages over in training.
    padding: one of `PADDINGS`.
    width: the channels of the first stage.
    final_bn: whether BN-ReLU precedes the pooling.
    shortcut_from: what the blocks' shortcuts convolve (`SHORTCUTS`).

  References:
    He et al., 2016 (https://arxiv.org/abs/1603.05027)
  """

  num_classes: int
  mean: Sequence[float]
  std: Sequence[float]
  axis_name: str | None = None
  padding: str = "same"
  width: int = 64
  final_bn: bool = True
  shortcut_from: str = "activation"

  @nn.compact
  def __call__(self, x: Images, train: bool = False) -> Logits:
    norm = batch_norm(train, self.axis_name)
    x = Normalize(self.mean, self.std)(x)
    x = Conv(self.width, (3, 3), use_bias=False, padding=conv_padding(self.padding, 3, 1))(x)
    for _, _, features, strides in resnet18_blocks(self.width):
      x = PreActBlock(
        features, strides, norm, padding=self.padding, shortcut_from=self.shortcut_from
      )(x)
    if self.final_bn:
      x = nn.relu(norm()(x))
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


class DMPreActResNet18(nn.Module):
  """DeepMind's PreAct ResNet-18: `PreActResNet18` with Swish and 3x3 shortcuts.

  Every convolution pads "dm" ((1, 1) at stride 1, (0, 1) at stride 2); a
  block's shortcut, when the stride or width changes, is a strided 3x3
  convolution of the block's input (not of its activation). Its PyTorch
  layout is RobustBench's `DMPreActResNet` (`conv_2d`, `layer_0.0.conv_2d_1`,
  `logits`) without input padding.

  Attributes:
    num_classes: the number of classes K.
    mean: the per-channel mean of `Normalize` (CIFAR-10's by default).
    std: the per-channel standard deviation of `Normalize`.
    activation: a key of `ACTIVATIONS`.
    axis_name: the named axis BatchNorm averages over in training.
    width: the channels of the first stage.

  References:
    Rebuffi et al., 2021 (https://arxiv.org/abs/2103.01946)
  """

  num_classes: int
  mean: Sequence[float] = CIFAR10_MEAN
  std: Sequence[float] = CIFAR10_STD
  activation: str = "swish"
  axis_name: str | None = None
  width: int = 64

  @nn.compact
  def __call__(self, x: Images, train: bool = False) -> Logits:
    norm = batch_norm(train, self.axis_name)
    x = Normalize(self.mean, self.std)(x)
    x = Conv(self.width, (3, 3), use_bias=False, padding=conv_padding("dm", 3, 1))(x)
    for _, _, features, strides in resnet18_blocks(self.width):
      x = PreActBlock(features, strides, norm, self.activation, "dm", "input", 3)(x)
    x = ACTIVATIONS[self.activation](norm()(x))
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


class ResNet18(nn.Module):
  """ResNet-18: a 3x3 stem with BN-ReLU, eight `BasicBlock`s, pooling, dense.

  The blocks are `resnet18_blocks(width)`; the features are averaged over
  the whole final map. `padding="torch"` is RobustBench's `ResNet18`; with
  `stem="imagenet"` too, torchvision's `resnet18` (7x7 stem at stride 2,
  BN-ReLU, 3x3 max-pool at stride 2 padded (1, 1)).

  Attributes:
    num_classes: the number of classes K.
    mean: the per-channel mean of `Normalize`.
    std: the per-channel standard deviation of `Normalize`.
    axis_name: the named axis BatchNorm averages over in training.
    padding: one of `PADDINGS`.
    width: the channels of the first stage.
    stem: "cifar" (3x3 convolution) or "imagenet" (torchvision's).

  References:
    He et al., 2015 (https://arxiv.org/abs/1512.03385)
  """

  num_classes: int
  mean: Sequence[float]
  std: Sequence[float]
  axis_name: str | None = None
  padding: str = "same"
  width: int = 64
  stem: str = "cifar"

  @nn.compact
  def __call__(self, x: Images, train: bool = False) -> Logits:
    checks.one_of("stem", self.stem, ("cifar", "imagenet"))
    norm = batch_norm(train, self.axis_name)
    x = Normalize(self.mean, self.std)(x)
    k, s = (7, 2) if self.stem == "imagenet" else (3, 1)
    x = Conv(self.width, (k, k), s, use_bias=False, padding=conv_padding(self.padding, k, s))(x)
    x = nn.relu(norm()(x))
    if self.stem == "imagenet":
      x = jnp.asarray(nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1))))
    for _, _, features, strides in resnet18_blocks(self.width):
      x = BasicBlock(features, strides, norm, padding=self.padding)(x)
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))
