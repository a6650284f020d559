"""A run's workdir and its config: claimed by one config, written atomically.

A workdir holds `config.json`, the resolved config that made the run. A
workdir belongs to one config: `claim_workdir` refuses a different one, so
nothing of another run is ever overwritten.
"""

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jaxrobust import checks

CONFIG_FILE = "config.json"


def write_atomic(path: str | Path, text: str | bytes) -> None:
  """Writes `text` to `path` through a temporary file and a rename.

  Args:
    path: the file.
    text: str, or bytes.

  Raises:
    InputError: naming `path` if it cannot be written.
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


def check_workdir(workdir: str | Path, *, writable: bool = False) -> Path:
  """The workdir as a Path; refuses a path that exists and is not a directory.

  Args:
    workdir: the path.
    writable: also refuse a workdir that cannot be created or written: its
      nearest existing ancestor must be a directory this process may write.

  Returns:
    `Path(workdir)`.
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


def claim_workdir(
  workdir: str | Path, config_dict: Mapping[str, Any], *, write: bool = True
) -> Path:
  """Creates `workdir` for a run of `config_dict`, or checks it holds that run.

  Args:
    workdir: the path.
    config_dict: the resolved config.
    write: False (the other processes of a multi-process run): only check.

  Returns:
    `Path(workdir)`.

  Raises:
    InputError: the workdir holds a run of a different config (naming the
      first differing key), or cannot be written.
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


def load_config(workdir: str | Path, required: bool = True) -> Any:
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


def first_difference(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> str | None:
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
