"""PGD adversarial training (Madry et al. 2018) of the small CNN on digits.

Training inputs: PGD-7 L-infinity, eps 0.2, step 0.05, random start.
Command: python train.py --config configs/pgd_at.py --workdir runs/pgd_at
"""
from configs import common


def get_config():
  c = common.base()
  c.objective = "adversarial"
  c.train_attack = dict(name="pgd", norm="linf", eps=0.2, step_size=0.05, steps=7)
  return c
