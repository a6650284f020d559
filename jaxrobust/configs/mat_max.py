"""MAT-Max: mixed adversarial training over p in {2, inf} (Araujo et al. 2019).

Per example, the worse (`attacks.worst_case`: misclassified first, else the
higher loss) of the PGD-7 L2 and PGD-7 L-infinity examples.
Command: python train.py --config mat_max --workdir runs/mat_max
Seed setting (seed_cnn, CIFAR-10): --config mat_max:cifar10
"""
from jaxrobust.configs import common


def get_config(setting="digits"):
  c = common.setting(setting)
  c.objective = "mat_max"
  c.train_attack = dict(name="worst_case", attacks=[
      common.pgd("l2", setting), common.pgd("linf", setting)])
  return c
