"""PGD adversarial training (Madry et al. 2018) of the small CNN on digits.

Training inputs: PGD-7 L-infinity, eps 0.2 (8/255 in the cifar10 setting),
step 2.5 eps / 7, random start.
Command: python train.py --config pgd_at --workdir runs/pgd_at
CIFAR-10 setting (seed_cnn): --config pgd_at:cifar10
"""

import ml_collections

from jaxrobust.configs import common


def get_config(setting: str = "digits") -> ml_collections.ConfigDict:
  c = common.setting(setting)
  c.objective = "adversarial"
  c.train_attack = dict(name="pgd", norm="linf", eps=0.2, step_size=0.05, steps=7)
  if setting != "digits":
    c.train_attack = common.pgd("linf", setting)
  return c
