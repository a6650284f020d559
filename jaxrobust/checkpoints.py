"""Checkpoints of a run's TrainState with orbax-checkpoint, and the run's config.

A workdir holds `config.json` (the resolved config that made the run) and
`checkpoints/<step>/` written atomically by orbax's CheckpointManager. A
workdir belongs to one config: `claim_workdir` refuses a different one, so
nothing of another run is ever overwritten.
"""
import json
import os
import tempfile
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from jaxrobust import checks

CONFIG_FILE = "config.json"


def write_atomic(path, text):
  """Writes `text` to `path` through a temporary file and a rename."""
  path = Path(path)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
  with os.fdopen(fd, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def check_workdir(workdir):
  """The workdir as a Path; refuses a path that exists and is not a directory."""
  workdir = Path(workdir)
  checks.require(not workdir.exists() or workdir.is_dir(),
                 f"workdir {str(workdir)!r} exists and is not a directory")
  return workdir


def claim_workdir(workdir, config_dict):
  """Creates `workdir` for a run of `config_dict`, or checks it holds that run.

  Raises InputError if the workdir holds a run of a different config (naming
  the first differing key), or cannot be written.
  """
  workdir = check_workdir(workdir)
  saved = load_config(workdir, required=False)
  if saved is not None:
    diff = first_difference(saved, config_dict)
    checks.require(diff is None,
                   f"workdir {str(workdir)!r} holds a run of a different config "
                   f"({diff}); use a new --workdir or the same config")
    return workdir
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    write_atomic(workdir / CONFIG_FILE, json.dumps(config_dict, indent=2, sort_keys=True))
  except OSError as e:
    raise checks.InputError(f"cannot write to workdir {str(workdir)!r}: {e.strerror}") from None
  return workdir


def load_config(workdir, required=True):
  """The config dict saved in `workdir`, or None if absent and not `required`."""
  path = Path(workdir) / CONFIG_FILE
  if not path.exists():
    checks.require(not required, f"no training run in {str(workdir)!r} "
                   f"({CONFIG_FILE} not found); train one with train.py --workdir")
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


def manager(workdir, *, every_steps=None, keep=3):
  """An orbax CheckpointManager over `<workdir>/checkpoints`, keeping the last `keep`.

  Saves are synchronous so that a finished `save` is on disk.
  """
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, save_interval_steps=every_steps or 1,
      enable_async_checkpointing=False, create=True)
  return ocp.CheckpointManager(Path(workdir).absolute() / "checkpoints", options=options)


def save(mgr, state, force=False):
  """Saves `state` at its step (when the interval says so, or `force`)."""
  return mgr.save(int(state.step), args=ocp.args.StandardSave(state), force=force)


def restore_latest(mgr, target):
  """The newest checkpoint restored into the structure, shapes and shardings of
  `target` (arrays or `jax.ShapeDtypeStruct`s), or None if there is none."""
  step = mgr.latest_step()
  if step is None:
    return None
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  try:
    return mgr.restore(step, args=ocp.args.StandardRestore(abstract))
  except Exception as e:  # orbax raises many types for unreadable or mismatched data
    raise checks.InputError(
        f"cannot restore checkpoint {str(mgr.directory / str(step))!r}: "
        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
