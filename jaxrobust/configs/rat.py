"""Randomized adversarial training (Araujo et al. 2019).

Adversarial training of the randomized network f~(x) = f(x + d),
d ~ N(0, sigma^2 I): each step's PGD-7 L-infinity attack takes its gradients
through the noise, averaged over `train_attack.eot_samples` fresh draws
(expectation over transformation), and f is trained on x_adv + d. The attack
maximises the loss of the mean prediction, -log mean_s softmax(f(x' + d_s))_y,
not the mean of the losses: that is the classifier f~ predicts with and is
evaluated on (see `jaxrobust.training.objectives`).
Evaluation: the mean softmax over `model.noise.samples` fixed draws, attacked
through them (EOT).
Command: python train.py --config rat --workdir runs/rat
CIFAR-10 setting (seed_cnn): --config rat:cifar10
"""

import ml_collections

from jaxrobust.configs import pgd_at


def get_config(setting: str = "digits") -> ml_collections.ConfigDict:
  c = pgd_at.get_config(setting)
  c.objective = "rat"
  c.model.noise = dict(sigma=0.25 if setting == "digits" else 0.1, samples=8, seed=0)
  c.train_attack.eot_samples = 4
  return c
