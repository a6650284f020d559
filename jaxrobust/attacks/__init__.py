"""Adversarial attacks: factories returning `attack(logits_fn, x, y, key) -> x_adv`.

`logits_fn` maps a batch of images in [0, 1] (NHWC or any [B, ...]) to logits
and must run the model in inference mode. Compose under `jax.jit`:

  attack = jr.attacks.pgd(norm="linf", eps=8/255, step_size=2/255, steps=10)
  x_adv = jax.jit(attack, static_argnums=0)(logits_fn, x, y, key)
"""
from jaxrobust.attacks import core, losses
from jaxrobust.attacks.pgd import fgsm, pgd

from jaxrobust import checks

ATTACKS = {"fgsm": fgsm, "pgd": pgd}


def create(name, **settings):
  """Builds attack `name` (one of `ATTACKS`) from keyword `settings`, as in a config."""
  checks.one_of("attack", name, tuple(ATTACKS))
  factory = ATTACKS[name]
  try:
    return factory(**settings)
  except TypeError as e:  # an unknown or missing setting
    raise checks.InputError(f"attack {name!r}: {e}") from None
