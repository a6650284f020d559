"""WideResNets: the standard one and DeepMind's (Swish, its own padding)."""

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxrobust import checks
from jaxrobust.models.blocks import (
  ACTIVATIONS,
  Activation,
  Conv,
  Normalize,
  PreActBlock,
  PSSiLU,
  batch_norm,
)
from jaxrobust.models.blocks import activation_fn, conv_padding, standardize_per_image
from jaxrobust.types import Images, Logits

from jaxrobust.models.resnet import CIFAR10_MEAN, CIFAR10_STD

# The classifiers of `WideResNet`: a dense layer, or the cosine head.
HEADS = ("dense", "cosine")


def _wide_resnet(
  x: jax.Array,
  *,
  depth: int,
  width: int,
  norm: Callable[[], nn.Module],
  activation: Activation,
  padding: str,
) -> jax.Array:
  """The body of a WideResNet after its normalisation: stem, blocks, BN-act, mean pool."""
  checks.require(
    (depth - 4) % 6 == 0 and depth >= 10,
    f"WideResNet depth must be 6n + 4 with n >= 1, got {depth}",
  )
  blocks = (depth - 4) // 6
  x = Conv(16, (3, 3), use_bias=False, padding=conv_padding(padding, 3, 1))(x)
  for stage, features in enumerate((16, 32, 64)):
    for block in range(blocks):
      strides = 2 if stage > 0 and block == 0 else 1
      x = PreActBlock(features * width, strides, norm, activation, padding)(x)
  x = activation_fn(activation)(norm()(x))
  return jnp.mean(x, axis=(1, 2))


class WideResNet(nn.Module):
  """WideResNet-`depth`-`width` with pre-activation blocks.

  Three stages of (depth - 4) / 6 `PreActBlock`s with 16 `width`, 32 `width`
  and 64 `width` channels (stride 2 at the start of stages 2 and 3), final
  BN-ReLU, global average pooling, dense `num_classes`. `padding="torch"`
  is RobustBench's (and TRADES') `WideResNet`.

  Attributes:
    num_classes: the number of classes K.
    mean: the per-channel mean of `Normalize`.
    std: the per-channel standard deviation of `Normalize`.
    depth: 6 n + 4, n >= 1 blocks a stage.
    width: the widening factor.
    axis_name: the named axis BatchNorm averages over in training.
    padding: one of `PADDINGS`.
    head: "dense", or "cosine": logits_k = <f / |f|, w_k / |w_k|>, the
      cosine of the pooled features f and class k's weights, without bias
      (Pang et al. 2020's hypersphere embedding, RobustBench's
      `BoostingWideResNet`).
    activation: "relu", "swish", or "pssilu": one `PSSiLU` (parameters
      `activation.alpha` and `activation.beta`) that every layer shares
      (Dai et al.'s `pssilu_wrn_28_10`).
    per_image: after `Normalize`, each image standardised by its own mean
      and standard deviation (`standardize_per_image`; Ding et al.'s MMA
      network).

  References:
    Zagoruyko & Komodakis, 2016 (https://arxiv.org/abs/1605.07146);
    Pang et al., 2020 (https://arxiv.org/abs/2002.08619);
    Dai et al., 2021 (https://arxiv.org/abs/2110.05626);
    Ding et al., 2020 (https://openreview.net/forum?id=HkeryxBtPB)
  """

  num_classes: int
  mean: Sequence[float]
  std: Sequence[float]
  depth: int = 28
  width: int = 10
  axis_name: str | None = None
  padding: str = "same"
  head: str = "dense"
  activation: str = "relu"
  per_image: bool = False

  @nn.compact
  def __call__(self, x: Images, train: bool = False) -> Logits:
    checks.one_of("head", self.head, HEADS)
    checks.one_of("activation", self.activation, ("relu", "swish", "pssilu"))
    x = Normalize(self.mean, self.std)(x)
    if self.per_image:
      x = standardize_per_image(x)
    act: Activation = PSSiLU(name="activation") if self.activation == "pssilu" else self.activation
    x = _wide_resnet(
      x,
      depth=self.depth,
      width=self.width,
      activation=act,
      norm=batch_norm(train, self.axis_name),
      padding=self.padding,
    )
    if self.head == "dense":
      return nn.Dense(self.num_classes)(x)
    dense = nn.Dense(self.num_classes, use_bias=False)
    out = dense(x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12))
    kernel = dense.variables["params"]["kernel"]
    return out / jnp.maximum(jnp.linalg.norm(kernel, axis=0), 1e-12)


class DMWideResNet(nn.Module):
  """DeepMind's WideResNet-`depth`-`width`.

  `WideResNet` with `activation` (Swish, x sigmoid(x), by default)
  everywhere and "dm" padding (a stride-2 3x3 convolution pads (0, 1), a
  stride-1 one (1, 1)). Its PyTorch layout is RobustBench's `DMWideResNet`
  (`init_conv`, `layer`, `logits`) without input padding (its default
  `padding=0`); the features are averaged over the whole final map, which
  RobustBench's 8x8 window covers on 32x32 images.

  Attributes:
    num_classes: the number of classes K.
    mean: the per-channel mean of `Normalize` (CIFAR-10's by default).
    std: the per-channel standard deviation of `Normalize`.
    depth: 6 n + 4, n >= 1 blocks a stage.
    width: the widening factor.
    activation: a key of `ACTIVATIONS`.
    axis_name: the named axis BatchNorm averages over in training.

  References:
    Gowal et al., 2020 (https://arxiv.org/abs/2010.03593);
    Rebuffi et al., 2021 (https://arxiv.org/abs/2103.01946)
  """

  num_classes: int
  mean: Sequence[float] = CIFAR10_MEAN
  std: Sequence[float] = CIFAR10_STD
  depth: int = 28
  width: int = 10
  activation: str = "swish"
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x: Images, train: bool = False) -> Logits:
    checks.one_of("activation", self.activation, tuple(ACTIVATIONS))
    x = Normalize(self.mean, self.std)(x)
    x = _wide_resnet(
      x,
      depth=self.depth,
      width=self.width,
      activation=self.activation,
      norm=batch_norm(train, self.axis_name),
      padding="dm",
    )
    return nn.Dense(self.num_classes)(x)


class RobustWideResNet(nn.Module):
  """A WideResNet with its own channels and blocks per stage (Huang et al.'s RobustWideResNet).

  A 3x3 stem to `channels[0]`, then stage s of `depths[s]` `PreActBlock`s
  (ReLU, PyTorch's padding) to `channels[s + 1]` channels, stride 2 at the
  start of every stage but the first, final BN-ReLU, global average
  pooling, dense. Its PyTorch layout is RobustBench's `RobustWideResNet`
  (`stem_conv`, `blocks.0.layer.0.bn1`, `fc`), whose stride configuration
  is (1, 2, 2).

  Attributes:
    num_classes: the number of classes K.
    mean: the per-channel mean of `Normalize`.
    std: the per-channel standard deviation of `Normalize`.
    channels: the stem's channels, then each stage's.
    depths: the blocks of each stage.
    axis_name: the named axis BatchNorm averages over in training.
    activation: a key of `ACTIVATIONS`.

  References:
    Huang et al., 2021 (https://arxiv.org/abs/2110.03825)
  """

  num_classes: int
  mean: Sequence[float]
  std: Sequence[float]
  channels: Sequence[int] = (16, 320, 640, 512)
  depths: Sequence[int] = (5, 5, 5)
  axis_name: str | None = None
  activation: str = "relu"

  @nn.compact
  def __call__(self, x: Images, train: bool = False) -> Logits:
    checks.require(
      len(self.channels) == len(self.depths) + 1,
      f"RobustWideResNet needs one more channel count than stages, got {self.channels} "
      f"for {self.depths}",
    )
    checks.one_of("activation", self.activation, tuple(ACTIVATIONS))
    norm = batch_norm(train, self.axis_name)
    x = Normalize(self.mean, self.std)(x)
    x = Conv(self.channels[0], (3, 3), use_bias=False, padding=conv_padding("torch", 3, 1))(x)
    for stage, blocks in enumerate(self.depths):
      for block in range(blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        x = PreActBlock(self.channels[stage + 1], strides, norm, self.activation, "torch")(x)
    x = ACTIVATIONS[self.activation](norm()(x))
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))
