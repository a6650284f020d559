"""Fixtures shared by the test modules.

XLA is asked for 2 host devices before JAX starts, so that multi-device code
is tested on a CPU.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

# pylint: disable=g-import-not-at-top,wrong-import-position
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

ROOT = Path(__file__).resolve().parents[1]
# Settings that make a digits run take seconds.
TINY_SETTINGS = {
  "model.width": 4,
  "batch_size": 32,
  "epochs": 1,
  "eval.limit": 8,
  "log_every_steps": 1,
  "checkpoint_every_steps": 3,
}
# The settings of the `trained` workdir (test_bad_input.SETTINGS).
BAD_INPUT_SETTINGS = {"model.width": 4, "batch_size": 32, "epochs": 1, "eval.limit": 8}


def program_env():
  """The environment of a program a test starts: this checkout importable,
  2 CPU devices."""
  return {
    **os.environ,
    "PYTHONPATH": str(ROOT),
    "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
  }


@pytest.fixture(scope="session")
def linear_model():
  """`linear_model(w, b=0.0)`: a logits function of two classes, [0, w.x + b]
  (class 1 iff w.x + b > 0), whose optimal attacks have closed forms."""

  def build(w, b=0.0):
    def logits_fn(x):
      z = x.reshape(x.shape[0], -1) @ w.reshape(-1) + b
      return jnp.stack([jnp.zeros_like(z), z], -1)

    return logits_fn

  return build


@pytest.fixture(scope="session")
def tiny_cnn():
  """`tiny_cnn(num_classes=3, channels=1)`: the logits function of a
  randomly initialised width-4 `SmallCNN` on 8x8 images."""
  import jaxrobust as jr

  def build(num_classes=3, channels=1):
    model = jr.models.SmallCNN(
      num_classes=num_classes, mean=(0.5,) * channels, std=(0.25,) * channels, width=4
    )
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, channels)))
    return lambda x: model.apply(variables, x)

  return build


@pytest.fixture(scope="session")
def tiny_config():
  """`tiny_config(**overrides)`: the natural digits config with
  `TINY_SETTINGS` (width 4, one epoch of batch 32, ...), then `overrides`
  (flattened keys, e.g. `{"optimizer.learning_rate": 0.1}`, or top-level
  values)."""
  from jaxrobust.configs import natural

  def build(**overrides):
    config = natural.get_config()
    config.update_from_flattened_dict(
      {**TINY_SETTINGS, **{k: v for k, v in overrides.items() if "." in k}}
    )
    config.update({k: v for k, v in overrides.items() if "." not in k})
    return config

  return build


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
  """A workdir of the natural digits config with `BAD_INPUT_SETTINGS` (small
  CNN of width 4) and a checkpoint at step 2. Tests must not change it."""
  from jaxrobust.configs import natural
  from jaxrobust.training import loop as experiment

  workdir = tmp_path_factory.mktemp("trained") / "run"
  config = natural.get_config()
  config.update_from_flattened_dict(BAD_INPUT_SETTINGS)
  experiment.train(config, workdir, max_steps=2, progress=False)
  return workdir


# The settings of the `seeded_runs` and of every run of tests/test_reliability.py.
SEEDED_SETTINGS = {
  "model.width": 4,
  "batch_size": 32,
  "epochs": 1,
  "log_every_steps": 1,
  "checkpoint_every_steps": 5,
  "eval.limit": 8,
  "eval.attacks.pgd_linf.steps": 1,
  "eval.attacks.pgd_l2.steps": 1,
}


@pytest.fixture(scope="session")
def seeded_runs(tiny_config, tmp_path_factory):
  """Six steps of PGD-2 training of the tiny digits run, seed 0, three times:
  twice on 2 devices ("a", "b") and once on 1 ("one"). Holds `states`,
  `workdirs` (by name), `steps` and `config()` (a fresh copy of the config).
  Tests must not change them."""
  import types  # pylint: disable=g-import-not-at-top

  from jaxrobust import parallel
  from jaxrobust.training import loop as experiment

  def config():
    made = tiny_config(**SEEDED_SETTINGS, objective="adversarial")
    made.train_attack = dict(name="pgd", norm="linf", eps=0.2, step_size=0.05, steps=2)
    return made

  root, steps = tmp_path_factory.mktemp("seeded"), 6
  workdirs = {name: root / name for name in ("a", "b", "one")}
  states = {
    name: experiment.train(
      config(),
      workdirs[name],
      max_steps=steps,
      progress=False,
      mesh=parallel.mesh(jax.devices()[:n]),
    )
    for name, n in (("a", 2), ("b", 2), ("one", 1))
  }
  return types.SimpleNamespace(states=states, workdirs=workdirs, steps=steps, config=config)


@pytest.fixture(scope="session")
def two_steps():
  """`two_steps(mesh, model, objective, x, y, augment=None)`: the state and
  metrics after two SGD steps of `training.make_train_step` on the batch
  (x, y) split over `mesh`, from the same initial state whatever the mesh."""
  from jaxrobust import parallel
  from jaxrobust.training import step as training

  def run(mesh, model, objective, x, y, augment=None):
    tx = training.make_optimizer(dict(name="sgd", learning_rate=0.1, momentum=0.9), 10)
    state = training.init_state(model, tx, x.shape[1:], jax.random.key(0))
    state = jax.device_put(state, parallel.replicated(mesh))
    step = training.make_train_step(model, tx, objective, mesh, augment=augment)
    batch = jax.device_put((x, y), parallel.batch_sharding(mesh))
    for _ in range(2):
      state, metrics = step(state, *batch, jax.random.key(1))
    return state, metrics

  return run


@pytest.fixture(scope="session")
def snapshot():
  """`snapshot(directory)`: every file's bytes and every directory under it,
  to assert that a command left it unchanged."""

  def take(directory):
    return {
      p.relative_to(directory): p.read_bytes() if p.is_file() else "dir"
      for p in Path(directory).rglob("*")
    }

  return take


# Runs train.py or eval.py as `python <script> <args>` would, in a child forked
# from this server, which has already imported what every run imports (without
# starting JAX's backends): a command costs its own work, not a Python start-up.
_SERVER = r"""
import json, os, runpy, sys, time, traceback
import jax, jaxrobust.cli, jaxrobust.training.loop, jaxrobust.evaluation
assert not jax._src.xla_bridge._backends, "forking is safe only before JAX starts"
for line in sys.stdin:
  script, args, env, out, err, cwd = json.loads(line)
  pid = os.fork()
  if pid == 0:
    os.chdir(cwd)
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
      os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    sys.argv = [script, *args]
    try:
      runpy.run_path(script, run_name="__main__")
      code = 0
    except SystemExit as e:
      code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
      if not isinstance(e.code, (int, type(None))):
        print(e.code, file=sys.stderr)
    except BaseException:
      traceback.print_exc()
      code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
  deadline = time.monotonic() + 600
  while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
    if time.monotonic() > deadline:
      os.kill(pid, 9)
    time.sleep(0.005)
  print(os.waitstatus_to_exitcode(done[1]), flush=True)
"""


@pytest.fixture(scope="session")
def cli(tmp_path_factory):
  """`cli(script, *args, env=None, cwd=ROOT)`: runs `python <script> <args>`
  with 2 CPU devices and returns a CompletedProcess (return code, stdout,
  stderr). `script` is relative to `cwd` (default: the repository)."""
  logs = tmp_path_factory.mktemp("cli_logs")
  server = subprocess.Popen(
    [sys.executable, "-c", _SERVER],
    cwd=ROOT,
    text=True,
    stdin=subprocess.PIPE,
    stdout=subprocess.PIPE,
    env=program_env(),
  )

  def run_script(script, *args, env=None, cwd=ROOT):
    out, err = logs / "stdout", logs / "stderr"
    server.stdin.write(
      json.dumps([str(script), list(map(str, args)), env or {}, str(out), str(err), str(cwd)])
      + "\n"
    )
    server.stdin.flush()
    code = server.stdout.readline()
    assert code, "the CLI server died"
    return subprocess.CompletedProcess([script, *args], int(code), out.read_text(), err.read_text())

  yield run_script
  server.stdin.close()
  server.wait(timeout=60)
