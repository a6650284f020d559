"""Literature recipes for a GPU (documented, not run on this project's CPUs).

Each is a setting of this file, on CIFAR-10 (the JPEG copy; `tfds:cifar10`
with --config.data.name) with random crop and flip, L-infinity eps 8/255:

  preact_pgd_at  PreAct ResNet-18, PGD-10 AT (step 2/255), SGD 0.1 momentum 0.9,
                 weight decay 5e-4, batch 128, 200 epochs, learning rate x0.1 at
                 epochs 100 and 150, best checkpoint by PGD-10 on 1,000 held-out
                 training images every epoch (Rice et al. 2020). Target: 82.9 %
                 clean, 53.5 % PGD-10 (best checkpoint), about 48.7 % AutoAttack.
    python train.py --config gpu_recipes:preact_pgd_at --workdir runs/preact_pgd_at
  wrn_trades     WideResNet-34-10, TRADES beta 6 (PGD-10 on the KL, step 0.007),
                 SGD 0.1, weight decay 2e-4, batch 128, 76 epochs, x0.1 at epoch
                 75 (Zhang et al. 2019). Target: 84.9 % clean, 56.6 % PGD-20,
                 53.1 % AutoAttack.
    python train.py --config gpu_recipes:wrn_trades --workdir runs/wrn_trades
  preact_fast_at PreAct ResNet-18, Fast-AT: FGSM-RS step 10/255, cyclic learning
                 rate to 0.2, 15 epochs, the overfitting guard (Wong et al. 2020).
                 Target: 86.1 % clean, 46.1 % PGD-50 in 12 minutes on one GPU.
    python train.py --config gpu_recipes:preact_fast_at --workdir runs/preact_fast_at

And on ImageNet (the imagenet setting: `$JAXROBUST_DATA/imagenet`, L-infinity eps 4/255):

  imagenet_fast_at  torchvision's ResNet-50, Fast-AT: FGSM with a random start
                 (uniform in the ball), eps 4/255, step 5/255; SGD momentum 0.9,
                 weight decay 1e-4, 15 epochs, the learning rate rising
                 linearly from 0 to 0.4 over the first epoch and falling
                 linearly after (Wong et al. 2020's ImageNet code,
                 github.com/locuslab/fast_adversarial). Their schedule falls
                 piecewise-linearly through 0.04 at epoch 6, 0.004 at 12 and
                 0.0004 at 15 and resizes progressively (128-pixel crops at
                 batch 512 for epochs 0-6, 224 at batch 224 for 6-12, 288 at
                 batch 128 for 12-15); this config falls linearly to 0 (the
                 "cyclic" schedule) and trains at one size, 224 (or
                 --config.data.image_size), batch 256. Target: RobustBench's
                 Wong2020Fast (their 4/255 model, evaluated on 288-pixel
                 crops), 55.62 % clean, 26.24 % AutoAttack; their README
                 reports the recipe at eps 2/255 at 60.90 % clean, 43.46 %
                 PGD (their evaluation: 50 steps, 10 restarts).
    python train.py --config gpu_recipes:imagenet_fast_at --workdir runs/imagenet_fast_at

Then `python eval.py --workdir runs/<name>` (AutoAttack standard and PGD-20 L2
by default; the best checkpoint when one was kept). Result: not run here.
"""

import ml_collections

from jaxrobust.configs import common, fast_at, trades

RECIPES = ("preact_pgd_at", "wrn_trades", "preact_fast_at", "imagenet_fast_at")


def get_config(recipe: str = "preact_pgd_at") -> ml_collections.ConfigDict:
  if recipe not in RECIPES:
    raise ValueError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
  eps = 8 / 255
  if recipe == "imagenet_fast_at":
    return _imagenet_fast_at()
  if recipe == "preact_fast_at":
    c = fast_at.get_config("cifar10")
    c.model = dict(name="preact_resnet18")
    c.epochs = 15
    c.optimizer.learning_rate = 0.2
    return c
  if recipe == "wrn_trades":
    c = trades.get_config("cifar10")
    c.model = dict(name="wide_resnet", depth=34, width=10)
    c.train_attack.step_size = 0.007
    c.epochs = 76
    c.optimizer = dict(
      name="sgd",
      learning_rate=0.1,
      momentum=0.9,
      nesterov=False,
      weight_decay=2e-4,
      schedule="piecewise",
      decay_at=[75 / 76],
      decay_factor=0.1,
    )
    return c
  c = common.setting("cifar10")
  c.objective = "pgd_at"
  c.model = dict(name="preact_resnet18")
  c.train_attack = dict(name="pgd", norm="linf", eps=eps, step_size=2 / 255, steps=10)
  c.epochs = 200
  c.optimizer = dict(
    name="sgd",
    learning_rate=0.1,
    momentum=0.9,
    nesterov=False,
    weight_decay=5e-4,
    schedule="piecewise",
    decay_at=[0.5, 0.75],
    decay_factor=0.1,
  )
  c.eval.every_epochs = 1
  c.eval.validation_examples = 1000
  return c


def _imagenet_fast_at() -> ml_collections.ConfigDict:
  """Wong et al. 2020's ImageNet Fast-AT at eps 4/255 (see the module's docstring)."""
  c = fast_at.get_config("imagenet")
  c.train_attack = dict(name="fgsm", norm="linf", eps=4 / 255, random_start=True, step_size=5 / 255)
  c.epochs = 15
  c.optimizer = dict(
    name="sgd",
    learning_rate=0.4,
    momentum=0.9,
    nesterov=False,
    weight_decay=1e-4,
    schedule="cyclic",
    peak_at=1 / 15,
  )
  del c.overfit_guard  # their ImageNet runs have no guard
  return c
