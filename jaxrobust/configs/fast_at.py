"""Fast adversarial training (Wong et al. 2020, "Fast is better than free").

FGSM with a random start (uniform in the ball) and step 1.25 eps, a cyclic
learning rate (0 -> peak at 2/5 of training -> 0; SGD, peak 0.2 as in the
paper's CIFAR-10 runs), and the guard against catastrophic overfitting: after
every epoch, PGD-5 accuracy on the first 256 training images; when it falls by
more than 0.2 from the previous epoch, training stops and keeps the last good
checkpoint (`jaxrobust.training.guard`). eps 0.2 on digits, 8/255 in the cifar10
setting.
Command: python train.py --config fast_at --workdir runs/fast_at
CIFAR-10 setting (seed_cnn): --config fast_at:cifar10
Result (digits, the defaults above, 2 shared CPU cores, 177 s with the evaluation;
train.py's printed table, 300 test examples):
  clean 97.67 %, pgd_linf (PGD-20, eps 0.2) 58.33 %, pgd_l2 (PGD-20, eps 1) 24.00 %;
  the guard's PGD-5 accuracy rose from 4 % (epoch 1) to 75 % (epoch 20) and
  never fired.
"""

import ml_collections

from jaxrobust.configs import common


def get_config(setting: str = "digits") -> ml_collections.ConfigDict:
  c = common.setting(setting)
  c.objective = "fast_at"
  eps = common.EPS[setting][0]
  c.train_attack = dict(name="fgsm", norm="linf", eps=eps, random_start=True, step_size=1.25 * eps)
  c.optimizer = dict(
    name="sgd",
    learning_rate=0.2,
    momentum=0.9,
    nesterov=False,
    weight_decay=5e-4,
    schedule="cyclic",
    peak_at=0.4,
  )
  c.overfit_guard = dict(examples=256, steps=5, max_drop=0.2)
  return c
