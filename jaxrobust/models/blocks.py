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
# Activations with parameters, one module a network shares (`activation_layer`).
PARAMETRIC_ACTIVATIONS = ("pssilu",)

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


def standardize_per_image(x: jax.Array) -> jax.Array:
  """Each image standardised by its own mean and standard deviation.

  x' = (x - mean(x)) / max(std(x), 1 / sqrt(n)) over the n = H W C values of
  an image, std with Bessel's correction (PyTorch's `std`; Ding et al.'s
  MMA network).

  Args:
    x: NHWC images.

  Returns:
    The standardised images.
  """
  n = x.shape[1] * x.shape[2] * x.shape[3]
  mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
  std = jnp.std(x, axis=(1, 2, 3), keepdims=True, ddof=1)
  return (x - mean) / jnp.maximum(std, 1.0 / n**0.5)


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


class PSSiLU(nn.Module):
  """Parametric shifted SiLU, one (alpha, beta) pair.

  pssilu(x) = x (sigmoid(|alpha| x) - |beta|) / (1 - |beta|), alpha = 1
  and beta = 1e-8 at initialisation (RobustBench's `PSSiLU`).

  References:
    Dai et al., 2021 (https://arxiv.org/abs/2110.05626)
  """

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    alpha = jnp.abs(self.param("alpha", nn.initializers.ones, (1,), jnp.float32))
    beta = jnp.abs(self.param("beta", nn.initializers.constant(1e-8), (1,), jnp.float32))
    alpha, beta = alpha.astype(x.dtype), beta.astype(x.dtype)
    return x * (nn.sigmoid(alpha * x) - beta) / (1 - beta)


Activation: TypeAlias = str | Callable[[jax.Array], jax.Array]


def activation_fn(activation: Activation) -> Callable[[jax.Array], jax.Array]:
  """The function of an activation: a key of `ACTIVATIONS`, or a callable (e.g. a shared `PSSiLU`).

  Args:
    activation: a key of `ACTIVATIONS`, or the function itself.

  Returns:
    The function.
  """
  return ACTIVATIONS[activation] if isinstance(activation, str) else activation


class MeanSparse(nn.Module):
  """Mean-centred feature sparsification, per channel c.

  meansparse(x)_c = mu_c where |x_c - mu_c| < t sqrt(var_c), else x_c: the
  values within t standard deviations of the channel's mean are set to the
  mean (the identity for t = 0). mu, var and t are fixed statistics
  (collection "batch_stats": `mean`, `var`, `threshold`), never updated.

  References:
    Amini et al., 2024 (https://arxiv.org/abs/2406.05927)
  """

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32).value
    var = self.variable("batch_stats", "var", jnp.zeros, (c,), jnp.float32).value
    threshold = self.variable("batch_stats", "threshold", jnp.zeros, (), jnp.float32).value
    mean = mean.astype(x.dtype)
    crop = (threshold * jnp.sqrt(var)).astype(x.dtype)
    return jnp.where(jnp.abs(x - mean) < crop, mean, x)


class SqueezeExcitation(nn.Module):
  """Squeeze-and-excitation: x times sigmoid(W2 relu(W1 mean_hw(x) + b1) + b2).

  The two dense maps are 1x1 convolutions with bias (torchvision's
  `SqueezeExcitation`, `fc1` and `fc2`).

  Attributes:
    squeeze: the channels of the inner layer.

  References:
    Hu et al., 2018 (https://arxiv.org/abs/1709.01507)
  """

  squeeze: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    s = jnp.mean(x, axis=(1, 2), keepdims=True)
    s = nn.relu(Conv(self.squeeze, (1, 1), name="fc1")(s))
    s = Conv(x.shape[-1], (1, 1), name="fc2")(s)
    return x * nn.sigmoid(s)


def _identity(x: jax.Array) -> jax.Array:
  return x


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
    se_ratio: > 0: a `SqueezeExcitation` of round(se_ratio features)
      channels on the residual branch before the sum (Peng et al.'s
      RaWideResNet).
    meansparse: a `MeanSparse` after each BN and after the sum (Amini et al.).

  References:
    He et al., 2016 (https://arxiv.org/abs/1603.05027)
  """

  residual = True  # the Lipschitz bound refuses: a product of layer norms is no bound
  features: int
  strides: int
  norm: Callable[..., Any]
  activation: Activation = "relu"
  padding: str = "same"
  shortcut_from: str = "activation"
  shortcut_kernel: int = 1
  se_ratio: float = 0.0
  meansparse: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    act = activation_fn(self.activation)
    sparse = (lambda: MeanSparse()) if self.meansparse else (lambda: _identity)
    out = act(sparse()(self.norm()(x)))
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
    out = act(sparse()(self.norm()(out)))
    out = _conv3x3(self.features, 1, self.padding)(out)
    if self.se_ratio:
      out = SqueezeExcitation(int(round(self.se_ratio * self.features)))(out)
    return sparse()(out + shortcut)


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
