"""PGD adversarial training (Madry et al. 2018) of the small CNN on digits.

Training inputs: PGD-7 L-infinity, eps 0.2 (8/255 in the cifar10 setting),
step 2.5 eps / 7, random start.
Command: python train.py --config pgd_at --workdir runs/pgd_at
CIFAR-10 setting (seed_cnn): --config pgd_at:cifar10
ImageNet setting (`common.imagenet`: torchvision's ResNet-50 on
$JAXROBUST_DATA/imagenet, random-resized-crop and flip at 224): --config
pgd_at:imagenet, PGD-3 L-infinity at eps 4/255 with step 2 eps / 3 and a
random start, the ImageNet adversarial training of Salman et al. 2020
(https://arxiv.org/abs/2007.08489), whose ResNet-50 RobustBench lists at
64.02 % clean, 34.96 % AutoAttack (Salman2020Do_R50). It needs the data and
a GPU (not run here; tests/test_imagenet_runs.py runs the setting with a small
CNN on a generated folder):
  python train.py --config pgd_at:imagenet --workdir runs/imagenet_pgd_at
  python eval.py --workdir runs/imagenet_pgd_at
"""

import ml_collections

from jaxrobust.configs import common

IMAGENET_PGD = dict(name="pgd", norm="linf", eps=4 / 255, step_size=2 / 3 * 4 / 255, steps=3)


def get_config(setting: str = "digits") -> ml_collections.ConfigDict:
  c = common.setting(setting)
  c.objective = "adversarial"
  c.train_attack = dict(name="pgd", norm="linf", eps=0.2, step_size=0.05, steps=7)
  if setting == "imagenet":
    c.train_attack = dict(IMAGENET_PGD)
  elif setting != "digits":
    c.train_attack = common.pgd("linf", setting)
  return c
