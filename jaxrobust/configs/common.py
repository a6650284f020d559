"""Settings shared by the configs: the small CNN on scikit-learn's digits."""

import os
from typing import Any
from pathlib import Path

import ml_collections

# The cifar10 setting: seed_cnn on CIFAR-10, L-inf eps 8/255, L2 eps 0.5. The
# JPEG copy of CIFAR-10 lies in $JAXROBUST_DATA/cifar10, by default
# `../shared/data` beside a clone of the repository.
REPO = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("JAXROBUST_DATA", REPO / ".." / "shared" / "data"))
CIFAR10_JPEG = str((DATA / "cifar10").resolve() / "cifar10-{split}-jpeg.tar.gz")
# The imagenet setting: $JAXROBUST_DATA/imagenet in the ILSVRC layout
# (train/<wnid>/*.JPEG, val/<wnid>/*.JPEG) or its records conversion.
IMAGENET = str((DATA / "imagenet").resolve())
SETTINGS = ("digits", "cifar10", "cifar10_tfds", "imagenet")
# Attack radii per setting, (L-infinity, L2), and M-DI2-FGSM's smallest shrink
# factor (on 8x8 digits 0.9 would shrink by less than a pixel). ImageNet:
# RobustBench's L-infinity 4/255, and the L2 radius 3 of Engstrom et al.'s
# robustness library.
EPS = {
  "digits": (0.2, 1.0),
  "cifar10": (8 / 255, 0.5),
  "cifar10_tfds": (8 / 255, 0.5),
  "imagenet": (4 / 255, 3.0),
}
RESIZE_RATE = {"digits": 0.75, "cifar10": 0.9, "cifar10_tfds": 0.9, "imagenet": 0.9}
# AutoAttack's standard version, its settings spelled out so they can be
# overridden (--config.eval.attacks.autoattack_linf.queries=1000).
AUTOATTACK = dict(version="standard", steps=100, queries=5000, num_targets=9)


def base() -> ml_collections.ConfigDict:
  """The default run: small CNN, digits, SGD with cosine decay, PGD evaluation."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Training augmentation (`jaxrobust.training.augment`): "none" on digits (a flipped
  # digit is another digit); random crop (4 pixels of zero padding) and flip on
  # CIFAR-10.
  c.data = dict(
    name="digits",
    data_dir="",
    augment="none",
    crop_padding=4,
    padding_mode="zero",
    extra="",  # a second data set to draw `extra_fraction` of every batch from
    extra_fraction=0.0,
    workers=0,  # grain worker processes that read (and decode) records: shards
  )
  c.model = dict(name="small_cnn", width=16)
  c.objective = "natural"
  c.batch_size = 64
  c.epochs = 20
  # Exponential moving average of the parameters, evaluated instead of them
  # (0: off; 0.995 is typical).
  c.ema = 0.0
  # Adversarial weight perturbation (Wu et al. 2020): its gamma, 0 = off; 5e-3
  # on top of pgd_at or trades (--config.awp=5e-3), from epoch awp_warmup on
  # (the epochs before it train without; AWP's public TRADES scripts use 10).
  c.awp = 0.0
  c.awp_warmup = 0
  # The model's compute dtype (`jaxrobust.models.precision`): "bfloat16" runs its
  # forward and backward passes in bfloat16; what is stored stays float32.
  c.precision = "float32"
  c.optimizer = dict(
    name="sgd",
    learning_rate=0.05,
    momentum=0.9,
    nesterov=True,
    weight_decay=5e-4,
    schedule="cosine",
    warmup_steps=50,
  )
  c.log_every_steps = 10
  c.checkpoint_every_steps = 200
  c.keep_checkpoints = 3
  # eval.py runs `default` unless --attacks names others (or "all"): AutoAttack
  # in the training threat model (L-infinity), PGD in the other. train.py ends
  # with the quicker `after_training`.
  c.eval = dict(
    batch_size=500,
    limit=0,
    default="autoattack_linf,pgd_l2",
    after_training="pgd_linf,pgd_l2",
    # The best checkpoint (Rice et al. 2020): PGD-10 accuracy on the
    # last `validation_examples` training images (held out) every
    # `every_epochs` epochs; 0: off.
    every_epochs=0,
    validation_examples=0,
    attacks=eval_attacks(*EPS["digits"], RESIZE_RATE["digits"]),
  )
  return c


def eval_attacks(linf: float, l2: float, resize_rate: float) -> dict[str, dict[str, Any]]:
  """The evaluation's attacks at radii `linf` (L-infinity) and `l2`, by label:
  AutoAttack standard in both norms, PGD-20 in both norms (step eps / 4, one
  random start), C&W-L2 counted within the L2 ball of radius `l2` (100 Adam
  steps for each of 5 values of c), MI-FGSM and M-DI2-FGSM (10 steps of
  eps / 10, decay 1; DI shrinks by a factor in [resize_rate, 1)), and APGD
  with the cross-entropy and the DLR loss (100 iterations)."""
  return dict(
    autoattack_linf=dict(name="autoattack", norm="linf", eps=linf, **AUTOATTACK),
    autoattack_l2=dict(name="autoattack", norm="l2", eps=l2, **AUTOATTACK),
    pgd_l2=dict(name="pgd", norm="l2", eps=l2, step_size=l2 / 4, steps=20),
    pgd_linf=dict(name="pgd", norm="linf", eps=linf, step_size=linf / 4, steps=20),
    cw_l2=dict(name="cw_l2", steps=100, binary_search_steps=5, c=0.1, lr=0.01, eps=l2),
    mi_fgsm=dict(name="mi_fgsm", norm="linf", eps=linf, steps=10, decay=1.0),
    di_fgsm=dict(
      name="di_fgsm", norm="linf", eps=linf, steps=10, decay=1.0, prob=0.5, resize_rate=resize_rate
    ),
    apgd_ce=dict(name="apgd", norm="linf", eps=linf, steps=100, loss="ce"),
    apgd_dlr=dict(name="apgd", norm="linf", eps=linf, steps=100, loss="dlr"),
  )


def setting(name: str) -> ml_collections.ConfigDict:
  """The base config of a setting.

  "digits" (default), or "cifar10" (CIFAR-10, JPEG copy, as `folder:`) and
  "cifar10_tfds" (the original through tensorflow-datasets), both with
  `seed_cnn`, Adam and eps 8/255 L-inf, 0.5 L2 in the evaluation's attacks;
  "imagenet" (see `imagenet`).

  Config files take it as their argument: `--config rat:cifar10`.
  """
  if name not in SETTINGS:
    raise ValueError(f"unknown setting {name!r}; choose one of {', '.join(SETTINGS)}")
  c = base()
  if name == "digits":
    return c
  if name == "imagenet":
    return imagenet(c)
  c.data = dict(
    name="tfds:cifar10" if name == "cifar10_tfds" else f"folder:{CIFAR10_JPEG}",
    data_dir="",
    augment="crop_flip",
    crop_padding=4,
    padding_mode="zero",
    extra="",
    extra_fraction=0.0,
    workers=0,
  )
  c.model = dict(name="seed_cnn")
  c.batch_size = 128
  c.epochs = 10
  c.optimizer = dict(
    name="adam", learning_rate=1e-3, schedule="cosine", warmup_steps=100, weight_decay=0.0
  )
  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  c.eval.attacks = eval_attacks(*EPS[name], RESIZE_RATE[name])
  return c


def imagenet(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The imagenet setting on top of the base config `c`.

  `imagenet:$JAXROBUST_DATA/imagenet` (`IMAGENET`), decoded in 8 grain
  workers: random-resized-crop (scale 0.08-1, ratio 3/4-4/3) and flip at
  `data.image_size` (224) for training, resize 256 and center crop 224 for
  evaluation, both on the host (`data.augment` "none": nothing more on the
  device). torchvision's ResNet-50 (`resnet50`, ImageNet stem), normalised
  with ImageNet's statistics. SGD 0.1, momentum 0.9, weight decay 1e-4,
  batch 256, 90 epochs, x0.1 at epochs 30 and 60 (the ResNet-50 recipe of
  He et al. 2016 and torchvision's reference scripts). Evaluation at L-inf eps 4/255 (RobustBench's ImageNet
  threat model): AutoAttack by default, PGD-20 after training.
  """
  c.data = dict(
    name=f"imagenet:{IMAGENET}",
    data_dir="",
    image_size=224,
    augment="none",
    crop_padding=4,
    padding_mode="zero",
    extra="",
    extra_fraction=0.0,
    workers=8,
  )
  c.model = dict(name="resnet50", stem="imagenet", width=64)
  c.batch_size = 256
  c.epochs = 90
  c.optimizer = dict(
    name="sgd",
    learning_rate=0.1,
    momentum=0.9,
    nesterov=False,
    weight_decay=1e-4,
    schedule="piecewise",
    decay_at=[1 / 3, 2 / 3],
    decay_factor=0.1,
  )
  c.log_every_steps = 100
  c.checkpoint_every_steps = 1000
  c.eval.batch_size = 100
  c.eval.default = "autoattack_linf"
  c.eval.after_training = "pgd_linf"
  c.eval.attacks = eval_attacks(*EPS["imagenet"], RESIZE_RATE["imagenet"])
  return c


def pgd(norm: str, setting_name: str, steps: int = 7) -> dict[str, Any]:
  """The PGD training attack of a setting: `steps` steps of 2.5 eps / steps."""
  linf, l2 = EPS[setting_name]
  return dict(name="pgd", norm=norm, eps=linf if norm == "linf" else l2, steps=steps)
