"""The attacks `jaxrobust-eval` runs: --suite, --attacks, and their defaults."""

from collections.abc import Mapping
from typing import Any

from flax import linen as nn

from jaxrobust import attacks as attacks_lib
from jaxrobust import checks, evaluation, models
from jaxrobust.programs import eval_flags as opts

SUITES = ("autoattack",)


def attack_specs(resolved: Mapping[str, Any], model: nn.Module) -> dict[str, Any]:
  """The attacks to run: --suite, else --attacks (or the config's eval.default).

  Args:
    resolved: the run's config.
    model: its model.

  Returns:
    `{label: spec}`.
  """
  if opts.SUITE.value is None:
    checks.require(
      opts.NORM.value is None and opts.EPS.value is None,
      "--norm and --eps set a --suite's threat model; use "
      "--config.eval.attacks.<label>.eps=... to change an attack's",
    )
    return evaluation.select(
      resolved["eval"]["attacks"], opts.ATTACKS.value or resolved["eval"].get("default")
    )
  checks.require(opts.ATTACKS.value is None, "give either --suite or --attacks, not both")
  checks.one_of("--suite", opts.SUITE.value, SUITES)
  checks.one_of("--version", opts.VERSION.value, attacks_lib.AUTOATTACK_VERSIONS)
  norm = opts.NORM.value or training_norm(resolved)
  checks.one_of("--norm", norm, ("linf", "l2", "l1"))
  eps = opts.EPS.value if opts.EPS.value is not None else setting_eps(resolved, norm)
  if opts.VERSION.value == "rand" and not models.is_randomized(model):
    print(
      "warning: --version rand is for randomized models; this model is "
      "deterministic, so its 20 draws per gradient are all the same"
    )
  spec = dict(name="autoattack", norm=norm, eps=eps, version=opts.VERSION.value)
  attacks_lib.create(spec)  # refuses a bad eps now
  return {f"autoattack_{norm}": spec}


def training_attack(resolved: Mapping[str, Any]) -> Any:
  """The run's training attack (None for clean training)."""
  spec = resolved.get("train_attack")
  if not spec:
    return None
  return attacks_lib.create({k: v for k, v in dict(spec).items() if k != "eot_samples"})


def training_norm(resolved: Mapping[str, Any]) -> str:
  """The norm of the run's training attack (L-infinity for clean training,
  and when its parts have several)."""
  train = training_attack(resolved)
  return (train and train.norm) or "linf"


def setting_eps(resolved: Mapping[str, Any], norm: str) -> float:
  """The eps of the run's setting for `norm`: that of its training attack in
  this norm, else of its PGD evaluation attack in this norm."""
  train = training_attack(resolved)
  if train and train.norm == norm and train.eps is not None:
    return train.eps
  for spec in resolved["eval"]["attacks"].values():
    if spec.get("name") == "pgd" and spec.get("norm", "linf") == norm:
      return spec["eps"]
  raise checks.InputError(f"the run has no default eps for norm {norm!r}; pass --eps")
