"""A trained run read back and evaluated: `restore` and `evaluate`."""

import functools
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import linen as nn

from jaxrobust import checks, data, evaluation, models, parallel
from jaxrobust.certification import certificates
from jaxrobust.evaluation import sanity as sanity_lib
from jaxrobust.training import checkpoints, selection
from jaxrobust.training import config as config_lib
from jaxrobust.training.state import abstract_state, for_evaluation
from jaxrobust.types import ApplyFn, Variables

LIPSCHITZ_FACTORS = (0.25, 0.5, 1.0)  # certified radii: these times each L2 attack's eps


def restore(
  workdir: str | Path, mesh: jax.sharding.Mesh | None = None, checkpoint: str = "latest"
) -> tuple[dict[str, Any], nn.Module, Any]:
  """The resolved config, model and state of a run, to evaluate.

  The workdir is only read: corrupt checkpoints are skipped, not moved.

  Args:
    workdir: the run's workdir.
    mesh: the devices (default: all).
    checkpoint: "latest" (the newest intact checkpoint) or "best" (the best
      by validation robust accuracy, see `selection`).

  Returns:
    (resolved config, model, state); with `ema` set, the state's parameters
    are their moving average (`for_evaluation`).

  Raises:
    InputError: no run, or no intact checkpoint, in `workdir`.
  """
  mesh = mesh or parallel.mesh()
  path = checkpoints.check_workdir(workdir)
  resolved = checkpoints.load_config(path)
  model = config_lib.build_model(resolved)
  target = abstract_state(resolved, model, config_lib.make_optimizer(resolved), mesh)
  state = None
  if (path / "checkpoints").is_dir():
    mgr = (
      selection.manager(path, read_only=True)
      if checkpoint == "best"
      else checkpoints.manager(path, keep=None, read_only=True)
    )
    try:
      state = checkpoints.restore_latest(mgr, target)
    finally:
      mgr.close()
  checks.require(
    state is not None,
    f"no intact checkpoint in {str(workdir)!r}; train first with train.py --workdir",
  )
  return resolved, model, for_evaluation(state)


def _examples(
  resolved: Mapping[str, Any], split: str, limit: int | None
) -> tuple[np.ndarray, np.ndarray]:
  """The images and labels of `split`, the first `limit` when given."""
  test_set = config_lib.load_split(resolved, split)
  x, y = test_set.x, test_set.y
  if limit:
    checks.integer_at_least("limit", limit, 1)
    x, y = x[:limit], y[:limit]
  return data.host_float(x), np.asarray(y)


def _with_sanity(
  rep: dict[str, Any],
  run: Callable[..., Any],
  apply_fn: ApplyFn,
  variables: Variables,
  model: nn.Module,
  x: np.ndarray,
  y: np.ndarray,
  specs: Mapping[str, Any],
  certified: bool,
) -> None:
  """Adds the checks of `jaxrobust.evaluation.sanity` to `rep` (on the first
  `sanity.SANITY_EXAMPLES` examples)."""
  subset = x[: sanity_lib.SANITY_EXAMPLES], y[: sanity_lib.SANITY_EXAMPLES]
  rep["sanity"] = sanity_lib.model_checks(
    apply_fn, variables, *subset, stochastic_apply_fn=models.stochastic_fn(model)
  ) + sanity_lib.attack_checks(
    rep, lambda s, **kw: run(*subset, s, **kw), specs, x.shape[1:], certified=certified
  )


def _with_lipschitz(
  rep: dict[str, Any],
  model: nn.Module,
  variables: Variables,
  x: np.ndarray,
  y: np.ndarray,
  batch_size: int,
  checked: bool,
) -> None:
  """Adds the Lipschitz certificate of a spectrally normalised model to `rep`,
  at radius 0 and `LIPSCHITZ_FACTORS` times the eps of every L2 attack."""
  randomized = models.is_randomized(model)
  radii = sorted(
    {0.0} | {f * r["eps"] for r in rep["results"] if r["norm"] == "l2" for f in LIPSCHITZ_FACTORS}
  )
  rep["lipschitz"] = certificates.lipschitz_certificate(
    models.inference_fn(model, base=True),
    jax.device_get(variables),
    x,
    y,
    radii,
    batch_size=batch_size,
  )
  rep["lipschitz"]["of"] = "the base classifier f (without noise)" if randomized else "the model"
  if "sanity" in rep and not randomized and checked:
    rep["sanity"] += sanity_lib.lipschitz_checks(rep, rep["lipschitz"])


def evaluate(
  resolved: Mapping[str, Any],
  model: nn.Module,
  state: Any,
  *,
  split: str = "test",
  names: str | None = None,
  specs: Mapping[str, Any] | None = None,
  limit: int | None = None,
  batch_size: int | None = None,
  mesh: jax.sharding.Mesh | None = None,
  source: tuple[nn.Module, Any] | None = None,
  sanity: bool = False,
  lipschitz: bool = False,
  individual: bool = False,
  state_path: str | None = None,
  log: Callable[[str], Any] | None = None,
  return_adversarial: bool = False,
) -> Any:
  """Robust accuracy of a run's model under attacks (`evaluation.evaluate`).

  A randomized model is attacked with its fixed draws (EOT), and with fresh
  draws by attacks that ask for them (`Attack.stochastic`).

  Args:
    resolved: the run's resolved config.
    model: its model.
    state: its state (or any with `variables`), evaluated as
      `for_evaluation(state)`: the EMA of the parameters when it keeps one.
    split: the data split.
    names: the config's `eval.attacks` to run (comma-separated, or "all";
      default: the config's `eval.default`).
    specs: `{label: spec}`, the attacks to run instead of `names`.
    limit: evaluate the first `limit` examples only.
    batch_size: examples per batch (default: the config's `eval.batch_size`).
    mesh: the devices.
    source: `(model, state)` to craft the examples on (transfer).
    sanity: add the report's "sanity" entry (`jaxrobust.evaluation.sanity`).
    lipschitz: add `certificates.lipschitz_certificate` (report key
      "lipschitz") of a spectrally normalised model (its base classifier f).
    individual: every attack on every clean-correct example, not a cascade.
    state_path: the evaluation's progress file (`evaluation.evaluate`).
    log: where progress lines go.
    return_adversarial: also return the adversarial examples.

  Returns:
    The report, or `(report, adversarial)` as `evaluation.evaluate` gives.
  """
  state = for_evaluation(state)  # idempotent: a restored state already is
  x, y = _examples(resolved, split, limit)
  specs = specs or evaluation.select(
    resolved["eval"]["attacks"], names or resolved["eval"].get("default")
  )
  batch_size = batch_size or resolved["eval"]["batch_size"]
  apply_fn = models.inference_fn(model)
  run = functools.partial(
    evaluation.evaluate,
    apply_fn,
    state.variables,
    key=jax.random.key(resolved["seed"]),
    batch_size=batch_size,
    mesh=mesh,
    stochastic_apply_fn=models.stochastic_fn(model),
    source=source and (models.inference_fn(source[0]), source[1].variables),
  )
  options: dict[str, Any] = dict(individual=individual, state_path=state_path, log=log)
  result: Any = run(x, y, specs, return_adversarial=return_adversarial, **options)
  rep, adversarial = result if return_adversarial else (result, None)
  certified = bool(resolved["model"].get("spectral"))
  if sanity and source is None:
    _with_sanity(rep, run, apply_fn, state.variables, model, x, y, specs, certified)
  if lipschitz and certified:
    _with_lipschitz(rep, model, state.variables, x, y, batch_size, checked=source is None)
  return (rep, adversarial) if return_adversarial else rep
