"""The cascade: each attack, round by round, on the examples still robust.

An attack's round runs on the examples its threat model's attacks before it
(and its own rounds before) left robust, packed into compiled batches of a
few fixed sizes (`plan.parts`). The device's work is dispatched one batch
ahead of reading results back (`pipelined`), so the host's bookkeeping
overlaps it.
"""

import dataclasses
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxrobust import attacks as attacks_lib
from jaxrobust import data
from jaxrobust.evaluation import plan
from jaxrobust.evaluation.outcome import Outcome
from jaxrobust.evaluation.state import State
from jaxrobust.types import PRNGKey, Variables

if TYPE_CHECKING:
  from jaxrobust.evaluation.evaluator import Evaluator

Item = TypeVar("Item")
Pending = TypeVar("Pending")


def pipelined(
  items: Iterable[Item],
  dispatch: Callable[[Item], Pending],
  read: Callable[[Item, Pending], None],
) -> None:
  """Dispatches each item's work before reading back the one before it.

  JAX dispatches device work asynchronously: `dispatch(item)` returns at
  once with arrays still being computed, and `read(item, pending)` waits
  for them. Reading item k after dispatching item k + 1 keeps the device
  busy while the host reads and records item k.

  Args:
    items: the work, in order.
    dispatch: `dispatch(item) -> pending`, starting the item's work.
    read: `read(item, pending)`, waiting for and recording its results.
  """
  before: tuple[Item, Pending] | None = None
  for item in items:
    pending = dispatch(item)
    if before is not None:
      read(*before)
    before = (item, pending)
  if before is not None:
    read(*before)


@dataclasses.dataclass(frozen=True)
class Context:
  """What every round of an evaluation shares.

  Attributes:
    evaluator: the `Evaluator` whose programs run the rounds.
    variables: the model's variables.
    source_variables: the variables of the model the examples are crafted
      on (transfer), or None.
    x: the images [N, ...].
    y: the labels [N].
    state: the evaluation's progress.
    log: `log(message)` for progress lines.
    keep_adversarial: whether the outcomes keep the adversarial examples.
  """

  evaluator: "Evaluator"
  variables: Variables
  source_variables: Variables | None
  x: np.ndarray
  y: np.ndarray
  state: State
  log: Callable[[str], Any]
  keep_adversarial: bool


def run_attacks(
  context: Context,
  clean: np.ndarray,
  attack_fns: dict[str, attacks_lib.Attack],
  key: PRNGKey,
  individual: bool,
) -> dict[str, Outcome]:
  """Runs each attack on what the attacks of its threat model before it left robust.

  Args:
    context: the evaluation.
    clean: bool [N], the examples classified correctly clean.
    attack_fns: `{label: Attack}`, in order; attack a's key is
      `fold_in(key, a)`.
    key: the attacks' PRNG key.
    individual: run each attack on every example of `clean` instead.

  Returns:
    `{label: Outcome}`.
  """
  robust_of: dict[tuple, np.ndarray] = {}
  outcomes = {}
  for index, (label, attack) in enumerate(attack_fns.items()):
    group = plan.threat_model(attack)
    start = clean if individual else robust_of.get(group, clean)
    attack_key = jax.random.fold_in(key, index)
    outcomes[label] = _run_attack(context, label, attack, start, attack_key)
    if not individual:
      robust_of[group] = outcomes[label].robust
  return outcomes


def _run_attack(context, label, attack, start, attack_key):
  """Runs the rounds of `attack` not run yet (resumed from the state) on
  the examples of `start` [N] they leave robust; logs each stage's result."""
  x = context.x if context.keep_adversarial else None
  order = plan.rounds(attack)
  outcome = context.state.outcome(label, start, len(order), x)
  for r, (j, stage, m) in enumerate(order):
    todo = np.flatnonzero(outcome.robust & ~outcome.attacked[r])
    if len(todo):
      began = time.perf_counter()
      where = _Where(label, j, stage, m, r, bool(attack.stages))
      _run_round(context, where, attack_key, todo, outcome)
      outcome.seconds[r] += time.perf_counter() - began
      context.state.save(label, outcome)
    if m == max(stage.rounds, 1) - 1:
      seconds = outcome.seconds[r - m : r + 1].sum()
      context.log(
        f"{label}{'' if not attack.stages else ' ' + stage.label}: robust accuracy "
        f"{outcome.robust.mean():.2%} after {seconds:.1f} s"
      )
  return outcome


@dataclasses.dataclass(frozen=True)
class _Where:
  """Which round of which attack: label, stage j, round m (flat index r)."""

  label: str
  j: int
  stage: attacks_lib.Attack
  m: int
  r: int
  staged: bool


def _run_round(context, where, attack_key, todo, outcome):
  """Runs one round on the examples `todo`, in parts of compiled batches
  (`plan.parts`), and records what it fooled in `outcome`."""
  c, stage = context, where.stage
  evaluator = c.evaluator
  program = evaluator.attack_program(stage, where.staged, c.keep_adversarial)
  eps = None if stage.eps is None else jnp.float32(stage.eps)
  limit = np.inf if stage.eps is None else plan.ball_limit(stage, c.x)
  stage_index = (jnp.int32(where.j), jnp.int32(where.m))
  chunks, begin = [], 0
  for count, size in plan.parts(len(todo), evaluator.batch(len(c.x)), evaluator.devices):
    chunks.append((todo[begin : begin + count], size))
    begin += count

  def dispatch(chunk):
    chosen, size = chunk
    padded = np.resize(chosen, size)  # a part smaller than its batch repeats examples
    arrays = data.to_devices((c.x[padded], c.y[padded], padded.astype(np.int32)), evaluator.mesh)
    return program(c.variables, c.source_variables, *arrays, attack_key, *stage_index, eps)

  def read(chunk, results):
    _record(c, where, limit, chunk[0], results, outcome)

  pipelined(chunks, dispatch, read)


def _record(context, where, limit, chosen, results, outcome):
  """Reads one part's results and records them in `outcome`."""
  results = [r[: len(chosen)] for r in jax.device_get(results)]
  correct, l2, size = results[:3]
  inside = size <= limit
  fooled = ~correct & inside
  outside = int(np.sum(~correct & ~inside))
  if outside:
    context.log(
      f"warning: {where.label} {where.stage.label} found {outside} adversarial examples "
      f"outside its ball ({where.stage.norm} {where.stage.eps:g}; largest "
      f"{np.max(size[~correct & ~inside]):.6g}): not counted (outside_ball)"
    )
  hit = chosen[fooled]
  with context.state.changing():
    outcome.outside_ball += outside
    outcome.robust[hit] = False
    outcome.fooled_by[hit] = where.j
    outcome.l2[hit], outcome.size[hit] = l2[fooled], size[fooled]
    if context.keep_adversarial:
      outcome.x_adv[hit] = results[3][fooled]
    outcome.attacked[where.r, chosen] = True
  context.state.save(where.label, outcome)
