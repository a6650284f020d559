"""Robust accuracy of a model under attacks, attacking only what is still robust.

An example is robust to a threat model (a norm and an eps) when it is
classified correctly clean and under every attack of that threat model. The
evaluation is a cascade (`cascade`): each attack, and each stage of a staged
attack (AutoAttack, `worst_case`), runs only on the examples still robust,
packed into full batches of one fixed size (so nothing recompiles), and its
row reports the robust accuracy after it. Skipping changes no example's
outcome: every attack is per example, with the key of example i under
attack a `fold_in(fold_in(key, a), i)` (stage j: folded with j too), so the
result is the same as running every attack on every example, for any batch
size and device count, and it is the same when an interrupted evaluation is
resumed from its state file (`state_path`, `state`). With `individual`,
every attack runs on all clean-correct examples instead (each row: that
attack alone).

An adversarial example counts only within its attack's ball (up to float32
rounding, and the rounding to the images' type when it is narrower, such as
float16: `plan.ball_limit`); the report's `outside_ball` counts any that was
not, which a correct attack never produces, and the run warns of them.
Transfer (black-box) evaluation crafts the examples on a source model and
classifies them with the target.

An `Evaluator` holds one model's compiled programs: build one and call its
`run` or `evaluate` for every evaluation of that model (each epoch's
variables, an eps sweep, the sanity checks) to compile each program once.
`summary.report` is the JSON-ready summary of a run; `report` (the
submodule) formats it as markdown tables. The functions `run`, `evaluate`, `predictions` and `robust_accuracy` take
the model's functions instead, and reuse one of the last
`RECENT_EVALUATORS` evaluators built for the same functions, mesh and batch
size.
"""

import collections
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from jax.sharding import Mesh

from jaxrobust import attacks as attacks_lib
from jaxrobust import checks, parallel
from jaxrobust import keys as keys_lib  # noqa: F401  (tests fold keys as the evaluation does)
from jaxrobust.evaluation.evaluator import Evaluator
from jaxrobust.evaluation.outcome import Outcome, adversarial
from jaxrobust.evaluation.plan import (
  BALL_TOLERANCE,
  MIN_PER_DEVICE,
  AttackSpecs,
  build_attacks,
  rounds,
  select,
  threat_model,
)
from jaxrobust.evaluation.plan import parts as _parts  # noqa: F401
from jaxrobust.evaluation.programs import ATTACKED_DRAW as _ATTACKED_DRAW  # noqa: F401
from jaxrobust.evaluation.programs import CLEAN_DRAW as _CLEAN_DRAW  # noqa: F401
from jaxrobust.evaluation.programs import StochasticApplyFn
from jaxrobust.evaluation.state import SAVE_SECONDS, STATE_FORMAT
from jaxrobust.evaluation import report, summary
from jaxrobust.evaluation.summary import robustbench_report
from jaxrobust.models import inference
from jaxrobust.types import ApplyFn, Images, Labels, LogitsFn, PRNGKey, Variables

__all__ = [
  "BALL_TOLERANCE",
  "MIN_PER_DEVICE",
  "RECENT_EVALUATORS",
  "SAVE_SECONDS",
  "STATE_FORMAT",
  "Evaluator",
  "Outcome",
  "adversarial",
  "build_attacks",
  "evaluate",
  "evaluator_for",
  "predictions",
  "report",
  "robust_accuracy",
  "robustbench_report",
  "rounds",
  "run",
  "select",
  "summary",
  "threat_model",
]

# The evaluators `evaluator_for` keeps for the functions below (least recently used dropped).
RECENT_EVALUATORS = 4
_recent: collections.OrderedDict[tuple, Evaluator] = collections.OrderedDict()


def evaluator_for(
  apply_fn: ApplyFn,
  *,
  stochastic_apply_fn: StochasticApplyFn | None = None,
  source_apply_fn: ApplyFn | None = None,
  mesh: Mesh | None = None,
  batch_size: int = 500,
) -> Evaluator:
  """An `Evaluator` of these functions, one of the last `RECENT_EVALUATORS` built.

  Args:
    apply_fn: `(variables, x) -> logits`, the model in inference mode.
    stochastic_apply_fn: one draw of a randomized model, or None.
    source_apply_fn: the model to craft the examples on, or None.
    mesh: devices to split batches over (default: all).
    batch_size: examples per compiled batch.

  Returns:
    The evaluator built last for the same arguments (the same function
    objects), if it is among the last `RECENT_EVALUATORS`; else a new one.
  """
  mesh = mesh or parallel.mesh()
  key = (apply_fn, stochastic_apply_fn, source_apply_fn, mesh, batch_size)
  if key in _recent:
    _recent.move_to_end(key)
    return _recent[key]
  evaluator = Evaluator(
    apply_fn,
    stochastic_apply_fn=stochastic_apply_fn,
    source_apply_fn=source_apply_fn,
    mesh=mesh,
    batch_size=batch_size,
  )
  _recent[key] = evaluator
  while len(_recent) > RECENT_EVALUATORS:
    _recent.popitem(last=False)
  return evaluator


def run(
  apply_fn: ApplyFn,
  variables: Variables,
  x: Images,
  y: Labels,
  attacks: AttackSpecs,
  *,
  key: PRNGKey,
  batch_size: int = 500,
  mesh: Mesh | None = None,
  source: tuple[ApplyFn, Variables] | None = None,
  stochastic_apply_fn: StochasticApplyFn | None = None,
  individual: bool = False,
  state_path: str | Path | None = None,
  log: Callable[[str], Any] | None = None,
  return_adversarial: bool = False,
) -> tuple[np.ndarray, dict[str, Outcome]]:
  """Runs the cascade (`Evaluator.run`) with `evaluator_for`'s evaluator.

  Args:
    apply_fn: `(variables, x) -> logits`, the model in inference mode.
    variables: its variables.
    x: images in [0, 1] [N, ...] (numpy).
    y: labels [N] (numpy).
    attacks: `{label: Attack or spec}`, in order.
    key: PRNG key of the attacks.
    batch_size: examples per compiled batch (see `Evaluator`).
    mesh: devices to split batches over (default: all).
    source: optional `(apply_fn, variables)` of the model the attacks run on.
    stochastic_apply_fn: `(variables, x, key) -> logits`, one random draw of
      a randomized model (see `Evaluator`).
    individual: run every attack on all clean-correct examples.
    state_path: a file to write the progress to and resume from.
    log: optional `log(message)` for progress lines.
    return_adversarial: keep each fooled example's adversarial image.

  Returns:
    `(clean [N], {label: Outcome})`.
  """
  checks.integer_at_least("batch_size", batch_size, 1)
  evaluator = evaluator_for(
    apply_fn,
    stochastic_apply_fn=stochastic_apply_fn,
    source_apply_fn=None if source is None else source[0],
    mesh=mesh,
    batch_size=batch_size,
  )
  return evaluator.run(
    variables,
    x,
    y,
    attacks,
    key=key,
    source_variables=None if source is None else source[1],
    individual=individual,
    state_path=state_path,
    log=log,
    return_adversarial=return_adversarial,
  )


def evaluate(
  apply_fn: ApplyFn,
  variables: Variables,
  x: Images,
  y: Labels,
  attacks: AttackSpecs,
  *,
  key: PRNGKey,
  batch_size: int = 500,
  mesh: Mesh | None = None,
  source: tuple[ApplyFn, Variables] | None = None,
  stochastic_apply_fn: StochasticApplyFn | None = None,
  **options: Any,
) -> dict[str, Any] | tuple[dict[str, Any], dict[str, dict[str, Any]]]:
  """Runs the attacks (`run`, which takes the same arguments) and returns the report.

  Args:
    apply_fn: `(variables, x) -> logits`, the model in inference mode.
    variables: its variables.
    x: images in [0, 1] [N, ...] (numpy).
    y: labels [N] (numpy).
    attacks: `{label: Attack or spec}`, in order.
    key: PRNG key of the attacks.
    batch_size: as in `run`.
    mesh: as in `run`.
    source: as in `run`.
    stochastic_apply_fn: as in `run`.
    **options: `individual`, `state_path`, `log`, `return_adversarial`, as
      in `run`.

  Returns:
    The report (`summary.report`, with "seconds": the time it took). With
    `return_adversarial`, `(report, adversarial)`, where `adversarial[label]`
    is `{"x_adv", "fooled", "stage"}` (see `outcome.adversarial`).
  """
  checks.integer_at_least("batch_size", batch_size, 1)
  evaluator = evaluator_for(
    apply_fn,
    stochastic_apply_fn=stochastic_apply_fn,
    source_apply_fn=None if source is None else source[0],
    mesh=mesh,
    batch_size=batch_size,
  )
  if source is not None:
    options["source_variables"] = source[1]
  return evaluator.evaluate(variables, x, y, attacks, key=key, **options)


def predictions(
  apply_fn: ApplyFn,
  variables: Variables,
  x: Images,
  *,
  batch_size: int = 500,
  mesh: Mesh | None = None,
) -> np.ndarray:
  """The model's classes for images `x` [N, ...], in batches split over `mesh`.

  Args:
    apply_fn: `(variables, x) -> logits`.
    variables: its variables.
    x: the images (numpy).
    batch_size: examples per compiled batch.
    mesh: devices to split batches over (default: all).

  Returns:
    int [N], the argmax of the logits.
  """
  return evaluator_for(apply_fn, mesh=mesh, batch_size=batch_size).predictions(variables, x)


def robust_accuracy(
  logits_fn: LogitsFn,
  x: Images,
  y: Labels,
  attack: attacks_lib.Attack,
  *,
  key: PRNGKey,
  batch_size: int = 500,
) -> float:
  """The fraction of examples classified correctly clean and under `attack`.

  `evaluate` in one line: each stage of `attack` runs on what the stages
  before it left robust. `logits_fn(x) -> logits` is called with its
  variables as constants of the compiled program: to evaluate changing
  weights without recompiling, use an `Evaluator` of `(apply_fn, variables)`
  (`inference.split`).

  Args:
    logits_fn: `(x) -> logits`, the model.
    x: images in [0, 1] [N, ...].
    y: labels [N].
    attack: the attack.
    key: PRNG key of the attack.
    batch_size: examples per compiled batch.

  Returns:
    The robust accuracy, in [0, 1].
  """
  checks.require(
    isinstance(attack, attacks_lib.Attack), f"attack must be an Attack, got {attack!r}"
  )
  rep = evaluate(
    inference.constant_apply(logits_fn),
    {},
    x,
    y,
    {"attack": attack},
    key=key,
    batch_size=batch_size,
  )
  assert isinstance(rep, dict)
  return rep["results"][0]["accuracy"]
