"""Image classifiers, all taking images in [0, 1] (NHWC) and returning logits.

Each model normalises its input with the data set's per-channel mean and std
inside the model (`Normalize`), so attacks and certificates are stated in the
[0, 1] pixel space. Models with BatchNorm synchronise batch statistics over the
named axis `axis_name` when it is set (data-parallel training sets it to the
batch axis of the device mesh); attacks call models with `train=False`, which
reads the running statistics and never updates them.
"""
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxrobust import checks


class Normalize(nn.Module):
  """(x - mean) / std per channel: an affine map with Lipschitz constant 1 / min(std)."""
  mean: Sequence[float]
  std: Sequence[float]

  def __call__(self, x):
    return (x - jnp.asarray(self.mean, x.dtype)) / jnp.asarray(self.std, x.dtype)

  def lipschitz_constant(self):
    return 1.0 / min(self.std)


class SmallCNN(nn.Module):
  """The default model: two conv-conv-maxpool stages and a 2-layer head, no BatchNorm.

  Conv 3x3 `width`, ReLU, conv 3x3 `width`, ReLU, max-pool 2; the same with
  `2 width`; dense 4 `width`, ReLU; dense `num_classes`.
  """
  num_classes: int
  mean: Sequence[float]
  std: Sequence[float]
  width: int = 32
  axis_name: Optional[str] = None  # unused: no BatchNorm

  @nn.compact
  def __call__(self, x, train=False):
    del train
    x = Normalize(self.mean, self.std)(x)
    for features in (self.width, 2 * self.width):
      x = nn.relu(nn.Conv(features, (3, 3))(x))
      x = nn.relu(nn.Conv(features, (3, 3))(x))
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(4 * self.width)(x))
    return nn.Dense(self.num_classes)(x)


class SeedCNN(nn.Module):
  """The seed study's network, the "basic network from the PyTorch tutorial".

  Conv 6 filters 5x5 (VALID), ReLU, max-pool 2; conv 16 filters 5x5 (VALID),
  ReLU, max-pool 2; dense 120, ReLU; dense 84, ReLU; dense `num_classes`.
  On 32x32x3 inputs it has 62,006 parameters, as in the tutorial.
  """
  num_classes: int
  mean: Sequence[float]
  std: Sequence[float]
  axis_name: Optional[str] = None  # unused: no BatchNorm

  @nn.compact
  def __call__(self, x, train=False):
    del train
    x = Normalize(self.mean, self.std)(x)
    for features in (6, 16):
      x = nn.relu(nn.Conv(features, (5, 5), padding="VALID")(x))
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(120)(x))
    x = nn.relu(nn.Dense(84)(x))
    return nn.Dense(self.num_classes)(x)


class PreActBlock(nn.Module):
  """Pre-activation residual block (He et al. 2016): BN-ReLU-conv, BN-ReLU-conv, plus shortcut."""
  residual = True  # `spectral.lipschitz_bound` refuses: a product of layer norms is no bound
  features: int
  strides: int
  norm: Callable[..., Any]

  @nn.compact
  def __call__(self, x):
    out = nn.relu(self.norm()(x))
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = nn.Conv(self.features, (1, 1), self.strides, use_bias=False)(out)
    out = nn.Conv(self.features, (3, 3), self.strides, use_bias=False)(out)
    out = nn.relu(self.norm()(out))
    out = nn.Conv(self.features, (3, 3), use_bias=False)(out)
    return out + shortcut


def _batch_norm(train, axis_name):
  return lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9,
                              axis_name=axis_name if train else None)


class PreActResNet18(nn.Module):
  """PreAct ResNet-18 (He et al. 2016), the usual CIFAR form (3x3 stem, no stem pooling).

  Four stages of two pre-activation blocks with 64, 128, 256, 512 channels
  (stride 2 at the start of stages 2-4), final BN-ReLU, global average pooling,
  dense `num_classes`.
  """
  num_classes: int
  mean: Sequence[float]
  std: Sequence[float]
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, train=False):
    norm = _batch_norm(train, self.axis_name)
    x = Normalize(self.mean, self.std)(x)
    x = nn.Conv(64, (3, 3), use_bias=False)(x)
    for stage, features in enumerate((64, 128, 256, 512)):
      for block in range(2):
        x = PreActBlock(features, 2 if stage > 0 and block == 0 else 1, norm)(x)
    x = nn.relu(norm()(x))
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


class WideResNet(nn.Module):
  """WideResNet-`depth`-`width` (Zagoruyko & Komodakis 2016) with pre-activation blocks.

  Three stages of (depth - 4) / 6 blocks with 16 `width`, 32 `width` and
  64 `width` channels (stride 2 at the start of stages 2 and 3), final
  BN-ReLU, global average pooling, dense `num_classes`.
  """
  num_classes: int
  mean: Sequence[float]
  std: Sequence[float]
  depth: int = 28
  width: int = 10
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, train=False):
    checks.require((self.depth - 4) % 6 == 0 and self.depth >= 10,
                   f"WideResNet depth must be 6n + 4 with n >= 1, got {self.depth}")
    norm = _batch_norm(train, self.axis_name)
    blocks = (self.depth - 4) // 6
    x = Normalize(self.mean, self.std)(x)
    x = nn.Conv(16, (3, 3), use_bias=False)(x)
    for stage, features in enumerate((16, 32, 64)):
      for block in range(blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        x = PreActBlock(features * self.width, strides, norm)(x)
    x = nn.relu(norm()(x))
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


MODELS = {
    "small_cnn": SmallCNN,
    "seed_cnn": SeedCNN,
    "preact_resnet18": PreActResNet18,
    "wide_resnet": WideResNet,
}


def create(name, *, num_classes, mean, std, axis_name=None, **kwargs):
  """Builds model `name` (one of `MODELS`) with its hyper-parameters `kwargs`."""
  checks.one_of("model", name, tuple(MODELS))
  cls = MODELS[name]
  unknown = sorted(set(kwargs) - set(cls.__dataclass_fields__))
  checks.require(not unknown, f"model {name!r} has no setting {unknown[0]!r}"
                 if unknown else "")
  return cls(num_classes=num_classes, mean=tuple(mean), std=tuple(std),
             axis_name=axis_name, **kwargs)
