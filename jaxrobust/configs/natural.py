"""Natural (non-adversarial) training: the small CNN on digits, or the cifar10 setting.

Command: python train.py --config natural --workdir runs/natural
CIFAR-10 setting (seed_cnn): --config natural:cifar10
"""

import ml_collections

from jaxrobust.configs import common


def get_config(setting: str = "digits") -> ml_collections.ConfigDict:
  return common.setting(setting)
