"""train.py and eval.py end to end on digits, and their handling of bad input:
one line naming the bad value, exit code 2, no traceback, nothing changed on disk."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config.model.width=4", "--config.epochs=1", "--config.eval.limit=40",
        "--config.train_attack.steps=1", "--config.eval.attacks.pgd_linf.steps=2",
        "--config.eval.attacks.pgd_l2.steps=2", "--progress=false"]


def cli(script, *args, cwd=ROOT):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)],
                        capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def snapshot(directory):
  return {p: p.read_bytes() for p in Path(directory).rglob("*") if p.is_file()}


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


def test_eval_prints_the_table_and_writes_json(run_dir, tmp_path):
  out = tmp_path / "report.json"
  result = cli("eval.py", "--workdir", run_dir, "--limit", 30, "--out", out)
  assert result.returncode == 0, result.stderr
  report = json.loads(out.read_text())
  assert report["n_examples"] == 30
  assert {r["attack"] for r in report["results"]} == {"pgd_linf", "pgd_l2"}
  accuracies = [r["accuracy"] for r in report["results"]]
  for a in [report["clean_accuracy"], report["worst_case_accuracy"], *accuracies]:
    assert 0.0 <= a <= 1.0
  assert report["worst_case_accuracy"] <= min(accuracies)
  assert max(accuracies) <= report["clean_accuracy"]
  linf = next(r for r in report["results"] if r["attack"] == "pgd_linf")
  assert linf["norm"] == "linf" and linf["eps"] == 0.2
  for r in report["results"]:
    assert f"{100 * r['accuracy']:.2f} %" in result.stdout


def test_rerun_of_a_finished_run_resumes_without_training(run_dir):
  before = snapshot(run_dir / "checkpoints")
  result = cli("train.py", "--workdir", run_dir, *TINY)
  assert result.returncode == 0, result.stderr
  assert snapshot(run_dir / "checkpoints") == before


def assert_user_error(result, *fragments):
  assert result.returncode == 2, (result.stdout, result.stderr)
  assert "Traceback" not in result.stderr
  for fragment in fragments:
    assert fragment in result.stderr, result.stderr


@pytest.mark.parametrize("args, fragments", [
    (["--config.train_attack.eps=-0.1"], ["eps", "-0.1"]),
    (["--config.train_attack.steps=0"], ["steps", "0"]),
    (["--config.train_attack.norm=l3"], ["'l3'"]),
    (["--config.no_such_key=1"], ["no_such_key"]),
    (["--config.epochs=two"], ["two"]),
    (["--config", "configs/missing.py"], ["configs/missing.py", "not found"]),
    (["--config.data.name=cifar11"], ["'cifar11'"]),
    (["--config.data.name=npz:/nonexistent/d.npz"], ["/nonexistent/d.npz"]),
    (["--config.data.name=tfds:mnist", "--config.data.data_dir=/nonexistent/tfds"],
     ["mnist", "not prepared"]),
    (["--config.batch_size=33"], ["batch_size 33", "divisible"]),
    (["--config.model.name=resnet9000"], ["'resnet9000'"]),
])
def test_train_bad_input_leaves_no_trace(args, fragments, tmp_path):
  workdir = tmp_path / "run"
  assert_user_error(cli("train.py", "--workdir", workdir, *args), *fragments)
  assert not workdir.exists()


def test_train_refuses_a_workdir_of_another_config(run_dir):
  before = snapshot(run_dir)
  result = cli("train.py", "--workdir", run_dir, *TINY, "--config.seed=7")
  assert_user_error(result, "different config", "seed")
  assert snapshot(run_dir) == before


def test_train_refuses_a_workdir_that_is_a_file(tmp_path):
  path = tmp_path / "file"
  path.write_text("keep me")
  assert_user_error(cli("train.py", "--workdir", path), str(path), "not a directory")
  assert path.read_text() == "keep me"


@pytest.mark.parametrize("args, fragments", [
    (["--attacks", "pgd_linf,fgsm_l7"], ["'fgsm_l7'"]),
    (["--limit", "-3"], ["limit", "-3"]),
    (["--split", "validation"], ["validation"]),
])
def test_eval_bad_input(args, fragments, run_dir):
  before = snapshot(run_dir)
  assert_user_error(cli("eval.py", "--workdir", run_dir, *args), *fragments)
  assert snapshot(run_dir) == before


def test_eval_without_a_checkpoint(tmp_path):
  assert_user_error(cli("eval.py", "--workdir", tmp_path), str(tmp_path))
  assert_user_error(cli("eval.py"), "--workdir")
