"""`Attack`: what every attack factory returns.

An attack is a pure function `attack(logits_fn, x, y, key, *, eps=None) ->
x_adv` that also says what it is: its name, its threat model (`norm` and
`eps`; None for an attack without a ball), whether `y` is a target, and the
settings it was built with. The evaluation reads these (the threat model of a
report row, the ball an adversarial example must lie in); `spec` gives the
settings back in the form `attacks.create` takes, so
`create(**attack.spec) == attack`.

Two attacks built with the same settings compare equal (and hash equal), so
compiled programs can be cached by attack.
"""

import dataclasses
import math
import numbers
from typing import Any, Protocol
from collections.abc import Callable

import jax
import numpy as np

from jaxrobust import checks

NORMS = ("linf", "l2", "l1")
# Other names of the norms, as other libraries and papers write them.
_NORM_ALIASES = {
  "linf": "linf",
  "inf": "linf",
  "l_inf": "linf",
  "l2": "l2",
  "2": "l2",
  "l1": "l1",
  "1": "l1",
}


def norm_name(norm):
  """The canonical name of a norm: "linf" for "Linf", "inf", `np.inf`;
  "l2" for "L2", 2; "l1" for "L1", 1. Raises `InputError` for anything else."""
  if isinstance(norm, numbers.Real) and not isinstance(norm, bool):
    key = {math.inf: "inf", 2: "2", 1: "1"}.get(norm)
  else:
    key = norm.lower() if isinstance(norm, str) else None
  checks.require(
    key in _NORM_ALIASES,
    f"unknown norm {norm!r}; choose one of 'linf' (also 'Linf', 'inf', np.inf), 'l2' "
    "(also 'L2', 2) or 'l1' (also 'L1', 1)",
  )
  return _NORM_ALIASES[key]


class AttackFn(Protocol):
  """The function inside an `Attack`: eps is the ball's radius for this call
  (a scalar or a [B] array; None for an attack without a ball)."""

  def __call__(
    self,
    logits_fn: Callable[[jax.Array], jax.Array],
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
    eps: Any,
  ) -> jax.Array: ...


@dataclasses.dataclass(frozen=True)
class Attack:
  """An adversarial attack and what it is.

  Call it as `attack(logits_fn, x, y, key)` (or with `eps=` to change the
  ball's radius for one call: a number or one per example, [B]; only for an
  attack with a ball). `logits_fn` maps a batch of images in [0, 1] to logits
  [B, K] in inference mode; `y` holds true labels (targets when `targeted`);
  `key` is a PRNG key, split per example as `fold_in(key, i)`, or a batch of
  B keys. Returns `x_adv`, the shape and dtype of `x`.

  Attributes:
    fn: the attack itself, `fn(logits_fn, x, y, key, eps) -> x_adv`.
    name: the factory's name ("pgd", "apgd", ...).
    norm: the norm of the threat model, "linf", "l2" or "l1"; None without a ball
      (or, for a combinator, when its parts do not share one).
    eps: the ball's radius; None without a ball (or shared radius).
    targeted: `y` is the class to reach, not the one to leave.
    settings: the other hyper-parameters, as sorted (name, value) pairs.
    stages: for a cascade (AutoAttack, `worst_case`), the attacks it runs
      in order, each example keeping the first that succeeds: an
      evaluation may run each stage only on the examples still robust.
      Stage j of example i uses the key `fold_in(k_i, j)`.
    rounds: for an attack that is itself a cascade of runs (APGD-T's and
      FAB-T's targets), their number (0: not such an attack): the attack
      succeeds on an example exactly when one of its rounds does, so an
      evaluation may run each round only on the examples the rounds before
      it left robust.
    round_fn: `round_fn(logits_fn, x, y, key, eps, m) -> x_adv`, round m
      alone (m may be traced: one compiled program serves every round);
      round m of example i uses the key `fold_in(k_i, m)`.
  """

  fn: AttackFn = dataclasses.field(repr=False, compare=False)
  name: str
  norm: str | None = None
  eps: float | None = None
  targeted: bool = False
  settings: tuple = ()
  stages: tuple = dataclasses.field(default=(), repr=False, compare=False)
  rounds: int = dataclasses.field(default=0, repr=False, compare=False)
  round_fn: Callable | None = dataclasses.field(default=None, repr=False, compare=False)

  def __call__(self, logits_fn, x, y, key, *, eps=None):
    if eps is not None and self.eps is None:
      raise checks.InputError(f"attack {self.name!r} has no eps to override")
    return self.fn(logits_fn, x, y, key, self.eps if eps is None else eps)

  @property
  def options(self) -> dict:
    """The settings as a dict."""
    return dict(self.settings)

  @property
  def spec(self) -> dict:
    """`{"name": ..., **settings}`: what `attacks.create` builds this attack from."""
    spec = {"name": self.name}
    if self.norm is not None:
      spec["norm"] = self.norm
    if self.eps is not None:
      spec["eps"] = self.eps
    if self.targeted:
      spec["targeted"] = True
    for key, value in self.settings:
      if isinstance(value, tuple):
        value = [v.spec if isinstance(v, Attack) else v for v in value]
      spec[key] = value
    return spec

  @property
  def parts(self) -> tuple:
    """The attacks a combinator or a cascade is made of (empty otherwise)."""
    return self.stages or self.options.get("attacks", ())

  @property
  def stochastic(self) -> bool:
    """Whether it attacks a stochastic model `logits_fn(x, key)` (EOT)."""
    return self.options.get("eot_samples", 1) > 1 or any(
      getattr(part, "stochastic", False) for part in self.parts
    )

  @property
  def label(self) -> str:
    """A short name: AutoAttack's for its stages ("apgd-ce", "apgd-t",
    "fab-t", ...), else the factory's."""
    if self.name == "apgd":
      return f"apgd-{self.options['loss']}"
    return self.name.replace("_", "-")


def make(
  fn,
  name,
  *,
  norm=None,
  eps=None,
  targeted=False,
  stages=(),
  rounds=0,
  round_fn=None,
  **settings,
) -> Attack:
  """An `Attack` of `fn`; lists in `settings` are stored as tuples (hashable)."""
  checks.require(
    eps is None or (np.ndim(eps) == 0 and isinstance(eps, numbers.Real | np.ndarray | jax.Array)),
    f"attack {name!r}: eps at construction is one number, got {_describe(eps)}; pass one eps "
    "per example at call time instead: attack(logits_fn, x, y, key, eps=eps_per_example)",
  )
  frozen = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in settings.items()))
  return Attack(
    fn,
    name,
    norm=None if norm is None else norm_name(norm),
    eps=None if eps is None else float(eps),
    targeted=bool(targeted),
    settings=frozen,
    stages=tuple(stages),
    rounds=rounds,
    round_fn=round_fn,
  )


def _describe(value):
  shape = np.shape(value)
  return f"an array of shape {shape}" if shape else repr(value)
