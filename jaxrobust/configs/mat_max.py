"""MAT-Max: mixed adversarial training over p in {2, inf} (Araujo et al. 2019).

Per example, the larger-loss (`attacks.max_loss`: the higher cross-entropy of
the model, misclassified or not) of the PGD-7 L2 and PGD-7 L-infinity
examples: the inner maximum over p in {2, inf} of Araujo et al.
Command: python train.py --config mat_max --workdir runs/mat_max
CIFAR-10 setting (seed_cnn): --config mat_max:cifar10
Result (digits, the defaults, with max_loss; 2 shared CPU cores, 405 s with the
evaluation; train.py's printed table, 300 test examples):
  clean 97.67 %, pgd_linf (PGD-20, eps 0.2) 46.67 %, pgd_l2 (PGD-20, eps 1) 34.33 %
"""

import ml_collections

from jaxrobust.configs import common


def get_config(setting: str = "digits") -> ml_collections.ConfigDict:
  c = common.setting(setting)
  c.objective = "mat_max"
  c.train_attack = dict(
    name="max_loss", attacks=[common.pgd("l2", setting), common.pgd("linf", setting)]
  )
  return c
