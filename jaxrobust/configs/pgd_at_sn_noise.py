"""PGD adversarial training with Gaussian noise and spectral normalisation:
the "PGD model, with smoothing and spectral normalisation".

The model is the randomized classifier f~(x) = f(x + d), d ~ N(0, sigma^2 I),
whose every Conv and Dense layer is spectrally normalised (operator norm,
clipped at 1; Farnia et al. 2019). Each step crafts PGD-7 L-infinity examples
on the base classifier f and trains f on x_adv + d, one fresh draw per
example. Evaluation: the mean softmax over `model.noise.samples` fixed draws,
attacked through them (EOT). Normalised layers learn slowly (docs/training.md),
so it trains with Adam (lr 3e-3 on digits; the cifar10 setting's Adam 1e-3 on
CIFAR-10).
Command: python train.py --config pgd_at_sn_noise --workdir runs/pgd_at_sn_noise
CIFAR-10 setting (seed_cnn): --config pgd_at_sn_noise:cifar10
"""

import ml_collections

from jaxrobust.configs import pgd_at


def get_config(setting: str = "digits") -> ml_collections.ConfigDict:
  c = pgd_at.get_config(setting)
  c.objective = "pgd_at"
  c.model.spectral = dict(mode="operator", target=1.0, n_steps=1, rescale="clip")
  c.model.noise = dict(sigma=0.25 if setting == "digits" else 0.1, samples=8, seed=0)
  if setting == "digits":
    c.optimizer = dict(
      name="adam", learning_rate=3e-3, schedule="cosine", warmup_steps=50, weight_decay=0.0
    )
  return c
