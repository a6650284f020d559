"""Natural (non-adversarial) training: the small CNN on digits, or the seed's setting.

Command: python train.py --config natural --workdir runs/natural
Seed setting (seed_cnn, CIFAR-10): --config natural:cifar10
"""

import ml_collections

from jaxrobust.configs import common


def get_config(setting: str = "digits") -> ml_collections.ConfigDict:
  return common.setting(setting)
