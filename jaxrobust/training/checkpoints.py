"""Checkpoints of a run's TrainState with orbax-checkpoint, and the run's config.

A workdir holds `config.json` (the resolved config that made the run) and
`checkpoints/<step>/`, written by orbax's CheckpointManager. A workdir belongs
to one config: `claim_workdir` refuses a different one, so nothing of another
run is ever overwritten.

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
workdir untouched, and says so when every checkpoint is corrupt. What orbax and
TensorStore print about a checkpoint they failed to read (tracebacks of their
background callbacks) is logged at debug level, not printed. A checkpoint whose shapes differ from the model's is not
corrupt but incompatible (the config or the code changed): that is an error.
Checkpoints written before records existed are restored unverified.
"""

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jaxrobust import checks

CONFIG_FILE = "config.json"
RECORD_KEY = "jaxrobust"  # the record's key in a step's custom metadata
STEP_METADATA_FILE = "_CHECKPOINT_METADATA"  # orbax's per-step metadata (JSON)
CORRUPT_PREFIX = "corrupt-"

_log = logging.getLogger(__name__)


class CorruptCheckpointWarning(UserWarning):
  """A checkpoint was found corrupt and skipped."""


class _Corrupt(Exception):
  """A checkpoint cannot be trusted; the message says why."""


def write_atomic(path, text):
  """Writes `text` (str, or bytes) to `path` through a temporary file and a rename.

  Raises InputError naming `path` if it cannot be written.
  """
  path = Path(path)
  try:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
      with os.fdopen(fd, "wb" if isinstance(text, bytes) else "w") as f:
        f.write(text)
      os.replace(tmp, path)
    except BaseException:
      Path(tmp).unlink(missing_ok=True)
      raise
  except OSError as e:
    raise checks.InputError(f"cannot write {str(path)!r}: {e.strerror}") from None


def check_workdir(workdir, *, writable=False):
  """The workdir as a Path; refuses a path that exists and is not a directory.

  With `writable`, also refuses a workdir that cannot be created or written:
  its nearest existing ancestor must be a directory this process may write.
  """
  workdir = Path(workdir)
  checks.require(
    not workdir.exists() or workdir.is_dir(),
    f"workdir {str(workdir)!r} exists and is not a directory",
  )
  if writable:
    existing = workdir.absolute()
    while not existing.exists():  # False also below a file: ENOTDIR
      existing = existing.parent
    checks.require(
      existing.is_dir(),
      f"cannot write to workdir {str(workdir)!r}: {str(existing)!r} is not a directory",
    )
    checks.require(
      os.access(existing, os.W_OK | os.X_OK),
      f"cannot write to workdir {str(workdir)!r}: no write permission in {str(existing)!r}",
    )
  return workdir


def claim_workdir(workdir, config_dict, *, write=True):
  """Creates `workdir` for a run of `config_dict`, or checks it holds that run.

  Raises InputError if the workdir holds a run of a different config (naming
  the first differing key), or cannot be written. With `write=False` (the
  other processes of a multi-process run) only the check is made.
  """
  workdir = check_workdir(workdir)
  saved = load_config(workdir, required=False)
  if saved is not None:
    diff = first_difference(saved, config_dict)
    checks.require(
      diff is None,
      f"workdir {str(workdir)!r} holds a run of a different config "
      f"({diff}); use a new --workdir or the same config",
    )
    return workdir
  if write:
    try:
      workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
      raise checks.InputError(f"cannot write to workdir {str(workdir)!r}: {e.strerror}") from None
    write_atomic(workdir / CONFIG_FILE, json.dumps(config_dict, indent=2, sort_keys=True))
  return workdir


def load_config(workdir, required=True):
  """The config dict saved in `workdir`, or None if absent and not `required`."""
  path = Path(workdir) / CONFIG_FILE
  if not path.exists():
    checks.require(
      not required,
      f"no training run in {str(workdir)!r} "
      f"({CONFIG_FILE} not found); train one with train.py --workdir",
    )
    return None
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise checks.InputError(f"cannot read {str(path)!r}: {e}") from None


def first_difference(a, b, prefix=""):
  """A description of the first key where nested dicts `a` and `b` differ, or None."""
  for key in sorted(set(a) | set(b)):
    name = f"{prefix}{key}"
    if key not in a or key not in b:
      return f"{name!r} is set in only one of them"
    if isinstance(a[key], dict) and isinstance(b[key], dict):
      diff = first_difference(a[key], b[key], name + ".")
      if diff:
        return diff
    elif a[key] != b[key]:
      return f"{name} = {a[key]!r} there, {b[key]!r} here"
  return None


def manager(workdir, *, keep=3, read_only=False, keep_period=None, directory=None):
  """An orbax CheckpointManager over `<workdir>/checkpoints`, keeping the last `keep`.

  Saves are synchronous, so that a finished `save` is on disk. A writing
  manager deletes the temporary directories of saves that were killed; a
  `read_only` one creates and deletes nothing (it is only used to restore;
  orbax's own read-only mode would log a warning on every evaluation).
  With `keep_period`, checkpoints at multiples of it are never deleted (the
  epoch ends that Fast-AT's overfitting guard found good). `directory`: another
  directory than `<workdir>/checkpoints` (the best checkpoint's).
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


def save(mgr, state):
  """Saves `state` at its step, with its record, unless that step is saved."""
  step = int(state.step)
  if step in mgr.all_steps():
    return False
  record = {"arrays": signature(state), "sha256": digest(state)}
  return mgr.save(
    step, args=ocp.args.StandardSave(state), custom_metadata={RECORD_KEY: record}, force=True
  )


def signature(tree):
  """`[path, shape, dtype]` of every array of `tree` (arrays or ShapeDtypeStructs)."""
  return [
    [jax.tree_util.keystr(path), list(leaf.shape), str(leaf.dtype)]
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
  ]


def digest(tree):
  """SHA-256 of the shapes, dtypes and bytes of every array of `tree`, in order.

  Arrays must be fully replicated or addressable (true of a TrainState).
  """
  sha = hashlib.sha256()
  for leaf in jax.tree.leaves(jax.device_get(tree)):
    leaf = np.ascontiguousarray(leaf)
    sha.update(f"{leaf.shape}{leaf.dtype}".encode())
    sha.update(leaf.tobytes())
  return sha.hexdigest()


def restore_latest(mgr, target, *, quarantine=False):
  """The newest intact checkpoint, restored into `target`, or None if there is none.

  `target` gives the structure, shapes and shardings (arrays or
  `jax.ShapeDtypeStruct`s). Corrupt checkpoints are skipped with a
  `CorruptCheckpointWarning` naming them; with `quarantine` they are moved
  to `checkpoints/corrupt-<step>` (by process 0), else (evaluation) an
  InputError says so when every checkpoint is corrupt. Raises InputError for
  a checkpoint that does not fit `target` (an incompatible model).
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
  """`abstract` restored from checkpoint `step`. A checkpoint written before a
  field that defaults to None was added to the state (`ema_params`) lacks
  it; when such a field is None, the others are restored on their own."""
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


def move_aside(mgr, step, prefix=CORRUPT_PREFIX):
  """Renames checkpoint `step` to `<prefix><step>` (kept, never deleted; orbax
  ignores it) and makes `mgr` forget it."""
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
