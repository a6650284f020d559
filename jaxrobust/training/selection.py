"""The best checkpoint by validation robust accuracy (Rice et al. 2020).

Adversarial training overfits robustly: the test robust accuracy of PGD-AT
peaks soon after the first learning-rate decay and then falls. With `eval.every_epochs` = k > 0, the
last `eval.validation_examples` images of the training set are held out (the
run trains on the others; the test set is never looked at), and after every
k-th epoch the model (its EMA when kept) is attacked with PGD-10 L-infinity
(eps of `eval.attacks.pgd_linf`, step eps / 4, one random start) on them.
The accuracy is logged (`val_robust_accuracy` in metrics.jsonl) and the
model of the highest so far (the earlier on ties) is saved to
`checkpoints/best/<step>` beside the newest checkpoints; `best.json` in the
workdir holds every check and the best. `eval.py` evaluates the best
checkpoint when there is one (`--checkpoint best|latest`).
"""

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp

from jaxrobust import checks
from jaxrobust.training import checkpoints, finite
from jaxrobust.training.state import for_evaluation
from jaxrobust.types import Variables

BEST_DIR = "checkpoints/best"
BEST_FILE = "best.json"
STEPS = 10


def settings(eval_cfg: Mapping[str, Any], train_examples: int | None) -> tuple[int, int]:
  """The checked settings of the best checkpoint.

  Args:
    eval_cfg: the config's `eval` (`every_epochs`, `validation_examples`).
    train_examples: the training set's size (None: not known yet).

  Returns:
    (every_epochs, validation_examples); every_epochs 0: off.
  """
  every = checks.integer_at_least("eval.every_epochs", eval_cfg.get("every_epochs", 0), 0)
  size = checks.integer_at_least(
    "eval.validation_examples", eval_cfg.get("validation_examples", 0), 0
  )
  if every:
    checks.require(
      size >= 1,
      "eval.validation_examples must be >= 1 when "
      f"eval.every_epochs is {every} (the best checkpoint needs a validation "
      f"slice), got {size}",
    )
    if train_examples is not None:
      checks.require(
        size < train_examples,
        f"eval.validation_examples {size} must be smaller than the "
        f"{train_examples} training examples",
      )
  return every, size


def split(dataset: Any, size: int) -> tuple[Any, Any]:
  """The data set's training part and validation slice.

  Args:
    dataset: a `data.Dataset`.
    size: the validation slice's size.

  Returns:
    (training part, validation slice): the last `size` examples held out.
  """
  x, y = dataset
  cut = len(x) - size
  make = type(dataset)
  return (
    make(x[:cut], y[:cut], dataset.num_classes, dataset.class_names),
    make(x[cut:], y[cut:], dataset.num_classes, dataset.class_names),
  )


def manager(workdir: str | Path, *, read_only: bool = False) -> ocp.CheckpointManager:
  """The manager of `checkpoints/best` (one checkpoint kept)."""
  return checkpoints.manager(
    workdir, keep=1, read_only=read_only, directory=Path(workdir) / BEST_DIR
  )


def read(workdir: str | Path, upto_step: int) -> dict[str, Any]:
  """The record of a run resumed at `upto_step`.

  Args:
    workdir: the run's workdir.
    upto_step: the step it resumes from.

  Returns:
    Its checks up to that step and the best among them.
  """
  path = Path(workdir) / BEST_FILE
  record = json.loads(path.read_text()) if path.exists() else {"checks": []}
  record["checks"] = [c for c in record["checks"] if c["step"] <= upto_step]
  record["best"] = best_of(record["checks"])
  return record


def best_of(checks_so_far: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
  """The check of highest accuracy, the earliest on ties; None if none."""
  best = None
  for c in checks_so_far:
    if best is None or c["val_robust_accuracy"] > best["val_robust_accuracy"]:
      best = c
  return best


def write(workdir: str | Path, record: Mapping[str, Any]) -> None:
  """Writes the `record` to `best.json` in `workdir`."""
  checkpoints.write_atomic(Path(workdir) / BEST_FILE, json.dumps(record, indent=1))


def has_best(workdir: str | Path) -> bool:
  """Whether `workdir` holds a best checkpoint."""
  mgr_dir = Path(workdir) / BEST_DIR
  return mgr_dir.is_dir() and any(p.name.isdigit() for p in mgr_dir.iterdir())


def choose(workdir: str | Path, requested: str | None) -> str:
  """Which checkpoint to evaluate.

  Args:
    workdir: the run's workdir.
    requested: "best", "latest" or None.

  Returns:
    `requested`, or by default "best" when one exists, else "latest".
  """
  if requested is None:
    return "best" if has_best(workdir) else "latest"
  checks.one_of("--checkpoint", requested, ("best", "latest"))
  if requested == "best":
    checks.require(
      has_best(workdir),
      f"no best checkpoint in {str(workdir)!r}; train "
      "with eval.every_epochs > 0 (and eval.validation_examples) to keep one, "
      "or use --checkpoint latest",
    )
  return requested


class BestCheckpoint(NamedTuple):
  """The best checkpoint of a run being trained.

  Attributes:
    every: validate after every `every`-th epoch.
    workdir: the run's workdir.
    record: the record the run resumes with (`read`), updated.
    check: `check(variables) -> accuracy` on the validation slice.
    mgr: the manager of `checkpoints/best`.
    primary: whether this process writes the record.
  """

  every: int
  workdir: Path
  record: dict[str, Any]
  check: Callable[[Variables], jax.Array]
  mgr: ocp.CheckpointManager
  primary: bool

  def after_validation(self, state: Any, step: int) -> float:
    """Validates the model (its EMA when kept); saves it when it is the best.

    Args:
      state: the TrainState.
      step: its step.

    Returns:
      The validation robust accuracy.
    """
    accuracy = float(self.check(for_evaluation(state).variables))
    history = self.record["checks"]
    history.append({"step": step, "val_robust_accuracy": accuracy})
    if best_of(history) is history[-1]:
      finite.save_checkpoint(self.mgr, state, step)
    self.record["best"] = best_of(history)
    if self.primary:
      write(self.workdir, self.record)
    return accuracy
