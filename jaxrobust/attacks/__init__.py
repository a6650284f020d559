"""Adversarial attacks: factories returning `attack(logits_fn, x, y, key) -> x_adv`.

`logits_fn` maps a batch of images in [0, 1] (NHWC or any [B, ...]) to logits
and must run the model in inference mode. Compose under `jax.jit` with the
model's variables as an argument (compiled once per model, never stale):

  attack = jr.attacks.pgd(norm="linf", eps=8/255, step_size=2/255, steps=10)
  apply_fn, variables = jr.inference.split(model, variables)
  x_adv = jax.jit(lambda v, x, y, k: attack(lambda xb: apply_fn(v, xb), x, y, k))(
    variables, x, y, key)
"""

from jaxrobust.attacks import core, losses, targets
from jaxrobust.attacks.apgd import apgd
from jaxrobust.attacks.apgd_t import apgd_t
from jaxrobust.attacks.attack import NORMS, Attack, factory, make
from jaxrobust.attacks.autoattack import VERSIONS as AUTOATTACK_VERSIONS
from jaxrobust.attacks.autoattack import autoattack
from jaxrobust.attacks.combinators import max_loss, mixture, random_choice, worst_case
from jaxrobust.attacks.cw import cw_l2
from jaxrobust.attacks.fab import fab, fab_t
from jaxrobust.attacks.momentum import di_fgsm, mi_fgsm
from jaxrobust.attacks.pgd import fgsm, pgd
from jaxrobust.attacks.square import square

from collections.abc import Callable
from typing import Any

from jaxrobust import checks

ATTACKS: dict[str, Callable[..., Attack]] = {
  "fgsm": fgsm,
  "pgd": pgd,
  "cw_l2": cw_l2,
  "mi_fgsm": mi_fgsm,
  "di_fgsm": di_fgsm,
  "apgd": apgd,
  "apgd_t": apgd_t,
  "fab": fab,
  "fab_t": fab_t,
  "square": square,
  "autoattack": autoattack,
  "worst_case": worst_case,
  "max_loss": max_loss,
  "random_choice": random_choice,
  "mixture": mixture,
}
COMBINATORS = ("worst_case", "max_loss", "random_choice", "mixture")


def create(name: Any, **settings: Any) -> Attack:
  """Builds attack `name` (one of `ATTACKS`) from keyword `settings`, as in a config.

  `create(**attack.spec) == attack` for every attack.

  Args:
    name: a name in `ATTACKS`, or a whole spec `{"name": ..., **settings}`
      (a dict or ConfigDict).
    **settings: the factory's keyword arguments. A combinator's `attacks` is
      a list of specs (or `Attack`s), built recursively:
      `create("mixture", attacks=[{"name": "cw_l2", "steps": 100},
      {"name": "pgd", "eps": 0.03}], weights=[0.5, 0.5])`.

  Returns:
    The `Attack`; raises `InputError` for an unknown attack or setting.
  """
  if hasattr(name, "keys"):  # a dict or ConfigDict
    settings = {**dict(name), **settings}
    checks.require("name" in settings, f"an attack spec needs a 'name', got {name!r}")
    name = settings.pop("name")
  checks.one_of("attack", name, tuple(ATTACKS))
  if name in COMBINATORS and "attacks" in settings:
    inner = settings["attacks"]
    checks.require(
      isinstance(inner, (list, tuple)),
      f"attack {name!r}: attacks must be a list of specs, got {inner!r}",
    )
    settings["attacks"] = [a if isinstance(a, Attack) else create(a) for a in inner]
  build = ATTACKS[name]
  try:
    return build(**settings)
  except TypeError as e:  # an unknown or missing setting
    raise checks.InputError(f"attack {name!r}: {e}") from None
