"""MAT-Rand: mixed adversarial training over p in {2, inf} (Araujo et al. 2019).

Each step draws one of PGD-7 L2 and PGD-7 L-infinity uniformly
(`attacks.random_choice`) and trains on its examples.
Command: python train.py --config mat_rand --workdir runs/mat_rand
CIFAR-10 setting (seed_cnn): --config mat_rand:cifar10
"""

import ml_collections

from jaxrobust.configs import common


def get_config(setting: str = "digits") -> ml_collections.ConfigDict:
  c = common.setting(setting)
  c.objective = "mat_rand"
  c.train_attack = dict(
    name="random_choice", attacks=[common.pgd("l2", setting), common.pgd("linf", setting)]
  )
  return c
