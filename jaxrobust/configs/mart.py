"""MART (Wang et al. 2020) of the small CNN on digits.

Loss BCE(f(x'), y) + lambda * KL(f(x) || f(x')) * (1 - p_y(x)), with the
boosted cross-entropy BCE(p', y) = -log p'_y - log(1 - max_{k != y} p'_k),
x' by PGD-10 L-infinity on the cross-entropy from x + 0.001 N(0, I), step
eps / 4 (2/255 for 8/255 in the paper); eps 0.2 on digits. lambda = 6, the
default of the authors' released code (`--beta 6.0`); the issue that asked
for MART notes 5 for the paper's CIFAR-10 setting: set
--config.objective_settings.lam=5 to follow that. `objectives.mart_loss`.
Command: python train.py --config mart --workdir runs/mart
CIFAR-10 setting (seed_cnn): --config mart:cifar10
Result (digits, the defaults above, 2 shared CPU cores, 298 s with the evaluation):
  clean 10.00 %, pgd_linf 10.00 %, pgd_l2 10.00 %: with these defaults (SGD 0.05,
  eps 0.2) MART did not leave the uniform prediction on digits (training loss
  stuck at ln 10 - ln 0.9 = 2.408 from the first steps), also with learning
  rate 0.01 (clean 11.33 %). Trained at half the radius, it learns:
  python train.py --config mart --workdir runs/mart_eps01 \
    --config.train_attack.eps=0.1 --config.train_attack.step_size=0.025
  clean 99.00 %, pgd_linf (eps 0.2) 35.67 %, pgd_l2 (eps 1) 8.67 %.
"""

import ml_collections

from jaxrobust.configs import common


def get_config(setting: str = "digits") -> ml_collections.ConfigDict:
  c = common.setting(setting)
  c.objective = "mart"
  eps = common.EPS[setting][0]
  c.train_attack = dict(
    name="pgd", norm="linf", eps=eps, step_size=eps / 4, steps=10, random_start=0.001
  )
  c.objective_settings = dict(lam=6.0)
  return c
