"""The "C&W model": adversarial training on a 50/50 mixture of C&W-L2
and PGD L-infinity examples in every batch (`attacks.mixture`).

C&W-L2 (Carlini & Wagner 2017), shortened for training: one binary-search
step with c = 1, 20 Adam steps at the paper's constant learning rate (a
decaying rate reaches less far in 20 steps); PGD-7 L-infinity as in
configs/pgd_at.py.
Command: python train.py --config cw_pgd_mix --workdir runs/cw_pgd_mix
CIFAR-10 setting (seed_cnn): --config cw_pgd_mix:cifar10
"""

import ml_collections

from jaxrobust.configs import pgd_at


def get_config(setting: str = "digits") -> ml_collections.ConfigDict:
  c = pgd_at.get_config(setting)
  c.objective = "cw_pgd_mix"
  cw = dict(
    name="cw_l2",
    steps=20,
    binary_search_steps=1,
    c=1.0,
    lr=0.01,
    schedule="constant",
    overshoot=0.0,
  )
  c.train_attack = dict(name="mixture", attacks=[cw, dict(c.train_attack)], weights=[0.5, 0.5])
  return c
