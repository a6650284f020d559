"""Natural (non-adversarial) training: the small CNN on digits, or the seed's setting.

Command: python train.py --config configs/natural.py --workdir runs/natural
Seed setting (seed_cnn, CIFAR-10): --config configs/natural.py:cifar10
"""
from configs import common


def get_config(setting="digits"):
  return common.setting(setting)
