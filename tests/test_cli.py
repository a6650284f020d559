"""train.py and eval.py end to end on digits. Their handling of bad input is
catalogued in test_bad_input.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = [
  "--config.model.width=4",
  "--config.epochs=1",
  "--config.eval.limit=40",
  "--config.train_attack.steps=1",
  "--config.eval.attacks.pgd_linf.steps=2",
  "--config.eval.attacks.pgd_l2.steps=2",
  "--progress=false",
]
TINY_AUTOATTACK = [
  "--config.eval.attacks.autoattack_linf.steps=3",
  "--config.eval.attacks.autoattack_linf.queries=20",
]


def cli(script, *args, cwd=ROOT):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return subprocess.run(
    [sys.executable, str(ROOT / script), *map(str, args)],
    capture_output=True,
    text=True,
    cwd=cwd,
    env=env,
    timeout=600,
  )


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("cli") / "run"
  result = cli("train.py", "--workdir", workdir, *TINY)
  assert result.returncode == 0, result.stderr
  assert "| clean |" in result.stdout and "| pgd_linf |" in result.stdout
  return workdir


def test_train_writes_a_complete_workdir(run_dir):
  resolved = json.loads((run_dir / "config.json").read_text())
  assert resolved["objective"] == "adversarial" and resolved["model"]["width"] == 4
  assert resolved["dataset"]["input_shape"] == [8, 8, 1]
  steps = [json.loads(l)["step"] for l in (run_dir / "metrics.jsonl").open()]
  assert steps == sorted(set(steps)) and steps[-1] == 1497 // 64
  assert (run_dir / "checkpoints" / str(steps[-1])).is_dir()
  assert any((run_dir / "tensorboard").iterdir())


@pytest.mark.slow  # a minute's equivalence run: .ci/run runs it after the fast suite
def test_eval_prints_the_table_and_writes_json(run_dir, tmp_path):
  out = tmp_path / "report.json"
  result = cli("eval.py", "--workdir", run_dir, "--limit", 30, "--out", out, *TINY_AUTOATTACK)
  assert result.returncode == 0, result.stderr
  report = json.loads(out.read_text())
  assert report["n_examples"] == 30
  assert {r["attack"] for r in report["results"]} == {"autoattack_linf", "pgd_l2"}
  accuracies = [r["accuracy"] for r in report["results"]]
  for a in [report["clean_accuracy"], report["worst_case_accuracy"], *accuracies]:
    assert 0.0 <= a <= 1.0
  assert report["worst_case_accuracy"] <= min(accuracies)
  assert max(accuracies) <= report["clean_accuracy"]
  linf = next(r for r in report["results"] if r["attack"] == "autoattack_linf")
  assert linf["norm"] == "linf" and linf["eps"] == 0.2
  for r in report["results"]:
    assert f"{100 * r['accuracy']:.2f} %" in result.stdout


def test_rerun_of_a_finished_run_resumes_without_training(snapshot, run_dir):
  before = snapshot(run_dir / "checkpoints")
  result = cli("train.py", "--workdir", run_dir, *TINY)
  assert result.returncode == 0, result.stderr
  assert snapshot(run_dir / "checkpoints") == before
