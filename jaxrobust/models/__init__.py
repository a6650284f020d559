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

`inference_fn(model)` and `stochastic_fn(model)` (`apply_fns`) are the
model's `(variables, x) -> logits` functions; equal models give equal
functions, so the programs compiled for one serve the other.

Modules: `blocks` (normalisation, padding, residual blocks), `cnn`,
`resnet`, `resnet50`, `wide_resnet`, `zoo_nets` (single zoo entries' networks), `randomized`, `registry` (`MODELS`, `create`),
`apply_fns`, `inference` (any Flax model as the functions jaxrobust calls),
`layers` (layer primitives XLA:CPU runs fast), `precision` (a model
computing in bfloat16 with float32 variables).
"""

from jaxrobust.models import layers, precision
from jaxrobust.models.blocks import (
  ACTIVATIONS,
  PADDINGS,
  SHORTCUTS,
  PARAMETRIC_ACTIVATIONS,
  BasicBlock,
  Conv,
  MeanSparse,
  Normalize,
  PreActBlock,
  PSSiLU,
  SqueezeExcitation,
  batch_norm,
  conv_padding,
  padding_pair,
  standardize_per_image,
)
from jaxrobust.models.cnn import SeedCNN, SmallCNN, SpectralSettings
from jaxrobust.models.apply_fns import InferenceFn, StochasticFn, inference_fn, stochastic_fn
from jaxrobust.models.randomized import Randomized, is_randomized
from jaxrobust.models.registry import MODELS, create, noise_settings, spectral_settings
from jaxrobust.models.resnet import DMPreActResNet18, PreActResNet18, ResNet18, resnet18_blocks
from jaxrobust.models.resnet50 import STEMS, Bottleneck, ResNet50, bottleneck_blocks
from jaxrobust.models.wide_resnet import (
  CIFAR10_MEAN,
  CIFAR10_STD,
  DMWideResNet,
  RobustWideResNet,
  WideResNet,
)
from jaxrobust.models.zoo_nets import (
  PreActBottleneck,
  PreActResNet50Branch,
  PreActResNet50Ensemble,
  RaWideResNet,
  RobustResNet,
)

__all__ = [
  "RobustResNet",
  "RaWideResNet",
  "PreActResNet50Ensemble",
  "PreActResNet50Branch",
  "PreActBottleneck",
  "standardize_per_image",
  "SqueezeExcitation",
  "PSSiLU",
  "MeanSparse",
  "PARAMETRIC_ACTIVATIONS",
  "ACTIVATIONS",
  "CIFAR10_MEAN",
  "CIFAR10_STD",
  "MODELS",
  "PADDINGS",
  "SHORTCUTS",
  "STEMS",
  "BasicBlock",
  "Bottleneck",
  "DMPreActResNet18",
  "Conv",
  "DMWideResNet",
  "InferenceFn",
  "Normalize",
  "PreActBlock",
  "PreActResNet18",
  "Randomized",
  "ResNet18",
  "ResNet50",
  "RobustWideResNet",
  "SeedCNN",
  "SmallCNN",
  "SpectralSettings",
  "StochasticFn",
  "WideResNet",
  "batch_norm",
  "bottleneck_blocks",
  "conv_padding",
  "create",
  "inference_fn",
  "is_randomized",
  "layers",
  "precision",
  "noise_settings",
  "padding_pair",
  "resnet18_blocks",
  "spectral_settings",
  "stochastic_fn",
]
