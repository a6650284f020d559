"""`Evaluator`: one model's evaluations, and the programs compiled for them."""

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from jax.sharding import Mesh

from jaxrobust import attacks as attacks_lib
from jaxrobust import checks, data, parallel
from jaxrobust.evaluation import cascade, plan, programs, summary
from jaxrobust.evaluation.outcome import Outcome, adversarial
from jaxrobust.evaluation.state import State, fingerprint
from jaxrobust.models import inference
from jaxrobust.types import ApplyFn, Images, Labels, PRNGKey, Variables


class Evaluator:
  """Evaluates one model under attacks, and holds the programs it compiles.

  Build one for a model and call `run` or `evaluate` as often as needed:
  new variables (each epoch's), new data, other attacks and other eps
  values reuse its compiled programs (eps is an argument of them); a new
  program compiles for each new attack setting and batch shape only. Two
  evaluators share nothing.

  Attributes:
    apply_fn: `(variables, x) -> logits`, the model in inference mode.
    stochastic_apply_fn: `(variables, x, key) -> logits`, one random draw of
      a randomized model, for attacks with EOT (`Attack.stochastic`), which
      it also judges, as AutoAttack's "rand" version does: an example counts
      when a draw classifies it correctly clean (one draw per example, the
      same for every stage) and another draw does after the attack. None
      for a deterministic model.
    source_apply_fn: `(variables, x) -> logits` of the model the attacks
      craft their examples on (transfer, black-box); None: the model itself.
    mesh: the devices batches are split over.
    batch_size: examples per compiled batch (rounded up to the device count).
  """

  def __init__(
    self,
    apply_fn: ApplyFn,
    *,
    stochastic_apply_fn: programs.StochasticApplyFn | None = None,
    source_apply_fn: ApplyFn | None = None,
    mesh: Mesh | None = None,
    batch_size: int = 500,
  ) -> None:
    """Builds the evaluator; nothing compiles until it runs.

    Args:
      apply_fn: `(variables, x) -> logits`, the model in inference mode.
      stochastic_apply_fn: one draw of a randomized model, or None.
      source_apply_fn: the model to craft the examples on, or None.
      mesh: devices to split batches over (default: all).
      batch_size: examples per compiled batch. What is left of a stage
        after its full batches runs in batches of batch_size / 2^k (at least
        `plan.MIN_PER_DEVICE` examples a device), so a stage left with few
        examples costs little; each of these few shapes compiles once.
    """
    checks.integer_at_least("batch_size", batch_size, 1)
    self.apply_fn = apply_fn
    self.stochastic_apply_fn = stochastic_apply_fn
    self.source_apply_fn = source_apply_fn
    self.mesh = mesh or parallel.mesh()
    self.batch_size = batch_size
    self._predict: Callable | None = None
    self._attack_programs: dict[tuple, Callable] = {}

  @property
  def devices(self) -> int:
    """The number of devices a batch is split over."""
    return int(self.mesh.devices.size)

  def batch(self, n: int) -> int:
    """The compiled batch for `n` examples: `batch_size` or less, a multiple of the devices."""
    return self.devices * math.ceil(min(self.batch_size, n) / self.devices)

  def attack_program(self, stage: attacks_lib.Attack, staged: bool, keep: bool) -> Callable:
    """The program of a round of `stage` (`programs.attack_program`), built once.

    Args:
      stage: an attack, or a stage of a staged one; its eps does not matter.
      staged: whether it is a stage of a staged attack.
      keep: whether the program returns the adversarial examples too.

    Returns:
      The jitted program, the same object for every call with equal arguments.
    """
    key = (programs.program_key(stage), staged, keep)
    if key not in self._attack_programs:
      self._attack_programs[key] = programs.attack_program(
        self.apply_fn,
        self.source_apply_fn,
        self.stochastic_apply_fn,
        key[0],
        self.mesh,
        staged,
        keep,
      )
    return self._attack_programs[key]

  def predictions(self, variables: Variables, x: Images | np.ndarray) -> np.ndarray:
    """The model's classes for images `x` [N, ...], in batches split over the mesh.

    Args:
      variables: the model's variables.
      x: the images [N, ...] (numpy).

    Returns:
      int [N], the argmax of the logits.
    """
    if self._predict is None:
      self._predict = programs.predict_program(self.apply_fn, self.mesh)
    predict = self._predict
    batch = self.batch(len(x))
    out: list[np.ndarray] = []
    batches = data.eval_batches(x, np.zeros(len(x), np.int32), batch, multiple_of=batch)
    cascade.pipelined(
      batches,
      lambda b: predict(variables, data.to_devices(b[0], self.mesh)),
      lambda b, classes: out.append(np.asarray(classes)[b[2]]),
    )
    return np.concatenate(out)

  def run(
    self,
    variables: Variables,
    x: Images,
    y: Labels,
    attacks: plan.AttackSpecs,
    *,
    key: PRNGKey,
    source_variables: Variables | None = None,
    individual: bool = False,
    state_path: str | Path | None = None,
    log: Callable[[str], Any] | None = None,
    return_adversarial: bool = False,
  ) -> tuple[np.ndarray, dict[str, Outcome]]:
    """Runs the cascade of attacks.

    Args:
      variables: the model's variables.
      x: images in [0, 1] [N, ...] (numpy).
      y: labels [N] (numpy).
      attacks: `{label: Attack or spec}`, in order.
      key: PRNG key of the attacks.
      source_variables: the variables of `source_apply_fn` (transfer).
      individual: run every attack on all clean-correct examples, not only
        on those the attacks of its threat model before it left robust.
      state_path: a file to write the progress to (at most every
        `state.SAVE_SECONDS`, and when the run ends or is interrupted), and
        to resume from (refused if it belongs to another evaluation).
      log: optional `log(message)` for progress lines.
      return_adversarial: keep each fooled example's adversarial image
        (`Outcome.x_adv`).

    Returns:
      `(clean, outcomes)`: bool [N], the examples classified correctly
      clean, and `{label: Outcome}`.
    """
    checks.check_images(x)
    images, labels = np.asarray(x), np.asarray(y)
    checks.check_labels(labels, len(images))
    inference.check_apply_fn(self.apply_fn, variables, images[:1])
    if self.source_apply_fn is not None:
      checks.require(
        source_variables is not None,
        "this Evaluator crafts on a source model: pass its source_variables",
      )
      inference.check_apply_fn(self.source_apply_fn, source_variables, images[:1])
    attack_fns = plan.build_attacks(attacks)
    print_of = log or (lambda message: None)
    state = State(
      state_path,
      fingerprint(variables, images, labels, attack_fns, key, source_variables, individual),
    )
    try:
      clean = state.get("clean")
      if clean is None:
        clean = self.predictions(variables, images) == labels
        state.put("clean", clean)
      if self.stochastic_apply_fn is None and any(a.stochastic for a in attack_fns.values()):
        print_of("warning: attacks with EOT on a deterministic model: every draw is the same")
      context = cascade.Context(
        self, variables, source_variables, images, labels, state, print_of, return_adversarial
      )
      outcomes = cascade.run_attacks(context, clean, attack_fns, key, individual)
    finally:
      state.flush()
    return clean, outcomes

  def evaluate(
    self,
    variables: Variables,
    x: Images,
    y: Labels,
    attacks: plan.AttackSpecs,
    *,
    key: PRNGKey,
    individual: bool = False,
    return_adversarial: bool = False,
    **options: Any,
  ) -> dict[str, Any] | tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Runs the attacks (`run`, which takes the same arguments) and returns the report.

    Args:
      variables: the model's variables.
      x: images in [0, 1] [N, ...] (numpy).
      y: labels [N] (numpy).
      attacks: `{label: Attack or spec}`, in order.
      key: PRNG key of the attacks.
      individual: as in `run`.
      return_adversarial: also return the adversarial examples.
      **options: the other arguments of `run`.

    Returns:
      The report (`summary.report`), with "seconds", the time it took; with
      `return_adversarial`, `(report, {label: outcome.adversarial(...)})`.
    """
    began = time.perf_counter()
    attack_fns = plan.build_attacks(attacks)
    clean, outcomes = self.run(
      variables,
      x,
      y,
      attack_fns,
      key=key,
      individual=individual,
      return_adversarial=return_adversarial,
      **options,
    )
    rep = summary.report(clean, outcomes, attack_fns, individual=individual)
    rep["seconds"] = time.perf_counter() - began
    if not return_adversarial:
      return rep
    return rep, {label: adversarial(outcomes[label], a) for label, a in attack_fns.items()}
