"""RobustBench's model zoo by name: each entry's architecture, threat model and leaderboard numbers.

`ENTRIES` (`table`, generated from RobustBench's repository) lists every
entry of CIFAR-10 (L-inf, L2, corruptions), CIFAR-100 and ImageNet. An
entry is named `"<dataset>/<threat>/<name>"` (RobustBench's checkpoint
path, `models/cifar10/Linf/Carmon2019Unlabeled.pt`), or by its bare name
where that is unique. `status` says whether jaxrobust loads it,
`load_entry` converts its checkpoint (`interop.from_torch`; or reads the
flax checkpoint `export_entry` wrote, without PyTorch), and
`evaluate_entry` runs AutoAttack on it and sets the leaderboard's number
beside ours.
"""

import math
import re
from collections.abc import Callable, Sequence
from os import PathLike
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import numpy as np

from jaxrobust import checks, interop
from jaxrobust.interop import flax_files
from jaxrobust.types import Variables
from jaxrobust.zoo.table import ENTRIES, Entry

# The data source (`data.load`) of each data set's test split.
DATA = {"cifar10": "tfds:cifar10", "cifar100": "tfds:cifar100", "imagenet": "tfds:imagenet2012"}
NORMS = {"Linf": "linf", "L2": "l2"}


def key(entry: Entry) -> str:
  """`"<dataset>/<threat>/<name>"`, the entry's unique name."""
  return f"{entry.dataset}/{entry.threat}/{entry.name}"


def find(name: str) -> Entry:
  """The entry named `name`.

  Args:
    name: `"<dataset>/<threat>/<name>"`, a checkpoint path ending in it
      (`models/cifar10/Linf/<name>.pt`), or a bare name held by one entry.

  Returns:
    The `Entry`.

  Raises:
    InputError: no such entry, or a bare name several entries hold.
  """
  checks.require(isinstance(name, str) and name, f"a zoo entry is a name, got {name!r}")
  stem = re.sub(r"\.(pt|pth|safetensors)$", "", name)
  exact = [e for e in ENTRIES if stem.endswith(key(e))]
  if exact:
    return exact[0]
  same = [e for e in ENTRIES if e.name == stem]
  checks.require(
    len(same) == 1,
    f"zoo entry {name!r} is held by {', '.join(key(e) for e in same)}: name one"
    if same
    else f"no zoo entry {name!r}; `jaxrobust-eval --zoo list` lists them",
  )
  return same[0]


def status(name: str) -> str:
  """Whether jaxrobust loads entry `name`, and if not, why.

  Args:
    name: an entry (see `find`).

  Returns:
    "loads as <arch>", or "not supported: RobustBench builds it with <X>,
    an architecture jaxrobust lacks".
  """
  entry = find(name)
  if entry.arch is not None:
    return f"loads as {entry.arch}"
  return (
    f"not supported: RobustBench builds it with {entry.missing}, an architecture jaxrobust lacks"
  )


def coverage(
  datasets: Sequence[str] | None = None, threats: Sequence[str] | None = None
) -> dict[str, tuple[int, int]]:
  """How many entries load, per data set and threat model.

  Args:
    datasets: the data sets to count (default: all).
    threats: the threat models to count (default: all).

  Returns:
    `{"<dataset>/<threat>": (loadable, total)}` in the table's order.
  """
  counts: dict[str, tuple[int, int]] = {}
  for e in ENTRIES:
    if (datasets and e.dataset not in datasets) or (threats and e.threat not in threats):
      continue
    done, total = counts.get(f"{e.dataset}/{e.threat}", (0, 0))
    counts[f"{e.dataset}/{e.threat}"] = (done + (e.arch is not None), total + 1)
  return counts


def format_list() -> str:
  """The table of every entry with its status, for `jaxrobust-eval --zoo list`.

  Returns:
    One line per entry (name, eps, leaderboard's clean and robust accuracy,
    status), then the counts of `coverage`.
  """
  lines = [f"{'entry':62} {'eps':>7} {'clean':>6} {'robust':>6}  status"]
  for e in ENTRIES:
    clean = "-" if e.clean is None else f"{e.clean:.2f}"
    robust = "-" if e.robust is None else f"{e.robust:.2f}"
    lines.append(f"{key(e):62} {e.eps or '-':>7} {clean:>6} {robust:>6}  {status(key(e))}")
  lines.append("")
  for group, (done, total) in coverage().items():
    lines.append(f"{group}: {done} of {total} load ({100 * done / total:.0f} %)")
  return "\n".join(lines)


def eps(entry: Entry) -> float:
  """The entry's radius as a number ("8/255" -> 0.0314...).

  Raises:
    InputError: a corruptions entry (no radius).
  """
  checks.require(entry.eps is not None, f"zoo entry {key(entry)} has no radius (corruptions)")
  assert entry.eps is not None
  num, _, den = entry.eps.partition("/")
  return float(num) / float(den or 1)


def architecture(entry: Entry) -> tuple[str, dict[str, Any]]:
  """The `interop.from_torch` architecture and settings of a loadable entry.

  Returns:
    `(arch, settings)`: settings hold `mean` and `std` when the entry
    records them (its constructor's, or the `mu` and `sigma` its class
    registers, which apply to a file without them; a file holding them must
    agree, see `interop.from_torch`).

  Raises:
    InputError: an entry jaxrobust does not load (`status` says why).
  """
  checks.require(entry.arch is not None, f"zoo entry {key(entry)} is {status(key(entry))}")
  assert entry.arch is not None
  settings: dict[str, Any] = {}
  if isinstance(entry.normalisation, list):
    settings = {"mean": tuple(entry.normalisation[0]), "std": tuple(entry.normalisation[1])}
  return entry.arch, settings


def _branch_files(path: str | PathLike) -> str | PathLike | list[Path]:
  """An ensemble's files, one a branch: `<entry>_m0.pt`, `_m1.pt`, `_m2.pt` for
  `<entry>.pt` that does not exist or for `<entry>_m<i>.pt`; else `path`."""
  file = Path(path)
  stem = re.sub(r"_m\d+$", "", file.stem)
  first = file.with_name(f"{stem}_m0{file.suffix}")
  if (file.stem == stem and file.exists()) or not first.exists():
    return path
  return [file.with_name(f"{stem}_m{i}{file.suffix}") for i in range(3)]


def load_entry(name: str, checkpoint: Any) -> tuple[nn.Module, Variables]:
  """The jaxrobust model and variables of entry `name`'s checkpoint.

  Args:
    name: an entry (see `find`).
    checkpoint: a checkpoint file's path, or what `interop.load_checkpoint`
      read; for an ensemble (Chen2020Adversarial), a list of them, one a
      branch, or the path of RobustBench's first (`<entry>_m0.pt`; its
      `_m1.pt` and `_m2.pt` beside it) or of `<entry>.pt` beside them; or a
      flax checkpoint's directory (`export_entry`; read without PyTorch).

  Returns:
    `(model, variables)`, `model.apply(variables, x)` on NHWC images in [0, 1].

  Raises:
    InputError: an unsupported entry, or, in one line, a checkpoint that does
      not fit it, naming the entry, the architecture and the first mismatching key
      (a flax checkpoint: the entry or architecture it holds).
  """
  entry = find(name)
  arch, settings = architecture(entry)
  if isinstance(checkpoint, str | PathLike) and Path(checkpoint).is_dir():
    return _load_exported(entry, Path(checkpoint))
  if isinstance(checkpoint, str | PathLike) and arch == "preact-resnet-50-x3":
    checkpoint = _branch_files(checkpoint)
  if isinstance(checkpoint, str | PathLike):
    checkpoint = interop.load_checkpoint(checkpoint)
  if isinstance(checkpoint, list | tuple):
    checkpoint = [
      interop.load_checkpoint(c) if isinstance(c, str | PathLike) else c for c in checkpoint
    ]
  try:
    return interop.from_torch(checkpoint, arch, **settings)
  except checks.InputError as e:
    why = str(e).split(": ", 1)[-1] if str(e).startswith("checkpoint does not fit") else str(e)
    raise checks.InputError(
      f"the checkpoint does not fit zoo entry {key(entry)} (architecture {arch}): {why}"
    ) from None


def _load_exported(entry: Entry, directory: Path) -> tuple[nn.Module, Variables]:
  """The model of a flax checkpoint of entry `entry` (or of its architecture)."""
  arch, settings = architecture(entry)
  meta = flax_files.read_metadata(directory)  # refused before the variables are read
  held = (meta.get("zoo") or {}).get("entry")
  checks.require(
    held is None or held == key(entry),
    f"flax checkpoint {str(directory)!r} holds zoo entry {held}, not {key(entry)}",
  )
  checks.require(
    meta["arch"] == arch,
    f"flax checkpoint {str(directory)!r} holds architecture {meta['arch']}; zoo entry "
    f"{key(entry)} is {arch}",
  )
  for which in ("mean", "std"):
    checks.require(
      which not in settings or np.allclose(settings[which], meta[which], rtol=1e-6, atol=0),
      f"flax checkpoint {str(directory)!r} normalises with {which} {tuple(meta[which])}; "
      f"zoo entry {key(entry)} with {settings.get(which)}",
    )
  model, variables, _ = flax_files.load(directory)
  return model, variables


def export_entry(name: str, checkpoint: Any, directory: str | PathLike[str]) -> Path:
  """Converts entry `name`'s checkpoint into a flax checkpoint, loadable without PyTorch.

  Args:
    name: an entry (see `find`).
    checkpoint: its checkpoint (see `load_entry`).
    directory: the directory to create (`interop.flax_files.save`: written
      atomically, never over an existing one).

  Returns:
    `directory` as a `Path`; its metadata records the entry's name, data set,
    threat model and eps beside the architecture and normalisation.

  Raises:
    InputError: an existing `directory`, or a checkpoint `load_entry` refuses.
  """
  entry = find(name)
  flax_files.check_new_directory(directory)
  model, variables = load_entry(name, checkpoint)
  about = dict(entry=key(entry), dataset=entry.dataset, threat=entry.threat, eps=entry.eps)
  source = None if not isinstance(checkpoint, str | PathLike) else str(checkpoint)
  return flax_files.save(
    directory, model, variables, arch=architecture(entry)[0], zoo=about, source=source
  )


class ZooResult(NamedTuple):
  """Our AutoAttack accuracy of a zoo entry beside the leaderboard's (percent).

  Attributes:
    entry: the entry's name (`key`).
    n: the number of test examples.
    clean: our clean accuracy.
    robust: our robust accuracy.
    stderr: the robust accuracy's standard error, 100 sqrt(p (1 - p) / n).
    leaderboard: the leaderboard's robust accuracy (on RobustBench's sample).
    difference: `robust - leaderboard`.
  """

  entry: str
  n: int
  clean: float
  robust: float
  stderr: float
  leaderboard: float | None
  difference: float | None

  def format(self) -> str:
    """One line: ours, the leaderboard's, the difference, n and the standard error."""
    board = "-" if self.leaderboard is None else f"{self.leaderboard:.2f} %"
    diff = "-" if self.difference is None else f"{self.difference:+.2f}"
    return (
      f"{self.entry}: AutoAttack {self.robust:.2f} % (clean {self.clean:.2f} %, n={self.n}, "
      f"standard error {self.stderr:.2f}) | leaderboard {board} | difference {diff}"
    )


def evaluate_entry(
  name: str,
  checkpoint: Any,
  *,
  x: np.ndarray | None = None,
  y: np.ndarray | None = None,
  n_examples: int = 1000,
  batch_size: int = 500,
  seed: int = 0,
  version: str = "standard",
  log: Callable[[str], Any] | None = None,
) -> ZooResult:
  """Runs AutoAttack on entry `name`'s checkpoint at the entry's threat model.

  Args:
    name: an L-inf or L2 entry (see `find`).
    checkpoint: its checkpoint (see `load_entry`: a file, what
      `interop.load_checkpoint` read, or a flax checkpoint's directory).
    x: test images in [0, 1] NHWC (default: the first `n_examples` of the
      entry's data set, `DATA`).
    y: their labels.
    n_examples: how many examples to evaluate (the first ones).
    batch_size: examples per compiled batch.
    seed: the attacks' PRNG seed.
    version: AutoAttack's version (`attacks.autoattack`).
    log: optional `log(message)` for progress lines.

  Returns:
    The `ZooResult`.

  Raises:
    InputError: a corruptions entry, an unsupported one, or a checkpoint
      that does not fit it.
  """
  from jaxrobust import attacks, data, evaluation, models  # pylint: disable=g-import-not-at-top

  entry = find(name)
  checks.require(entry.threat in NORMS, f"zoo entry {key(entry)} is not an AutoAttack entry")
  model, variables = load_entry(name, checkpoint)
  if x is None or y is None:
    test = data.load(DATA[entry.dataset], "test")
    x, y = np.asarray(test.x[:n_examples], np.float32), np.asarray(test.y[:n_examples])
  images: Any = x[:n_examples]  # numpy, as `evaluation.evaluate` takes them
  labels: Any = y[:n_examples]
  attack = attacks.autoattack(norm=NORMS[entry.threat], eps=eps(entry), version=version)
  rep = evaluation.evaluate(
    models.inference_fn(model),
    variables,
    images,
    labels,
    {"autoattack": attack},
    key=jax.random.key(seed),
    batch_size=batch_size,
    log=log,
  )
  assert isinstance(rep, dict)
  return result(entry, len(labels), rep["clean_accuracy"], rep["threat_models"][0]["accuracy"])


def result(entry: Entry, n: int, clean: float, robust: float) -> ZooResult:
  """The `ZooResult` of accuracies `clean` and `robust` (fractions) on `n` examples."""
  diff = None if entry.robust is None else 100 * robust - entry.robust
  return ZooResult(
    key(entry),
    n,
    100 * clean,
    100 * robust,
    100 * math.sqrt(robust * (1 - robust) / max(n, 1)),
    entry.robust,
    diff,
  )


__all__ = [
  "DATA",
  "ENTRIES",
  "Entry",
  "ZooResult",
  "architecture",
  "coverage",
  "eps",
  "evaluate_entry",
  "export_entry",
  "find",
  "format_list",
  "key",
  "load_entry",
  "result",
  "status",
]
