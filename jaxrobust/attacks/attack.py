"""`Attack`: what every attack factory returns, and `factory`, the one way to build it.

An attack is a pure function `attack(logits_fn, x, y, key, *, eps=None) ->
x_adv` that also says what it is: its name, its threat model (`norm` and
`eps`; None for an attack without a ball), whether `y` is a target, what it
needs (gradients, a stochastic model) and the keyword arguments it was built
with. The evaluation reads these (the threat model of a report row, the ball
an adversarial example must lie in); `spec` gives the arguments back in the
form `attacks.create` takes.

Every factory is a keyword-only function decorated with `factory`, which
records its arguments (with their defaults) as the attack's `settings`, so
that `create(**attack.spec) == attack` (and their hashes agree) for every
attack by construction. Two attacks built with the same arguments compare
equal, so compiled programs can be cached by attack.
"""

import dataclasses
import functools
import inspect
import math
import numbers
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import jax
import numpy as np

from jaxrobust import checks
from jaxrobust.types import Eps, Images, Labels, LogitsFn, PRNGKey

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


def norm_name(norm: Any) -> str:
  """The canonical name of a norm.

  Args:
    norm: "linf" (also "Linf", "inf", `np.inf`), "l2" (also "L2", 2) or "l1"
      (also "L1", 1).

  Returns:
    "linf", "l2" or "l1"; raises `InputError` for anything else.
  """
  if isinstance(norm, numbers.Real) and not isinstance(norm, bool):
    key = {math.inf: "inf", 2: "2", 1: "1"}.get(float(norm))
  else:
    key = norm.lower() if isinstance(norm, str) else None
  checks.require(
    key in _NORM_ALIASES,
    f"unknown norm {norm!r}; choose one of 'linf' (also 'Linf', 'inf', np.inf), 'l2' "
    "(also 'L2', 2) or 'l1' (also 'L1', 1)",
  )
  return _NORM_ALIASES[str(key)]


class AttackFn(Protocol):
  """The function inside an `Attack`: eps is the ball's radius for this call
  (a scalar or a [B] array; None for an attack without a ball)."""

  def __call__(
    self, logits_fn: LogitsFn, x: Images, y: Labels, key: PRNGKey, eps: Eps | None
  ) -> Images: ...


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
    name: the factory's name ("pgd", "apgd", ...), its key in `attacks.ATTACKS`.
    norm: the norm of the threat model, "linf", "l2" or "l1"; None without a ball
      (or, for a combinator, when its parts do not share one).
    eps: the ball's radius; None without a ball (or shared radius).
    targeted: `y` is the class to reach, not the one to leave.
    settings: the factory's keyword arguments (defaults included) but `eps`,
      as sorted (name, value) pairs, lists as tuples. eps lives in `eps` alone:
      it is also an argument of each call, so attacks that differ only in eps
      share one compiled program (an evaluation keys programs by the attack
      with its eps replaced).
    takes_eps: whether the factory has an `eps` argument (`spec` lists it).
    uses_gradients: whether it reads the model's gradients (False: forward
      passes only, as Square).
    stochastic: whether it attacks a stochastic model `logits_fn(x, key)`
      (EOT).
    label: a short name for reports: AutoAttack's for its stages ("apgd-ce",
      "apgd-t", "fab-t", ...), else the factory's name with dashes.
    stages: for a cascade (AutoAttack, `worst_case`), the attacks it runs
      in order, each example keeping the first that succeeds: an
      evaluation may run each stage only on the examples still robust.
      Stage j of example i uses the key `fold_in(k_i, j)`.
    rounds: for an attack that is itself a cascade of runs (APGD's restarts,
      APGD-T's and FAB-T's targets), their number (0: not such an attack):
      the attack succeeds on an example exactly when one of its rounds does,
      so an evaluation may run each round only on the examples the rounds
      before it left robust.
    round_fn: `round_fn(logits_fn, x, y, key, eps, m) -> x_adv`, round m
      alone (m may be traced: one compiled program serves every round);
      round m of example i uses the key `fold_in(k_i, m)`.
  """

  fn: AttackFn = dataclasses.field(repr=False, compare=False)
  name: str = ""
  norm: str | None = None
  eps: float | None = None
  targeted: bool = False
  settings: tuple = ()
  takes_eps: bool = dataclasses.field(default=False, repr=False, compare=False)
  uses_gradients: bool = dataclasses.field(default=True, compare=False)
  stochastic: bool = dataclasses.field(default=False, compare=False)
  label: str = dataclasses.field(default="", compare=False)
  stages: tuple = dataclasses.field(default=(), repr=False, compare=False)
  rounds: int = dataclasses.field(default=0, repr=False, compare=False)
  round_fn: Callable | None = dataclasses.field(default=None, repr=False, compare=False)

  def __call__(
    self, logits_fn: LogitsFn, x: Images, y: Labels, key: PRNGKey, *, eps: Eps | None = None
  ) -> Images:
    if eps is not None and self.eps is None:
      raise checks.InputError(f"attack {self.name!r} has no eps to override")
    return self.fn(logits_fn, x, y, key, self.eps if eps is None else eps)

  @property
  def options(self) -> dict[str, Any]:
    """The settings as a dict."""
    return dict(self.settings)

  @property
  def spec(self) -> dict[str, Any]:
    """`{"name": ..., **settings}`: what `attacks.create` builds this attack from."""
    spec: dict[str, Any] = {"name": self.name}
    if self.takes_eps:
      spec["eps"] = self.eps
    for key, value in self.settings:
      if isinstance(value, tuple):
        value = [v.spec if isinstance(v, Attack) else v for v in value]
      spec[key] = value
    return spec

  @property
  def parts(self) -> tuple:
    """The attacks a combinator or a cascade is made of (empty otherwise)."""
    return self.stages or self.options.get("attacks", ())


def make(
  fn: AttackFn,
  *,
  norm: str | None = None,
  eps: float | None = None,
  targeted: bool = False,
  uses_gradients: bool = True,
  stochastic: bool = False,
  label: str = "",
  stages: tuple | list = (),
  rounds: int = 0,
  round_fn: Callable | None = None,
) -> Attack:
  """What a factory's body returns: the attack function and what it needs.

  `factory` adds the name and the settings, and takes the threat model
  (`norm`, `eps`, `targeted`) from the factory's arguments of those names;
  pass them here only where they come from elsewhere (a combinator's parts).

  Args:
    fn: `fn(logits_fn, x, y, key, eps) -> x_adv`.
    norm, eps, targeted: the threat model, for a factory without such arguments.
    uses_gradients: whether `fn` reads the model's gradients.
    stochastic: whether `fn` attacks a stochastic model `logits_fn(x, key)`.
    label: the report label (default: the name with dashes).
    stages, rounds, round_fn: as the attributes of `Attack`.

  Returns:
    An unnamed `Attack`.
  """
  return Attack(
    fn,
    norm=norm,
    eps=eps,
    targeted=targeted,
    uses_gradients=uses_gradients,
    stochastic=stochastic,
    label=label,
    stages=tuple(stages),
    rounds=rounds,
    round_fn=round_fn,
  )


Factory = TypeVar("Factory", bound=Callable[..., Attack])


def factory(name: str) -> Callable[[Factory], Factory]:
  """Turns a keyword-only function that returns `make(...)` into an attack factory.

  The decorated factory binds its keyword arguments (`inspect.signature`,
  defaults applied), runs the body (which validates them and builds the
  attack function) and records the arguments as the `Attack`'s `settings`
  (but `eps`; `norm` in canonical form, lists as tuples); its `norm`, `eps`
  and `targeted` arguments, where it has them, are the attack's threat model.
  So `create(**attack.spec)` calls the factory with the same arguments and
  returns an equal attack.

  Args:
    name: the factory's name in `attacks.ATTACKS`.

  Returns:
    The decorator.
  """

  def decorate(body: Factory) -> Factory:
    signature = inspect.signature(body)
    positional = [p for p in signature.parameters.values() if p.kind != p.KEYWORD_ONLY]
    assert not positional, f"attack factory {name} must be keyword-only, has {positional}"

    @functools.wraps(body)
    def build(*args: Any, **kwargs: Any) -> Attack:
      if args:
        raise TypeError(f"{name}() takes keyword arguments only, got {len(args)} positional")
      bound = signature.bind(**kwargs)
      bound.apply_defaults()
      attack = body(**bound.arguments)
      # A body may return another factory's attack (AutoAttack: a worst case):
      # its label is that factory's, not this one's.
      label = attack.label if attack.label and not attack.name else name.replace("_", "-")
      arguments = _canonical(name, bound.arguments)
      threat = {k: arguments[k] for k in ("norm", "eps", "targeted") if k in arguments}
      return dataclasses.replace(
        attack,
        name=name,
        settings=tuple(sorted((k, v) for k, v in arguments.items() if k != "eps")),
        takes_eps="eps" in arguments,
        label=label,
        **threat,
      )

    return build  # type: ignore[return-value]

  return decorate


def _canonical(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
  """A factory's (validated) arguments in the form two equal attacks share."""
  out = {k: _frozen(v) for k, v in arguments.items()}
  if out.get("norm") is not None:
    out["norm"] = norm_name(out["norm"])
  eps = out.get("eps")
  if eps is not None:
    checks.require(
      np.ndim(eps) == 0 and isinstance(eps, numbers.Real | np.ndarray | jax.Array),
      f"attack {name!r}: eps at construction is one number, got {_describe(eps)}; pass one "
      "eps per example at call time instead: attack(logits_fn, x, y, key, eps=eps_per_example)",
    )
    out["eps"] = float(eps)
  if "targeted" in out:
    out["targeted"] = bool(out["targeted"])
  return out


def _frozen(value: Any) -> Any:
  """Lists (and nested lists) as tuples, so the settings hash."""
  if isinstance(value, list | tuple):
    return tuple(_frozen(v) for v in value)
  return value


def _describe(value: Any) -> str:
  shape = np.shape(value)
  return f"an array of shape {shape}" if shape else repr(value)
