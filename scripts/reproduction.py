"""What the reproduction scripts share: a row's config with its overrides, training it
(resuming a run), evaluating it, and the table rewritten after every row.

Importing it asks XLA:CPU for one device per core, before JAX starts.
"""

import argparse
import importlib
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

from jaxrobust import parallel  # noqa: E402

parallel.use_host_devices()  # before JAX starts: one XLA:CPU device per core

from jaxrobust.training import checkpoints  # noqa: E402
from jaxrobust.training import config as config_lib  # noqa: E402
from jaxrobust.training import loop as experiment  # noqa: E402
from jaxrobust.training import metrics  # noqa: E402


def selected_rows(p: argparse.ArgumentParser, rows: str, names: Sequence[str]) -> list[str]:
  """The rows of `--rows` (comma-separated, or `all`), refused unless in `names`."""
  chosen = list(names) if rows == "all" else [r.strip() for r in rows.split(",")]
  unknown = [r for r in chosen if r not in names]
  if unknown:
    p.error(f"unknown row {unknown[0]!r}; choose from {', '.join(names)}")
  return chosen


def override(config: Any, overrides: dict[str, Any]) -> Any:
  """`config` with the dotted `overrides` set, as `--config.<key>=<value>` sets them."""
  for key, value in overrides.items():
    target, _, leaf = key.rpartition(".")
    (config[target] if target else config)[leaf] = value
  return config


def packaged_config(config_name: str, setting: str) -> Any:
  """The packaged config `config_name` of `setting` (`--config <name>:<setting>`)."""
  return importlib.import_module(f"jaxrobust.configs.{config_name}").get_config(setting)


def relative(workdir: Path) -> str:
  """`workdir` relative to the repository when it lies inside it."""
  return str(workdir.relative_to(REPO) if workdir.is_relative_to(REPO) else workdir)


def train_seconds(workdir: str | Path) -> float:
  """Training time: the run's steps times the median seconds per step over its
  logged intervals, so that a resume, a paused process or a burst of load on
  a shared machine (and the first interval's compilation) do not count."""
  rows = [json.loads(l) for l in (Path(workdir) / "metrics.jsonl").read_text().splitlines() if l]
  rows = [r for r in rows if "step" in r]
  per_step = [
    sum(r.get(f, 0.0) for f in metrics.TIMING_FIELDS) / (r["step"] - before["step"])
    for before, r in zip(rows, rows[1:])
    if r["step"] > before["step"]
  ]
  return statistics.median(per_step) * rows[-1]["step"] if per_step else 0.0


def train_and_evaluate(
  config: Any, workdir: Path, *, attacks: str, limit: int, report_name: str
) -> dict[str, Any]:
  """Trains `config` into `workdir` (resuming it) and evaluates it.

  Args:
    config: the row's config.
    workdir: its run directory.
    attacks: the evaluation's attacks, comma-separated (`eval.py --attacks`).
    limit: evaluate on the first `limit` test images.
    report_name: the evaluation's report is written to `workdir / report_name`.

  Returns:
    The row's measurements: `clean`, `accuracy` (attack -> accuracy) and
    `worst` in %, `n` images, `train_seconds`, `eval_seconds`, and the run's
    `resolved` config.
  """
  state = experiment.train(config, workdir, progress=sys.stderr.isatty())
  resolved = checkpoints.load_config(workdir)
  model = config_lib.build_model(resolved)
  tick = time.perf_counter()
  report = experiment.evaluate(resolved, model, state, names=attacks, limit=limit)
  eval_seconds = time.perf_counter() - tick
  checkpoints.write_atomic(workdir / report_name, json.dumps(report, indent=2) + "\n")
  return {
    "clean": 100 * report["clean_accuracy"],
    "accuracy": {r["attack"]: 100 * r["accuracy"] for r in report["results"]},
    "worst": 100 * report["worst_case_accuracy"],
    "n": report["n_examples"],
    "train_seconds": train_seconds(workdir),
    "eval_seconds": eval_seconds,
    "resolved": resolved,
  }


def write_rows(
  rows: Sequence[str],
  run_row: Callable[[str], dict],
  markdown: Callable[[list[dict]], str],
  out: str | Path,
) -> list[dict]:
  """Runs every row, rewriting the table `markdown(results)` at `out` after each."""
  out = Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  results: list[dict] = []
  for row in rows:
    results.append(run_row(row))
    checkpoints.write_atomic(out, markdown(results))
  print(f"\nwrote {out}\n\n{out.read_text()}")
  return results
