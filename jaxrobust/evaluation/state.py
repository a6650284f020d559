"""The resumable progress of an evaluation: a .npz file and the evaluation it belongs to.

The file holds the clean predictions and each attack's `Outcome` so far,
and a fingerprint of what the result depends on (the model's variables, the
data, the attacks, the key, the mode); a file of another evaluation is
refused. It is rewritten whole and atomically, at most every
`SAVE_SECONDS`, and once more when the evaluation ends or is interrupted,
so the bytes written grow with the time an evaluation takes, not with its
number of batches.
"""

import contextlib
import hashlib
import json
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxrobust import attacks as attacks_lib
from jaxrobust import checks
from jaxrobust.evaluation.outcome import FIELDS, Outcome
from jaxrobust.types import Variables

# The state file is rewritten at most this often (and when the evaluation ends).
SAVE_SECONDS = 5.0
# The layout of the state file: 2 records each round of a stage (`rounds`).
STATE_FORMAT = 2


def fingerprint(
  variables: Variables,
  x: np.ndarray,
  y: np.ndarray,
  attack_fns: dict[str, attacks_lib.Attack],
  key: jax.Array,
  source_variables: Variables | None,
  individual: bool,
) -> dict[str, Any]:
  """What an evaluation's result depends on, to refuse a state file of another.

  Args:
    variables: the model's variables.
    x: the images [N, ...].
    y: the labels [N].
    attack_fns: `{label: Attack}`.
    key: the attacks' PRNG key.
    source_variables: the variables of the model the examples are crafted
      on (transfer); None without one.
    individual: whether every attack runs on every clean-correct example.

  Returns:
    A JSON-ready dict of digests and settings.
  """
  leaves = jax.tree.leaves(jax.device_get(variables))
  if source_variables is not None:
    leaves += jax.tree.leaves(jax.device_get(source_variables))
  return {
    "model": _digest(*leaves),
    "data": _digest(x, y),
    "attacks": json.dumps({l: a.spec for l, a in attack_fns.items()}, sort_keys=True, default=str),
    "key": _digest(np.asarray(jax.random.key_data(key))),
    "mode": "individual" if individual else "cascade",
    "format": STATE_FORMAT,
  }


class State:
  """The progress of an evaluation, kept in a .npz file (None path: in memory only).

  `save` takes an attack's outcome after each batch and writes the file
  when `SAVE_SECONDS` have passed since the last write; `flush` writes what
  is not written yet, unless an outcome is being changed (`changing`): an
  interruption in the middle of a change leaves the last consistent file.
  """

  def __init__(self, path: str | Path | None, fingerprint_: dict[str, Any]) -> None:
    """Opens the state, reading the file if there is one.

    Args:
      path: the .npz file; None: keep nothing.
      fingerprint_: the evaluation's `fingerprint`; a file with another one
        is refused (`InputError`).
    """
    self.path = None if path is None else Path(path)
    self.fingerprint = fingerprint_
    self.arrays: dict[str, np.ndarray] = {}
    self.outcomes: dict[str, Outcome] = {}
    self.writes = 0
    self._written = time.monotonic()
    self._dirty = False
    self._consistent = True
    if self.path is not None and self.path.exists():
      self.arrays = _read(self.path, fingerprint_)

  def get(self, name: str) -> np.ndarray | None:
    """The array `name` of the state (None if it has none)."""
    return self.arrays.get(name)

  def put(self, name: str, value: np.ndarray) -> None:
    """Sets the array `name`, written with the next write."""
    self.arrays[name] = value
    self._changed()

  def outcome(
    self, label: str, robust: np.ndarray, rounds: int, x: np.ndarray | None = None
  ) -> Outcome:
    """The outcome of attack `label` so far: the saved one, or a fresh one.

    Args:
      label: the attack's label.
      robust: bool [N], the examples it starts from (when nothing is saved).
      rounds: its number of rounds.
      x: the images [N, ...] when the adversarial examples are kept.

    Returns:
      The `Outcome`, which `save` then takes.
    """
    saved = {f: self.arrays.get(f"{label}/{f}") for f in FIELDS}
    if saved["robust"] is None:
      return Outcome.start(robust, rounds, x)
    x_adv = self.arrays.get(f"{label}/x_adv")
    if x is not None and x_adv is None:  # resumed, now keeping the adversarial images
      raise checks.InputError(
        "the evaluation state was written without the adversarial images; "
        "use another --state file or delete this one"
      )
    arrays: dict[str, Any] = {f: v for f, v in saved.items() if f != "outside_ball"}
    return Outcome(
      **arrays,
      outside_ball=int(np.asarray(saved["outside_ball"])),
      x_adv=None if x is None else x_adv,
    )

  @contextlib.contextmanager
  def changing(self) -> Iterator[None]:
    """Marks an outcome as being changed: `flush` writes nothing meanwhile.

    Left by an exception, the state stays marked, and `flush` keeps the
    file as it was.
    """
    self._consistent = False
    yield
    self._consistent = True

  def save(self, label: str, outcome: Outcome) -> None:
    """Takes attack `label`'s outcome; writes the file if it is due."""
    self.outcomes[label] = outcome
    self._changed()

  def flush(self) -> None:
    """Writes what is not written yet (when no outcome is half changed)."""
    if self.path is not None and self._dirty and self._consistent:
      self._write()

  def _changed(self):
    self._dirty = True
    if time.monotonic() - self._written >= SAVE_SECONDS:
      self.flush()

  def _write(self):
    for label, outcome in self.outcomes.items():
      for f in FIELDS:
        self.arrays[f"{label}/{f}"] = np.asarray(getattr(outcome, f))
      if outcome.x_adv is not None:
        self.arrays[f"{label}/x_adv"] = outcome.x_adv
    self._dirty = False
    self._written = time.monotonic()
    assert self.path is not None
    self.path.parent.mkdir(parents=True, exist_ok=True)
    tmp = self.path.with_name(f".{self.path.name}.tmp")
    with open(tmp, "wb") as f:
      np.savez(f, __fingerprint__=json.dumps(self.fingerprint), **self.arrays)
    tmp.replace(self.path)
    self.writes += 1


def _digest(*arrays):
  sha = hashlib.sha256()
  for a in arrays:
    a = np.ascontiguousarray(a)
    sha.update(f"{a.shape}{a.dtype}".encode())
    sha.update(a.tobytes())
  return sha.hexdigest()[:16]


def _read(path, fingerprint_):
  """The arrays of the state file `path`, refused unless its fingerprint is `fingerprint_`."""
  try:
    with np.load(path, allow_pickle=False) as archive:
      arrays = {k: archive[k] for k in archive.files}
    saved = json.loads(str(arrays.pop("__fingerprint__")))
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
    raise checks.InputError(
      f"{str(path)!r} is not an evaluation state file (written by --state / state_path); "
      "use another --state file or delete this one"
    ) from None
  for what in ("format", "model", "data", "attacks", "key", "mode"):
    checks.require(
      saved.get(what) == fingerprint_[what],
      f"the evaluation state {str(path)!r} belongs to another evaluation "
      f"(its {what} differs); use another --state file or delete this one",
    )
  return arrays
