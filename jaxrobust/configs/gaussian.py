"""Gaussian noise training: the base classifier of randomized smoothing (Cohen et al. 2019).

Trains f on x + d, d ~ N(0, sigma^2 I), one fresh draw per example and step.
The model is the randomized classifier f~(x) = f(x + d): it is evaluated by
the mean softmax over `model.noise.samples` fixed draws and attacked through
them (EOT); `jaxrobust.certification.smoothing` certifies its base classifier.
Command: python train.py --config gaussian --workdir runs/gaussian
CIFAR-10 setting (seed_cnn): --config gaussian:cifar10
"""

import ml_collections

from jaxrobust.configs import common


def get_config(setting: str = "digits") -> ml_collections.ConfigDict:
  c = common.setting(setting)
  c.objective = "gaussian"
  c.model.noise = dict(sigma=0.25, samples=8, seed=0)
  return c
