"""Crash safety, pre-emption, the non-finite guard, determinism and
multi-process training.

Every run here is the same tiny one (`tiny_config`, 46 steps, a checkpoint
every 5), and every interrupted run must end exactly as the uninterrupted
`reference` run: bitwise the same state, and the same metrics.jsonl lines
(timing fields aside). train.py runs as a subprocess where a real process
must die; resumes run in this process, which has the same 2 CPU devices.
Subprocesses share a persistent compilation cache, which only saves time.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import SEEDED_SETTINGS
from jaxrobust.training import checkpoints
from jaxrobust.training import loop as experiment
from jaxrobust.training import metrics as metrics_lib

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = SEEDED_SETTINGS  # every run here, the `seeded_runs` of conftest too
STEPS = 1497 // 32
TRAIN = [
  "train.py",
  "--config",
  "natural",
  "--progress=false",
  *[f"--config.{k}={v}" for k, v in SETTINGS.items()],
]

# Runs train.py, but SIGKILLs itself inside the checkpoint save of the step
# named by $KILL_AT_SAVE: after orbax wrote the whole temporary directory,
# just before the rename that commits it.
KILL_DURING_SAVE = """
import os, runpy, signal, sys
from orbax.checkpoint._src.path import async_path
rename = async_path.rename
async def rename_or_die(src, dst, *args, **kwargs):
  if dst.name == os.environ["KILL_AT_SAVE"]:
    os.kill(os.getpid(), signal.SIGKILL)
  return await rename(src, dst, *args, **kwargs)
async_path.rename = rename_or_die
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture(scope="module")
def python(tmp_path_factory):
  """`python(*args, devices=2, env=None)` starts `python *args` in the
  repository with `devices` CPU devices, and returns the Popen."""
  cache = {
    "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5",
  }

  def start(*args, devices=2, env=None):
    env = {
      **os.environ,
      **cache,
      **(env or {}),
      "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    }
    return subprocess.Popen(
      [sys.executable, *map(str, args)],
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )

  return start


def finish(process, timeout=300):
  out, err = process.communicate(timeout=timeout)
  return types.SimpleNamespace(returncode=process.returncode, stdout=out, stderr=err)


def wait_for_steps(workdir, count, process, timeout=300):
  """Waits until `process` has logged `count` steps."""
  path = Path(workdir) / "metrics.jsonl"
  deadline = time.monotonic() + timeout
  while not (path.exists() and path.read_text().count("\n") >= count):
    assert process.poll() is None, finish(process).stderr
    assert time.monotonic() < deadline, "timed out"
    time.sleep(0.01)


def metrics(workdir):
  """metrics.jsonl without its timing fields."""
  lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
  return [
    {k: v for k, v in json.loads(line).items() if k not in metrics_lib.TIMING_FIELDS}
    for line in lines
  ]


def checkpoint_names(workdir):
  return sorted(p.name for p in (Path(workdir) / "checkpoints").iterdir())


def assert_identical(a, b):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


@pytest.fixture(scope="module")
def reference(tiny_config, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("reference")
  state = experiment.train(tiny_config(**SETTINGS), workdir, progress=False)
  assert int(state.step) == STEPS
  return types.SimpleNamespace(state=state, metrics=metrics(workdir), workdir=workdir)


def test_rerun_of_a_finished_run_changes_nothing(tiny_config, reference):
  before = {p: p.read_bytes() if p.is_file() else "dir" for p in reference.workdir.rglob("*")}
  assert_identical(
    experiment.train(tiny_config(**SETTINGS), reference.workdir, progress=False), reference.state
  )
  assert {
    p: p.read_bytes() if p.is_file() else "dir" for p in reference.workdir.rglob("*")
  } == before


# Crash safety


@pytest.mark.slow  # trains or evaluates for a minute: .ci/run runs it after the fast suite
def test_kill_9_anywhere_then_resume_ends_as_an_uninterrupted_run(
  tiny_config, reference, python, tmp_path
):
  workdir = tmp_path / "run"
  # kill -9 wherever the run is (checkpoint saves take most of its time).
  run = python(*TRAIN, "--workdir", workdir)
  wait_for_steps(workdir, 12, run)
  run.kill()
  assert finish(run).returncode == -signal.SIGKILL
  # Resume, and kill -9 during the next checkpoint write.
  newest = max(int(name) for name in checkpoint_names(workdir) if name.isdigit())
  doomed = str(newest + 5)
  run = python("-c", KILL_DURING_SAVE, *TRAIN, "--workdir", workdir, env={"KILL_AT_SAVE": doomed})
  assert finish(run).returncode == -signal.SIGKILL
  names = checkpoint_names(workdir)
  assert doomed not in names
  assert any(name.startswith(f"{doomed}.orbax-checkpoint-tmp") for name in names), names
  # Metrics were logged after the newest checkpoint; and a torn last line.
  assert metrics(workdir)[-1]["step"] == int(doomed)
  with open(workdir / "metrics.jsonl", "a") as f:
    f.write('{"step": 16, "loss": 0.')
  with pytest.warns(UserWarning, match="unreadable line"):
    state = experiment.train(tiny_config(**SETTINGS), workdir, progress=False)
  assert not any("tmp" in name for name in checkpoint_names(workdir))
  assert_identical(state, reference.state)
  assert metrics(workdir) == reference.metrics


@pytest.mark.slow  # a minute's equivalence run: .ci/run runs it after the fast suite
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_save_the_current_step_and_exit(
  tiny_config, signum, reference, python, tmp_path
):
  workdir = tmp_path / "run"
  run = python(*TRAIN, "--workdir", workdir)
  wait_for_steps(workdir, 12, run)
  run.send_signal(signum)
  result = finish(run)
  assert result.returncode == 128 + signum, result.stderr
  assert "Traceback" not in result.stderr
  step = metrics(workdir)[-1]["step"]
  assert step < STEPS
  assert f"stopped by {signal.Signals(signum).name} at step {step}" in result.stderr
  assert str(step) in checkpoint_names(workdir)
  state = experiment.train(tiny_config(**SETTINGS), workdir, progress=False)
  assert_identical(state, reference.state)
  assert metrics(workdir) == reference.metrics


def corrupt_arrays(path):
  for file in path.glob("default/**/d/*"):
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def corrupt_metadata(path):
  (path / checkpoints.STEP_METADATA_FILE).unlink()


def corrupt_digest(path):
  # As if orbax read back values that differ from those saved, without noticing.
  metadata = path / checkpoints.STEP_METADATA_FILE
  record = json.loads(metadata.read_text())
  record["custom_metadata"][checkpoints.RECORD_KEY]["sha256"] = "0" * 64
  metadata.write_text(json.dumps(record))


@pytest.fixture(scope="module")
def run_to_step_15(tiny_config, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("step15")
  experiment.train(tiny_config(**SETTINGS), workdir, max_steps=15, progress=False)
  return workdir


# orbax's reader threads report, harmlessly, that its event loop closed under them.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("corrupt", [corrupt_arrays, corrupt_metadata, corrupt_digest])
def test_corrupt_newest_checkpoint_is_skipped_with_a_warning(
  tiny_config, corrupt, run_to_step_15, reference, tmp_path
):
  workdir = tmp_path / "run"
  shutil.copytree(run_to_step_15, workdir)
  corrupt(workdir / "checkpoints/15")
  before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
  # Evaluation skips it and changes nothing.
  with pytest.warns(checkpoints.CorruptCheckpointWarning, match="checkpoints/15.*skipped"):
    _, _, state = experiment.restore(workdir)
  assert int(state.step) == 10
  assert {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()} == before
  # Training moves it aside and resumes from the previous one.
  with pytest.warns(checkpoints.CorruptCheckpointWarning, match="checkpoints/15.*corrupt-15"):
    experiment.train(tiny_config(**SETTINGS), workdir, max_steps=20, progress=False)
  assert checkpoint_names(workdir) == ["10", "15", "20", "corrupt-15"]
  assert metrics(workdir) == reference.metrics[:20]


# Non-finite guard


def test_diverged_run_stops_naming_the_step_and_the_last_good_checkpoint(cli, tmp_path):
  # `cli`: train.py in a child forked from a process that has imported it.
  result = cli(
    *TRAIN,
    "--workdir",
    tmp_path,
    "--config.optimizer.learning_rate=1e3",
    "--config.checkpoint_every_steps=2",
  )
  assert result.returncode == 1, result.stderr
  assert "Traceback" not in result.stderr
  assert "error: training diverged at step 5: {'loss': nan}" in result.stderr
  assert "the last good checkpoint is step 4" in result.stderr
  assert checkpoint_names(tmp_path) == ["2", "4"]
  assert [m["step"] for m in metrics(tmp_path)] == [1, 2, 3, 4]


# Determinism


def test_same_seed_same_run_and_one_device_agrees_with_two(seeded_runs):
  # `seeded_runs`: PGD training, twice on 2 devices (a, b) and once on 1.
  a, b, one = (seeded_runs.states[name] for name in ("a", "b", "one"))
  workdir = seeded_runs.workdirs
  assert_identical(a, b)
  assert metrics(workdir["a"]) == metrics(workdir["b"])
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(one), strict=True):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-5, atol=1e-7)
  for m2, m1 in zip(metrics(workdir["a"]), metrics(workdir["one"]), strict=True):
    assert m1 == pytest.approx(m2, rel=1e-5)


# Multi-process data parallelism


def free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow  # trains or evaluates for a minute: .ci/run runs it after the fast suite
def test_two_processes_pre_empted_and_resumed_train_as_one_process_with_two_devices(
  reference, python, tmp_path
):
  def launch():
    address = f"localhost:{free_port()}"
    return [
      python(
        *TRAIN,
        "--workdir",
        tmp_path,
        f"--coordinator_address={address}",
        "--num_processes=2",
        f"--process_id={i}",
        devices=1,
      )
      for i in range(2)
    ]

  # SIGTERM to one process: JAX's preemption sync point stops both at one step.
  runs = launch()
  wait_for_steps(tmp_path, 12, runs[0])
  runs[1].send_signal(signal.SIGTERM)
  results = [finish(run) for run in runs]
  step = metrics(tmp_path)[-1]["step"]
  for result in results:
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    assert f"stopped by SIGTERM at step {step}" in result.stderr
  assert str(step) in checkpoint_names(tmp_path)
  # Resumed, the run ends as the single-process run on two devices.
  results = [finish(run) for run in launch()]
  for result in results:
    assert result.returncode == 0, result.stderr
  assert "| clean |" in results[0].stdout and "| clean |" not in results[1].stdout
  _, _, state = experiment.restore(tmp_path)
  for u, v in zip(jax.tree.leaves(state), jax.tree.leaves(reference.state), strict=True):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-5, atol=1e-7)
  logged = metrics(tmp_path)
  assert [m["step"] for m in logged] == list(range(1, STEPS + 1))  # process 0 alone
  for m, r in zip(logged, reference.metrics):
    assert m == pytest.approx(r, rel=1e-5)


def test_a_checkpoint_written_before_ema_params_existed_still_restores(tmp_path):
  # The state as checkpoints held it before the `ema_params` field was added.
  import flax  # pylint: disable=g-import-not-at-top
  from jaxrobust.training import step as training  # pylint: disable=g-import-not-at-top

  class OldState(flax.struct.PyTreeNode):
    step: jax.Array
    params: dict
    model_state: dict
    opt_state: tuple

  params = {"w": jax.numpy.arange(6.0).reshape(2, 3)}
  old = OldState(jax.numpy.int32(7), params, {}, (jax.numpy.ones(3),))
  mgr = checkpoints.manager(tmp_path)
  checkpoints.save(mgr, old)
  new = training.TrainState(
    jax.numpy.int32(0), jax.tree.map(jax.numpy.zeros_like, params), {}, (jax.numpy.zeros(3),)
  )
  restored = checkpoints.restore_latest(mgr, new)
  mgr.close()
  assert restored.ema_params is None and int(restored.step) == 7
  np.testing.assert_array_equal(restored.params["w"], params["w"])
  np.testing.assert_array_equal(restored.opt_state[0], np.ones(3))
