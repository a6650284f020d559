"""TRADES (Zhang et al. 2019) of the small CNN on digits.

Loss CE(f(x), y) + beta * KL(f(x) || f(x')), beta = 6 (the paper's CIFAR-10
setting), x' maximising the KL divergence by PGD-10 L-infinity from
x + 0.001 N(0, I), step eps / 4 (0.007 for eps 8/255 in the paper); eps 0.2
on digits, 8/255 in the cifar10 setting. `objectives.trades_loss`.
Command: python train.py --config trades --workdir runs/trades
CIFAR-10 setting (seed_cnn): --config trades:cifar10
Result (digits, the defaults above, 2 shared CPU cores, 272 s with the evaluation;
train.py's printed table, 300 test examples):
  clean 97.67 %, pgd_linf (PGD-20, eps 0.2) 64.67 %, pgd_l2 (PGD-20, eps 1) 24.00 %
"""

import ml_collections

from jaxrobust.configs import common


def get_config(setting: str = "digits") -> ml_collections.ConfigDict:
  c = common.setting(setting)
  c.objective = "trades"
  eps = common.EPS[setting][0]
  c.train_attack = dict(
    name="pgd", norm="linf", eps=eps, step_size=eps / 4, steps=10, random_start=0.001
  )
  c.objective_settings = dict(beta=6.0)
  return c
