"""Checkpoints of a run's TrainState with orbax-checkpoint, and the run's config.

A workdir holds `config.json` (the resolved config that made the run, see
`workdir`) and `checkpoints/<step>/`, written by orbax's CheckpointManager.

Crash safety. Orbax writes a checkpoint into `<step>.orbax-checkpoint-tmp-*`
and renames it to `<step>` when complete, so a process killed mid-write
leaves only a temporary directory: `latest_step()` ignores it and the next
training manager deletes it (`cleanup_tmp_directories`). Each checkpoint also
carries a record in its step metadata (written inside the temporary directory,
so atomically with it): the path, shape and dtype of every array and a SHA-256
digest of their bytes. `restore_latest` tries the checkpoints newest first and
skips, with a warning naming it, any that is corrupt: its metadata is missing
or unreadable, orbax cannot restore it, or its arrays do not match the digest.
Training moves a corrupt checkpoint aside to `checkpoints/corrupt-<step>`
(kept for inspection, never deleted; orbax ignores it); evaluation leaves the
workdir untouched, and says so when every checkpoint is corrupt. What orbax
and TensorStore print about a checkpoint they failed to read (tracebacks of
their background callbacks) is logged at debug level, not printed. A
checkpoint whose shapes differ from the model's is not corrupt but
incompatible (the config or the code changed): that is an error. A checkpoint
without a record is restored unverified.
"""

import contextlib
import dataclasses
import hashlib
import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jaxrobust import checks
from jaxrobust.training.workdir import (
  CONFIG_FILE,
  check_workdir,
  claim_workdir,
  first_difference,
  load_config,
  write_atomic,
)

__all__ = [
  "CONFIG_FILE",
  "CORRUPT_PREFIX",
  "RECORD_KEY",
  "STEP_METADATA_FILE",
  "CorruptCheckpointWarning",
  "check_workdir",
  "claim_workdir",
  "digest",
  "first_difference",
  "load_config",
  "manager",
  "move_aside",
  "restore_latest",
  "save",
  "signature",
  "write_atomic",
]

RECORD_KEY = "jaxrobust"  # the record's key in a step's custom metadata
STEP_METADATA_FILE = "_CHECKPOINT_METADATA"  # orbax's per-step metadata (JSON)
CORRUPT_PREFIX = "corrupt-"

_log = logging.getLogger(__name__)


class CorruptCheckpointWarning(UserWarning):
  """A checkpoint was found corrupt and skipped."""


class _Corrupt(Exception):
  """A checkpoint cannot be trusted; the message says why."""


def manager(
  workdir: str | Path,
  *,
  keep: int | None = 3,
  read_only: bool = False,
  keep_period: int | None = None,
  directory: str | Path | None = None,
) -> ocp.CheckpointManager:
  """An orbax CheckpointManager over `<workdir>/checkpoints`.

  Saves are synchronous, so that a finished `save` is on disk. A writing
  manager deletes the temporary directories of saves that were killed.

  Args:
    workdir: the run's workdir.
    keep: keep the last `keep` checkpoints (None: all).
    read_only: create and delete nothing (only used to restore; orbax's own
      read-only mode would log a warning on every evaluation).
    keep_period: checkpoints at multiples of it are never deleted (the epoch
      ends that Fast-AT's overfitting guard found good).
    directory: another directory than `<workdir>/checkpoints` (the best
      checkpoint's).

  Returns:
    The manager.
  """
  options = ocp.CheckpointManagerOptions(
    max_to_keep=keep,
    keep_period=keep_period,
    enable_async_checkpointing=False,
    create=not read_only,
    cleanup_tmp_directories=not read_only,
  )
  directory = Path(directory or Path(workdir) / "checkpoints").absolute()
  return ocp.CheckpointManager(directory, options=options)


def save(mgr: ocp.CheckpointManager, state: Any) -> bool:
  """Saves `state` at its step, with its record, unless that step is saved.

  Args:
    mgr: the manager.
    state: a TrainState.

  Returns:
    Whether it was saved.
  """
  step = int(state.step)
  if step in mgr.all_steps():
    return False
  record = {"arrays": signature(state), "sha256": digest(state)}
  return mgr.save(
    step, args=ocp.args.StandardSave(state), custom_metadata={RECORD_KEY: record}, force=True
  )


def signature(tree: Any) -> list[list[Any]]:
  """`[path, shape, dtype]` of every array of `tree` (arrays or ShapeDtypeStructs)."""
  return [
    [jax.tree_util.keystr(path), list(leaf.shape), str(leaf.dtype)]
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
  ]


def digest(tree: Any) -> str:
  """SHA-256 of the shapes, dtypes and bytes of every array of `tree`, in order.

  Arrays must be fully replicated or addressable (true of a TrainState).
  """
  sha = hashlib.sha256()
  for leaf in jax.tree.leaves(jax.device_get(tree)):
    leaf = np.ascontiguousarray(leaf)
    sha.update(f"{leaf.shape}{leaf.dtype}".encode())
    sha.update(leaf.tobytes())
  return sha.hexdigest()


def restore_latest(mgr: ocp.CheckpointManager, target: Any, *, quarantine: bool = False) -> Any:
  """The newest intact checkpoint, restored into `target`, or None if there is none.

  Corrupt checkpoints are skipped with a `CorruptCheckpointWarning` naming
  them.

  Args:
    mgr: the manager.
    target: the structure, shapes and shardings (arrays or
      `jax.ShapeDtypeStruct`s).
    quarantine: move corrupt checkpoints to `checkpoints/corrupt-<step>` (by
      process 0); else (evaluation) say so when every checkpoint is corrupt.

  Returns:
    The restored state, or None.

  Raises:
    InputError: a checkpoint does not fit `target` (an incompatible model),
      or, without `quarantine`, every checkpoint is corrupt.
  """
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  expected = signature(abstract)
  skipped = []
  for step in sorted(mgr.all_steps(), reverse=True):
    path = mgr.directory / str(step)
    try:
      state = _restore(mgr, step, abstract, expected)
    except _Corrupt as e:
      skipped.append(f"{str(path)!r} is corrupt ({e})")
      if quarantine:
        warnings.warn(
          f"checkpoint {skipped[-1]}; moved to {CORRUPT_PREFIX}{step}, using the previous one",
          CorruptCheckpointWarning,
          stacklevel=2,
        )
        move_aside(mgr, step)
      continue
    if not quarantine:
      for corrupt in skipped:
        warnings.warn(
          f"checkpoint {corrupt}; skipped, using the previous one",
          CorruptCheckpointWarning,
          stacklevel=2,
        )
    return state
  if skipped and not quarantine:
    raise checks.InputError(
      f"no intact checkpoint in {str(mgr.directory)!r}: "
      + (
        f"its checkpoint {skipped[0]}"
        if len(skipped) == 1
        else f"all {len(skipped)} checkpoints are corrupt; the newest {skipped[0]}"
      )
      + "; train.py --workdir moves them aside and starts over"
    )
  return None


def _restore_fields(mgr, step, abstract):
  """`abstract` restored from checkpoint `step`. A checkpoint may lack a field
  of the state that defaults to None (`ema_params`): when such a field is
  None, the others are restored on their own."""
  try:
    return mgr.restore(step, args=ocp.args.StandardRestore(abstract))
  except Exception as error:  # pylint: disable=broad-except
    if not dataclasses.is_dataclass(abstract):
      raise
    present = {
      f.name: getattr(abstract, f.name)
      for f in dataclasses.fields(abstract)
      if getattr(abstract, f.name) is not None
    }
    if len(present) == len(dataclasses.fields(abstract)):
      raise
    try:
      return abstract.replace(**mgr.restore(step, args=ocp.args.StandardRestore(present)))
    except Exception:  # pylint: disable=broad-except
      raise error from None  # why the whole state could not be read


def _restore(mgr, step, abstract, expected):
  path = mgr.directory / str(step)
  record = _read_record(path)
  if record is not None:
    _check_fits(record["arrays"], expected, path)
  try:
    with _orbax_quiet():
      state = _restore_fields(mgr, step, abstract)
  except Exception as e:  # orbax raises many types for unreadable or mismatched data
    reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if record is None:  # unverified: it may as well be incompatible
      raise checks.InputError(f"cannot restore checkpoint {str(path)!r}: {reason}") from None
    raise _Corrupt(f"orbax cannot read it: {reason[:300]}") from None
  if record is not None and digest(state) != record["sha256"]:
    raise _Corrupt("its arrays do not match the SHA-256 digest saved with them")
  return state


@contextlib.contextmanager
def _orbax_quiet():
  """Orbax's log records while it restores are not printed, nor what its
  reads of a corrupt checkpoint leave behind (`_silence_failed_reads`)."""
  _silence_failed_reads()
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    logger.setLevel(level)


def _is_failed_read_noise(message):
  return "Event loop is closed" in message or "exception was never retrieved" in message


def _unraisable_hook(unraisable, previous):
  if unraisable.exc_type is RuntimeError and _is_failed_read_noise(str(unraisable.exc_value)):
    _log.debug("after a failed checkpoint read: %s", unraisable.exc_value)
  else:
    previous(unraisable)


class _FailedReadFilter(logging.Filter):
  def filter(self, record):
    if _is_failed_read_noise(record.getMessage()):
      _log.debug("after a failed checkpoint read: %s", record.getMessage())
      return False
    return True


def _silence_failed_reads():
  """When orbax fails to read a checkpoint, TensorStore's callbacks still in
  flight report to an event loop that is closed, during the restore and after
  it, and asyncio complains about their results nobody retrieved: those
  reports go to debug level (anything else still prints). Installed once, for
  the rest of the process."""
  hook = sys.unraisablehook
  if getattr(hook, "_jaxrobust_failed_reads", False):
    return
  quiet = lambda unraisable: _unraisable_hook(unraisable, hook)
  quiet._jaxrobust_failed_reads = True
  sys.unraisablehook = quiet
  logging.getLogger("asyncio").addFilter(_FailedReadFilter())


def _read_record(path):
  """The checkpoint's record; None for a checkpoint written without one."""
  try:
    metadata = json.loads((path / STEP_METADATA_FILE).read_text())
  except (OSError, ValueError) as e:  # ValueError includes UnicodeDecodeError
    raise _Corrupt(f"cannot read {STEP_METADATA_FILE}: {e}") from None
  record = (metadata.get("custom_metadata") or {}).get(RECORD_KEY)
  if record is not None and not (
    isinstance(record, dict) and "arrays" in record and "sha256" in record
  ):
    raise _Corrupt(f"its record in {STEP_METADATA_FILE} is malformed")
  return record


def _check_fits(saved, expected, path):
  """Raises InputError naming the first array where the checkpoint and model differ."""
  if saved == expected:
    return
  shown = lambda entry: f"{entry[0]} {tuple(entry[1])} {entry[2]}"
  saved_by_path = {entry[0]: entry for entry in saved}
  for entry in expected:
    if entry not in saved:
      there = saved_by_path.get(entry[0])
      problem = (
        f"it has {shown(there)} where the model has {tuple(entry[1])} {entry[2]}"
        if there
        else f"it has no array {entry[0]}"
      )
      break
  else:
    extra = next(entry for entry in saved if entry not in expected)
    problem = f"it has an array the model lacks: {shown(extra)}"
  raise checks.InputError(
    f"checkpoint {str(path)!r} does not fit the model of this run's config.json: "
    f"{problem}; it was written by a different model (was config.json edited, "
    f"or the model code changed?)"
  )


def move_aside(mgr: ocp.CheckpointManager, step: int, prefix: str = CORRUPT_PREFIX) -> None:
  """Renames checkpoint `step` to `<prefix><step>` and makes `mgr` forget it.

  The checkpoint is kept, never deleted; orbax ignores it.

  Args:
    mgr: the manager.
    step: the checkpoint's step.
    prefix: the new name's prefix.
  """
  path = mgr.directory / str(step)
  if jax.process_index() == 0:
    target = path.with_name(f"{prefix}{path.name}")
    n = 1
    while target.exists():
      n += 1
      target = path.with_name(f"{prefix}{path.name}-{n}")
    path.rename(target)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"jaxrobust: moved aside {path}")
  mgr.reload()
