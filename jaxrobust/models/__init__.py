"""Image classifiers, all taking images in [0, 1] (NHWC) and returning logits.

Each model normalises its input with the data set's per-channel mean and std
inside the model (`Normalize`), so attacks and certificates are stated in the
[0, 1] pixel space. Models with BatchNorm synchronise batch statistics over the
named axis `axis_name` when it is set (data-parallel training sets it to the
batch axis of the device mesh); attacks call models with `train=False`, which
reads the running statistics and never updates them.

Two settings of `create` change what a model computes:

* `spectral=dict(mode="operator", target=1.0, n_steps=1, rescale="clip")`
  (SmallCNN, SeedCNN) wraps every Conv and Dense layer in
  `spectral.SpectralNorm`, with `update_stats=train`: the power iteration
  (collection "spectral") advances in training steps only, never in attacks
  or evaluation. The parameters keep the layout of the plain model.
* `noise=dict(sigma=0.25, samples=8, seed=0)` (any model) makes it the
  randomized classifier f~(x) = f(x + d), d ~ N(0, sigma^2 I) (`Randomized`):
  in inference it returns the log of the mean softmax over `samples` noise
  draws that are fixed by `seed`, so that `logits_fn(x)` is a pure function
  of x and an attack differentiating it runs expectation over transformation
  (EOT) over exactly the draws the prediction uses.
"""

import functools
from typing import Any, NamedTuple
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxrobust import checks, spectral as spectral_lib
from jaxrobust.models import layers

# nn.Conv with the kernel gradient XLA:CPU computes fast (`layers`).
Conv = functools.partial(nn.Conv, conv_general_dilated=layers.conv_general_dilated)

# How the residual networks pad their convolutions (`padding_pair`).
PADDINGS = ("same", "torch", "dm")
ACTIVATIONS = {"relu": nn.relu, "swish": nn.swish}
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)


def padding_pair(mode, size, kernel, stride):
  """(before, after) zeros padded to one spatial axis of length `size` for a
  convolution with `kernel` taps and `stride`.

  * "same": XLA's SAME, total p = max((ceil(size / s) - 1) s + k - size, 0),
    the smaller half before: a stride-2 3x3 conv on an even size pads (0, 1).
  * "torch": PyTorch's `padding=k // 2`, (k // 2, k // 2) whatever the stride
    (RobustBench's ResNet-18 and WideResNet).
  * "dm": p = max(k - s, 0), smaller half before: XLA's SAME for a size the
    stride divides, fixed for every size (DeepMind's WideResNet pads
    (1, 1) at stride 1 and (0, 1) at stride 2).
  """
  if mode == "torch":
    return (kernel // 2, kernel // 2)
  if mode == "same":
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
  else:
    total = max(kernel - stride, 0)
  return (total // 2, total - total // 2)


def conv_padding(mode, kernel, stride):
  """`nn.Conv`'s padding argument for padding `mode` (see `padding_pair`)."""
  checks.one_of("padding", mode, PADDINGS)
  if mode == "same":
    return "SAME"
  return [padding_pair(mode, 0, kernel, stride)] * 2


class Normalize(nn.Module):
  """(x - mean) / std per channel: an affine map with Lipschitz constant 1 / min(std)."""

  mean: Sequence[float]
  std: Sequence[float]

  def __call__(self, x):
    return (x - jnp.asarray(self.mean, x.dtype)) / jnp.asarray(self.std, x.dtype)

  def lipschitz_constant(self):
    return 1.0 / min(self.std)


class SpectralSettings(NamedTuple):
  """Settings of `spectral.SpectralNorm` for every Conv and Dense of a model."""

  mode: str = "operator"
  target: float = 1.0
  n_steps: int = 1
  rescale: str = "clip"


def _linear(layer, spectral, train):
  """`layer`, spectrally normalised when `spectral` (SpectralSettings) is set."""
  if spectral is None:
    return layer
  normalised = spectral_lib.SpectralNorm(layer, **spectral._asdict())
  return lambda x: normalised(x, update_stats=train)


class SmallCNN(nn.Module):
  """The default model: two conv-conv-maxpool stages and a 2-layer head, no BatchNorm.

  Conv 3x3 `width`, ReLU, conv 3x3 `width`, ReLU, max-pool 2; the same with
  `2 width`; dense 4 `width`, ReLU; dense `num_classes`.
  """

  num_classes: int
  mean: Sequence[float]
  std: Sequence[float]
  width: int = 32
  axis_name: str | None = None  # unused: no BatchNorm
  spectral: SpectralSettings | None = None

  @nn.compact
  def __call__(self, x, train=False):
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
  """The seed study's network, the "basic network from the PyTorch tutorial".

  Conv 6 filters 5x5 (VALID), ReLU, max-pool 2; conv 16 filters 5x5 (VALID),
  ReLU, max-pool 2; dense 120, ReLU; dense 84, ReLU; dense `num_classes`.
  On 32x32x3 inputs it has 62,006 parameters, as in the tutorial.
  """

  num_classes: int
  mean: Sequence[float]
  std: Sequence[float]
  axis_name: str | None = None  # unused: no BatchNorm
  spectral: SpectralSettings | None = None

  @nn.compact
  def __call__(self, x, train=False):
    linear = lambda layer: _linear(layer, self.spectral, train)
    x = Normalize(self.mean, self.std)(x)
    for features in (6, 16):  # plain Flax layers: `fastpath` makes them fast on CPU
      x = nn.relu(linear(nn.Conv(features, (5, 5), padding="VALID"))(x))
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(linear(nn.Dense(120))(x))
    x = nn.relu(linear(nn.Dense(84))(x))
    return linear(nn.Dense(self.num_classes))(x)


class PreActBlock(nn.Module):
  """Pre-activation residual block (He et al. 2016): BN-act-conv, BN-act-conv, plus shortcut.

  The shortcut is the input, or a strided 1x1 conv of the first activation
  when the stride or the width changes. `activation`: a key of `ACTIVATIONS`;
  `padding`: one of `PADDINGS`.
  """

  residual = True  # `spectral.lipschitz_bound` refuses: a product of layer norms is no bound
  features: int
  strides: int
  norm: Callable[..., Any]
  activation: str = "relu"
  padding: str = "same"

  @nn.compact
  def __call__(self, x):
    act = ACTIVATIONS[self.activation]
    out = act(self.norm()(x))
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = Conv(
        self.features,
        (1, 1),
        self.strides,
        use_bias=False,
        padding=conv_padding(self.padding, 1, self.strides),
      )(out)
    out = Conv(
      self.features,
      (3, 3),
      self.strides,
      use_bias=False,
      padding=conv_padding(self.padding, 3, self.strides),
    )(out)
    out = act(self.norm()(out))
    out = Conv(self.features, (3, 3), use_bias=False, padding=conv_padding(self.padding, 3, 1))(out)
    return out + shortcut


class BasicBlock(nn.Module):
  """ResNet block (He et al. 2015): relu(BN(conv(relu(BN(conv(x))))) + shortcut(x)).

  The shortcut is x, or BN of a strided 1x1 conv of x when the stride or the
  width changes.
  """

  residual = True
  features: int
  strides: int
  norm: Callable[..., Any]
  padding: str = "same"

  @nn.compact
  def __call__(self, x):
    out = Conv(
      self.features,
      (3, 3),
      self.strides,
      use_bias=False,
      padding=conv_padding(self.padding, 3, self.strides),
    )(x)
    out = nn.relu(self.norm()(out))
    out = self.norm()(
      Conv(self.features, (3, 3), use_bias=False, padding=conv_padding(self.padding, 3, 1))(out)
    )
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = self.norm()(
        Conv(
          self.features,
          (1, 1),
          self.strides,
          use_bias=False,
          padding=conv_padding(self.padding, 1, self.strides),
        )(x)
      )
    return nn.relu(out + shortcut)


def _batch_norm(train, axis_name):
  return lambda: nn.BatchNorm(
    use_running_average=not train, momentum=0.9, axis_name=axis_name if train else None
  )


def resnet18_blocks(width):
  """The 8 residual blocks of a CIFAR ResNet-18, as (stage, in channels, out
  channels, stride): four stages of two blocks with `width` times 1, 2, 4, 8
  channels, stride 2 at the start of stages 2-4."""
  blocks, cin = [], width
  for stage in range(4):
    cout = width * 2**stage
    for block in range(2):
      blocks.append((stage, cin, cout, 2 if stage > 0 and block == 0 else 1))
      cin = cout
  return blocks


class PreActResNet18(nn.Module):
  """PreAct ResNet-18 (He et al. 2016), the usual CIFAR form (3x3 stem, no stem pooling).

  Four stages of two pre-activation blocks with `width` (64) times 1, 2, 4,
  8 channels (stride 2 at the start of stages 2-4), final BN-ReLU, global
  average pooling, dense `num_classes`. `padding` (one of `PADDINGS`): "torch" is the layout
  of RobustBench's `PreActResNet` with `PreActBlockV2` and `bn_before_fc`.
  """

  num_classes: int
  mean: Sequence[float]
  std: Sequence[float]
  axis_name: str | None = None
  padding: str = "same"
  width: int = 64

  @nn.compact
  def __call__(self, x, train=False):
    norm = _batch_norm(train, self.axis_name)
    x = Normalize(self.mean, self.std)(x)
    x = Conv(self.width, (3, 3), use_bias=False, padding=conv_padding(self.padding, 3, 1))(x)
    for _, _, features, strides in resnet18_blocks(self.width):
      x = PreActBlock(features, strides, norm, padding=self.padding)(x)
    x = nn.relu(norm()(x))
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


class ResNet18(nn.Module):
  """ResNet-18 (He et al. 2015), the CIFAR form (3x3 stem, no stem pooling).

  Conv 3x3 `width` (64), BN, ReLU; four stages of two `BasicBlock`s with
  `width` times 1, 2, 4, 8 channels (stride 2 at the start of stages 2-4); global average
  pooling; dense `num_classes`. `padding` "torch" is RobustBench's `ResNet18`.
  """

  num_classes: int
  mean: Sequence[float]
  std: Sequence[float]
  axis_name: str | None = None
  padding: str = "same"
  width: int = 64

  @nn.compact
  def __call__(self, x, train=False):
    norm = _batch_norm(train, self.axis_name)
    x = Normalize(self.mean, self.std)(x)
    x = Conv(self.width, (3, 3), use_bias=False, padding=conv_padding(self.padding, 3, 1))(x)
    x = nn.relu(norm()(x))
    for _, _, features, strides in resnet18_blocks(self.width):
      x = BasicBlock(features, strides, norm, padding=self.padding)(x)
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


def _wide_resnet(x, *, depth, width, norm, activation, padding):
  """The body of a WideResNet after its normalisation: stem, blocks, BN-act, mean pool."""
  checks.require(
    (depth - 4) % 6 == 0 and depth >= 10,
    f"WideResNet depth must be 6n + 4 with n >= 1, got {depth}",
  )
  checks.one_of("activation", activation, tuple(ACTIVATIONS))
  blocks = (depth - 4) // 6
  x = Conv(16, (3, 3), use_bias=False, padding=conv_padding(padding, 3, 1))(x)
  for stage, features in enumerate((16, 32, 64)):
    for block in range(blocks):
      strides = 2 if stage > 0 and block == 0 else 1
      x = PreActBlock(features * width, strides, norm, activation, padding)(x)
  x = ACTIVATIONS[activation](norm()(x))
  return jnp.mean(x, axis=(1, 2))


class WideResNet(nn.Module):
  """WideResNet-`depth`-`width` (Zagoruyko & Komodakis 2016) with pre-activation blocks.

  Three stages of (depth - 4) / 6 blocks with 16 `width`, 32 `width` and
  64 `width` channels (stride 2 at the start of stages 2 and 3), final
  BN-ReLU, global average pooling, dense `num_classes`. `padding` "torch" is
  RobustBench's (and TRADES') `WideResNet`.
  """

  num_classes: int
  mean: Sequence[float]
  std: Sequence[float]
  depth: int = 28
  width: int = 10
  axis_name: str | None = None
  padding: str = "same"

  @nn.compact
  def __call__(self, x, train=False):
    x = Normalize(self.mean, self.std)(x)
    x = _wide_resnet(
      x,
      depth=self.depth,
      width=self.width,
      activation="relu",
      norm=_batch_norm(train, self.axis_name),
      padding=self.padding,
    )
    return nn.Dense(self.num_classes)(x)


class DMWideResNet(nn.Module):
  """DeepMind's WideResNet-`depth`-`width` (Gowal et al. 2020, Rebuffi et al. 2021).

  The WideResNet above with `activation` (Swish, x sigmoid(x), by default)
  everywhere and "dm" padding (a stride-2 3x3 conv pads (0, 1), a stride-1
  one (1, 1)). Its PyTorch layout is RobustBench's `DMWideResNet`
  (`init_conv`, `layer`, `logits`). RobustBench's pools with an 8x8 window,
  the whole map of a 32x32 image; this pools the whole map of any size (and
  does not pad the input: `DMWideResNet(padding=0)`, RobustBench's default).
  """

  num_classes: int
  mean: Sequence[float] = CIFAR10_MEAN
  std: Sequence[float] = CIFAR10_STD
  depth: int = 28
  width: int = 10
  activation: str = "swish"
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train=False):
    x = Normalize(self.mean, self.std)(x)
    x = _wide_resnet(
      x,
      depth=self.depth,
      width=self.width,
      activation=self.activation,
      norm=_batch_norm(train, self.axis_name),
      padding="dm",
    )
    return nn.Dense(self.num_classes)(x)


class Randomized(nn.Module):
  """The randomized classifier f~(x) = f(x + d), d ~ N(0, sigma^2 I), of `classifier` f.

  Randomized adversarial training (Araujo et al. 2019) trains f~; Gaussian
  noise training gives the base classifier of randomized smoothing (Cohen et
  al. 2019). A randomized classifier must be evaluated as one, and attacked
  with expectation over the noise (EOT, Athalye et al. 2018), or its
  randomness passes for robustness. Calls:

  * `apply(v, x)` (`noise=None`): log of the mean softmax of f over `samples`
    draws d_1..d_S, the same for every call and every example (drawn from
    `jax.random.key(seed)`), so that `lambda x: apply(v, x)` is a pure
    function: its argmax is the prediction from S draws, and an attack that
    differentiates it (through the noise) is EOT over those S draws. The
    draws are fixed for the model, not redrawn per call: the evaluated
    classifier is exactly the function the attack sees.
  * `apply(v, x, noise=d)` with d of shape [S, B or 1, ...]: the same with
    the draws d (e.g. fresh draws for the attack inside a training step).
  * `apply(v, x, train=True, noise=d)` with d of x's shape: f(x + d), one draw
    per example (training; `training.make_train_step` draws d per example
    from the run's key).
  * `apply(v, x, method="base")`: the base classifier f, without noise.

  The outputs are log-probabilities, valid logits for any attack loss (the
  cross-entropy of the mean softmax is the EOT loss). `smoothing.predict` and
  `smoothing.certify` take the base classifier (`method="base"`).

  Variables live under "classifier" (e.g. params["classifier"]["Conv_0"]).
  """

  classifier: nn.Module
  sigma: float
  samples: int = 8
  seed: int = 0

  def fixed_noise(self, shape, dtype=jnp.float32):
    """The `samples` fixed draws for one example of `shape`: [S, 1, *shape]."""
    z = jax.random.normal(jax.random.key(self.seed), (self.samples, 1, *shape), dtype)
    return self.sigma * z

  def __call__(self, x, train=False, noise=None):
    if noise is None:
      checks.require(
        not train,
        "Randomized in training mode needs noise=d, one draw per example of the input's shape",
      )
      noise = self.fixed_noise(x.shape[1:], x.dtype)
    if noise.shape == x.shape:
      return self.classifier(x + noise, train=train)
    checks.require(
      noise.ndim == x.ndim + 1,
      f"noise must have the input's shape {x.shape} or [draws, batch or 1, ...], got {noise.shape}",
    )
    draws = noise.shape[0]
    noisy = (x[None] + noise).reshape(-1, *x.shape[1:])
    logits = self.classifier(noisy, train=train).reshape(draws, x.shape[0], -1)
    return jax.nn.logsumexp(jax.nn.log_softmax(logits), axis=0) - jnp.log(draws)

  def base(self, x, train=False):
    return self.classifier(x, train=train)


def is_randomized(model):
  return isinstance(model, Randomized)


@functools.cache
def inference_fn(model, base=False):
  """`(variables, x) -> logits` of `model` in inference mode (the base
  classifier f of a randomized model if `base`). One function object per
  model (models compare by value), so evaluations reuse compiled programs."""
  method = "base" if base and is_randomized(model) else None
  return lambda variables, x: model.apply(variables, x, train=False, method=method)


@functools.cache
def stochastic_fn(model):
  """`(variables, x, key) -> logits` of a randomized model with one fresh
  noise draw per call (for attacks with EOT); None for a deterministic model."""
  if not is_randomized(model):
    return None

  def logits(variables, x, key):
    noise = model.sigma * jax.random.normal(key, (1, *x.shape), x.dtype)
    return model.apply(variables, x, train=False, noise=noise)

  return logits


MODELS = {
  "small_cnn": SmallCNN,
  "seed_cnn": SeedCNN,
  "preact_resnet18": PreActResNet18,
  "wide_resnet": WideResNet,
  "resnet18": ResNet18,
  "dm_wide_resnet": DMWideResNet,
}


def spectral_settings(settings):
  """Validated `SpectralSettings` from a dict (None when empty: no normalisation)."""
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


def noise_settings(settings):
  """Validated {sigma, samples, seed} from a dict (None when empty: no noise)."""
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


def create(name, *, num_classes, mean, std, axis_name=None, spectral=None, noise=None, **kwargs):
  """Builds model `name` (one of `MODELS`) with its hyper-parameters `kwargs`.

  `spectral` (a dict of `SpectralSettings`, SmallCNN and SeedCNN) normalises
  every Conv and Dense layer; `noise` (a dict with `sigma` > 0, `samples` >= 1,
  `seed`) wraps the model in `Randomized`. Empty or None: off.
  """
  checks.one_of("model", name, tuple(MODELS))
  cls = MODELS[name]
  spectral = spectral_settings(spectral)
  if spectral is not None:
    checks.require(
      "spectral" in cls.__dataclass_fields__,
      f"model {name!r} has no spectral normalisation; use small_cnn or seed_cnn",
    )
    kwargs["spectral"] = spectral
  checks.known_keys(
    f"model {name!r}",
    kwargs,
    set(cls.__dataclass_fields__) - {"num_classes", "mean", "std", "axis_name", "parent", "name"},
  )
  if "padding" in kwargs:
    checks.one_of(f"model {name!r} padding", kwargs["padding"], PADDINGS)
  if "activation" in kwargs:
    checks.one_of(f"model {name!r} activation", kwargs["activation"], tuple(ACTIVATIONS))
  model = cls(
    num_classes=num_classes, mean=tuple(mean), std=tuple(std), axis_name=axis_name, **kwargs
  )
  noise = noise_settings(noise)
  return model if noise is None else Randomized(model, **noise)
