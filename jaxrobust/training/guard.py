"""A guard against catastrophic overfitting (Wong et al. 2020, Section 5.2).

FGSM adversarial training can overfit catastrophically: within an epoch,
accuracy under PGD collapses towards 0 while accuracy under FGSM soars.
Wong et al. check PGD accuracy on a training minibatch after every epoch and
stop when it falls by more than 0.2 from the previous epoch, keeping the
model of the previous epoch. The run's `overfit_guard` config does the same:

  robust accuracy a_e: PGD-`steps` L-infinity (eps of `train_attack`, step
    eps / 4, one random start) on the first `examples` training images, in
    inference mode, after epoch e;
  collapse: a_e < a_{e-1} - `max_drop` (0.2 in the paper).

While the guard holds, the end of every epoch is checkpointed (the last good
model). When it fires, training stops: the checkpoints written after the last
good epoch are moved aside to `checkpoints/overfit-<step>`, so the newest
checkpoint (what eval.py evaluates) is the last good one; `overfit_guard.json`
in the workdir records every check and the stop, a rerun of the same command
does not train further, and the log says so.
"""

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import linen as nn

from jaxrobust import attacks, checks, data, models
from jaxrobust.training import checkpoints
from jaxrobust.types import Variables

GUARD_FILE = "overfit_guard.json"
PREFIX = "overfit-"
DEFAULTS = {"examples": 256, "steps": 5, "max_drop": 0.2, "eps": None}


def settings(cfg: Any, attack_cfg: Any) -> dict[str, Any] | None:
  """The checked guard settings of config entry `overfit_guard`.

  Args:
    cfg: the entry (`examples`, `steps`, `max_drop`, `eps`), or None.
    attack_cfg: the run's `train_attack` (its eps is the default eps).

  Returns:
    The settings with their defaults, or None (no guard).
  """
  if cfg is None:
    return None
  cfg = dict(cfg)
  checks.known_keys("overfit_guard", cfg, DEFAULTS)
  cfg = {**DEFAULTS, **cfg}
  checks.integer_at_least("overfit_guard.examples", cfg["examples"], 1)
  checks.integer_at_least("overfit_guard.steps", cfg["steps"], 1)
  checks.in_interval("overfit_guard.max_drop", cfg["max_drop"], 0.0, 1.0)
  if cfg["eps"] is None:
    checks.require(
      attack_cfg is not None and "eps" in attack_cfg,
      "overfit_guard needs an eps: set overfit_guard.eps or train_attack.eps",
    )
    cfg["eps"] = attack_cfg["eps"]
  checks.positive("overfit_guard.eps", cfg["eps"])
  return cfg


def make_check(
  model: nn.Module, x: np.ndarray, y: np.ndarray, cfg: Mapping[str, Any], seed: int
) -> Callable[[Variables], jax.Array]:
  """PGD accuracy of `model` on a fixed batch under the guard's attack.

  Args:
    model: the model (built without a batch axis).
    x: images; the first `cfg["examples"]` are used.
    y: their labels.
    cfg: the guard's settings (`settings`).
    seed: the run's seed (the attack's key is `fold_in(key(seed), 2)`).

  Returns:
    `check(variables) -> accuracy`, a jitted function (a device scalar).
  """
  attack = attacks.pgd(norm="linf", eps=cfg["eps"], step_size=cfg["eps"] / 4, steps=cfg["steps"])
  apply_fn = models.inference_fn(model)
  xs, ys = data.as_float(x[: cfg["examples"]]), jnp.asarray(y[: cfg["examples"]])
  key = jax.random.fold_in(jax.random.key(seed), 2)

  @jax.jit
  def check(variables):
    logits_fn = lambda xb: apply_fn(variables, xb)
    x_adv = attack(logits_fn, xs, ys, key)
    return jnp.mean(jnp.argmax(logits_fn(x_adv), -1) == ys)

  return check


def collapsed(previous: float | None, current: float, max_drop: float) -> bool:
  """Whether robust accuracy fell by more than `max_drop` since the last check.

  Args:
    previous: the last check's accuracy (None: no check yet).
    current: this check's.
    max_drop: the largest fall allowed.

  Returns:
    `current < previous - max_drop`.
  """
  return previous is not None and current < previous - max_drop


def read(workdir: str | Path, upto_step: int) -> dict[str, Any]:
  """The guard's record for a run resumed at `upto_step`.

  Args:
    workdir: the run's workdir.
    upto_step: the step it resumes from.

  Returns:
    Its checks up to that step, and the stop if the guard stopped it there.
  """
  path = Path(workdir) / GUARD_FILE
  record = json.loads(path.read_text()) if path.exists() else {"checks": []}
  record["checks"] = [c for c in record["checks"] if c["step"] <= upto_step]
  if record.get("stopped", {}).get("last_good_step") != upto_step:
    record.pop("stopped", None)
  return record


def write(workdir: str | Path, record: Mapping[str, Any]) -> None:
  """Writes the guard's `record` to `overfit_guard.json` in `workdir`."""
  checkpoints.write_atomic(Path(workdir) / GUARD_FILE, json.dumps(record, indent=1))


def stop(mgr: ocp.CheckpointManager, record: dict[str, Any], step: int, accuracy: float) -> str:
  """Records the stop and moves aside the checkpoints after the last good check.

  Args:
    mgr: the run's checkpoints.
    record: the guard's record (updated).
    step: the step it stops at.
    accuracy: the accuracy that collapsed.

  Returns:
    The message to log.
  """
  good = record["checks"][-1]
  for saved in sorted(mgr.all_steps()):
    if saved > good["step"]:
      checkpoints.move_aside(mgr, saved, PREFIX)
  record["stopped"] = {"step": step, "robust_accuracy": accuracy, "last_good_step": good["step"]}
  return (
    f"catastrophic overfitting: PGD accuracy on the guard's training batch fell "
    f"from {good['robust_accuracy']:.3f} (step {good['step']}) to {accuracy:.3f} at "
    f"step {step}; training stopped, keeping the last good checkpoint (step "
    f"{good['step']}); later checkpoints moved to checkpoints/{PREFIX}<step>"
  )


class Guard:
  """The guard of a run being trained: its record, its check, the last accuracy.

  Args:
    workdir: the run's workdir.
    record: the record the run resumes with (`read`).
    check: `check(variables) -> accuracy` (`make_check`); None for a run
      the guard stopped.
    max_drop: the guard's `max_drop`.
    primary: whether this process writes the record.
  """

  def __init__(
    self,
    workdir: Path,
    record: dict[str, Any],
    check: Callable[[Variables], jax.Array] | None,
    max_drop: float,
    *,
    primary: bool,
  ) -> None:
    self.workdir, self.record, self.check = workdir, record, check
    self.max_drop, self.primary = max_drop, primary
    self.previous = record["checks"][-1]["robust_accuracy"] if record["checks"] else None

  @property
  def stopped(self) -> bool:
    """Whether the guard stopped the run."""
    return "stopped" in self.record

  def after_epoch(
    self, variables: Variables, step: int, mgr: ocp.CheckpointManager
  ) -> tuple[float, str | None]:
    """Checks the model at an epoch's end.

    Args:
      variables: the model's variables.
      step: the step.
      mgr: the run's checkpoints (moved aside when the guard fires).

    Returns:
      (accuracy, None), or (accuracy, the message to log) when the guard
      fires: the record then holds the stop.
    """
    assert self.check is not None, "the guard stopped this run"
    accuracy = float(self.check(variables))
    message = None
    if collapsed(self.previous, accuracy, self.max_drop):
      message = stop(mgr, self.record, step, accuracy)
    else:
      self.previous = accuracy
      self.record["checks"].append({"step": step, "robust_accuracy": accuracy})
    if self.primary:
      write(self.workdir, self.record)
    return accuracy, message
