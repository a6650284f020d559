"""Natural (non-adversarial) training of the small CNN on digits.

Command: python train.py --config configs/natural.py --workdir runs/natural
"""
from configs import common


def get_config():
  return common.base()
