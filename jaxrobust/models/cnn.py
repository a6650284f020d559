"""Plain convolutional networks without BatchNorm, optionally spectrally normalised."""

from collections.abc import Callable, Sequence
from typing import NamedTuple

import flax.linen as nn
import jax

from jaxrobust import spectral as spectral_lib
from jaxrobust.models import layers
from jaxrobust.models.blocks import Conv, Normalize
from jaxrobust.types import Images, Logits


class SpectralSettings(NamedTuple):
  """Settings of `spectral.SpectralNorm` for every Conv and Dense layer of a model.

  Attributes:
    mode: one of `spectral.MODES`.
    target: the spectral norm the layers are normalised to.
    n_steps: power-iteration steps per training step.
    rescale: one of `spectral.RESCALES`.
  """

  mode: str = "operator"
  target: float = 1.0
  n_steps: int = 1
  rescale: str = "clip"


def _linear(
  layer: nn.Module, spectral: SpectralSettings | None, train: bool
) -> Callable[[jax.Array], jax.Array]:
  """`layer`, spectrally normalised when `spectral` is set.

  The power iteration (collection "spectral") advances in training only.
  """
  if spectral is None:
    return layer
  normalised = spectral_lib.SpectralNorm(layer, **spectral._asdict())
  return lambda x: normalised(x, update_stats=train)


class SmallCNN(nn.Module):
  """Two conv-conv-maxpool stages and a two-layer head, without BatchNorm.

  Conv 3x3 `width`, ReLU, conv 3x3 `width`, ReLU, max-pool 2; the same with
  2 `width` channels; dense 4 `width`, ReLU; dense `num_classes`.

  Attributes:
    num_classes: the number of classes K.
    mean: the per-channel mean of `Normalize`.
    std: the per-channel standard deviation of `Normalize`.
    width: the channels of the first stage.
    axis_name: unused (no BatchNorm); every model takes it.
    spectral: normalises every Conv and Dense layer when set.
  """

  num_classes: int
  mean: Sequence[float]
  std: Sequence[float]
  width: int = 32
  axis_name: str | None = None
  spectral: SpectralSettings | None = None

  @nn.compact
  def __call__(self, x: Images, train: bool = False) -> Logits:
    linear = lambda layer: _linear(layer, self.spectral, train)
    x = Normalize(self.mean, self.std)(x)
    for features in (self.width, 2 * self.width):
      x = nn.relu(linear(Conv(features, (3, 3)))(x))
      x = nn.relu(linear(Conv(features, (3, 3)))(x))
      x = layers.max_pool(x)
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(linear(nn.Dense(4 * self.width))(x))
    return linear(nn.Dense(self.num_classes))(x)


class SeedCNN(nn.Module):
  """The basic network of the PyTorch CIFAR-10 tutorial.

  Conv 6 filters 5x5 (VALID), ReLU, max-pool 2; conv 16 filters 5x5
  (VALID), ReLU, max-pool 2; dense 120, ReLU; dense 84, ReLU; dense
  `num_classes`. On 32x32x3 images it has 62,006 parameters, as in the
  tutorial.

  Attributes:
    num_classes: the number of classes K.
    mean: the per-channel mean of `Normalize`.
    std: the per-channel standard deviation of `Normalize`.
    axis_name: unused (no BatchNorm); every model takes it.
    spectral: normalises every Conv and Dense layer when set.

  References:
    https://pytorch.org/tutorials/beginner/blitz/cifar10_tutorial.html
  """

  num_classes: int
  mean: Sequence[float]
  std: Sequence[float]
  axis_name: str | None = None
  spectral: SpectralSettings | None = None

  @nn.compact
  def __call__(self, x: Images, train: bool = False) -> Logits:
    linear = lambda layer: _linear(layer, self.spectral, train)
    h = Normalize(self.mean, self.std)(x)
    for features in (6, 16):  # plain Flax layers: `fastpath` makes them fast on CPU
      h = nn.relu(linear(nn.Conv(features, (5, 5), padding="VALID"))(h))
      h = nn.max_pool(h, (2, 2), strides=(2, 2))
    h = h.reshape(h.shape[0], -1)
    h = nn.relu(linear(nn.Dense(120))(h))
    h = nn.relu(linear(nn.Dense(84))(h))
    return linear(nn.Dense(self.num_classes))(h)
