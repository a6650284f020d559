"""Every command in the README's ```bash blocks runs, in the README's order,
with settings that make it take seconds (`TINY`), in one scratch directory:
what a user types after cloning. So does the `Command:` line of every
packaged config's docstring. A documented command that breaks fails here;
a config's command must also leave a run that restores as that config's
objective and model (randomized or not) with finite logits.

Not run here (`NOT_RUN`): installs, the test command itself, cluster
launchers, and the benchmarks and the seed reproduction, which train on
CIFAR-10 for minutes to hours (their parts are tested: conversion to PyTorch,
the evaluation, the configs they train).
"""

import importlib
import re
import shlex
import subprocess
import sys

import jax.numpy as jnp
import pytest
from conftest import ROOT, TINY_SETTINGS, program_env

from jaxrobust import data, models
from jaxrobust.training import loop as experiment

README = ROOT / "README.md"
NOT_RUN = (
  "pip ",
  "python -m pytest",
  "srun ",
  "gcloud ",
  "bash ",
  "cd ",
  "python benchmarks/",
  "python scripts/",
)
# The programs, as `python <script>` in a clone or as the installed commands.
PROGRAMS = {
  "train.py": "train.py",
  "eval.py": "eval.py",
  "jaxrobust-train": "train.py",
  "jaxrobust-eval": "eval.py",
}
TINY = {
  "train.py": [f"--config.{k}={v}" for k, v in TINY_SETTINGS.items()] + ["--progress=false"],
  "eval.py": ["--limit=8", "--config.eval.batch_size=8"],
}
TINY_CERTIFY = ["--n=64", "--n0=8"]


def commands(text=None):
  """The README's ```bash commands, in order (comments and blank lines dropped)."""
  text = README.read_text() if text is None else text
  lines = []
  for block in re.findall(r"```bash\n(.*?)```", text, re.S):
    for line in block.replace("\\\n", " ").splitlines():
      line = line.split(" #", 1)[0].strip()
      if line and not line.startswith("#"):
        lines.append(line)
  return lines


def config_commands():
  """The `Command: ...` line of every packaged config's docstring."""
  found = []
  for path in sorted((ROOT / "jaxrobust" / "configs").glob("*.py")):
    found += re.findall(r"^Command: (.+)$", path.read_text(), re.M)
  return found


def _program(command):
  words = shlex.split(command.rstrip("&"))
  if words[0] == "python" and words[1] in PROGRAMS:
    return PROGRAMS[words[1]], words[2:]
  if words[0] in PROGRAMS:
    return PROGRAMS[words[0]], words[1:]
  return None, words


def test_the_readme_has_commands_and_every_one_is_understood():
  found = commands()
  assert any(c.startswith("python train.py") for c in found)
  assert any(c.startswith("python eval.py") for c in found)
  for command in found:
    program, words = _program(command)
    assert program or command.startswith(NOT_RUN), f"README command not understood: {command}"


def test_every_config_documents_its_command():
  # gpu_recipes documents GPU-scale runs (ResNets, 15-200 CIFAR-10 epochs), not
  # commands for this machine; test_recipes.py builds and checks its configs.
  names = {p.stem for p in (ROOT / "jaxrobust" / "configs").glob("*.py")} - {
    "__init__",
    "common",
    "gpu_recipes",
  }
  assert sorted(c.split()[3] for c in config_commands()) == sorted(names)


@pytest.mark.parametrize("source", ["README.md", "config docstrings"])
def test_every_documented_command_runs(cli, tmp_path, source):
  background = []
  ran = 0
  for command in commands() if source == "README.md" else config_commands():
    program, args = _program(command)
    if program is None:
      continue
    args = args + TINY[program] + (TINY_CERTIFY if "--certify" in args else [])
    if any(a.startswith("--coordinator_address") for a in args):
      # One process of a multi-process run: a real process (JAX's distributed
      # service shuts down at exit), in the background when the line ends in &.
      process = subprocess.Popen(
        [sys.executable, str(ROOT / program), *args],
        cwd=tmp_path,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=program_env(),
      )
      background.append((command, process))
      if command.endswith("&"):
        continue
    else:
      result = cli(ROOT / program, *args, cwd=tmp_path)
      assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
      if source == "config docstrings":
        check_run_of_config(tmp_path / _value(args, "--workdir"), _value(args, "--config"))
    for started, process in background:
      out, _ = process.communicate(timeout=600)
      assert process.returncode == 0, f"{started}\n{out}"
    background = []
    ran += 1
  assert ran >= 5


def _value(args, flag):
  return args[args.index(flag) + 1]


def check_run_of_config(workdir, name):
  """The run restores as config `name`'s objective and model, trained, with finite logits."""
  config = importlib.import_module(f"jaxrobust.configs.{name}").get_config()
  resolved, model, state = experiment.restore(workdir)
  assert int(state.step) > 0
  assert resolved["objective"] == config.objective
  assert models.is_randomized(model) == ("noise" in config.model)
  x = jnp.asarray(data.load("digits", "test").x[:4])
  logits = model.apply(state.variables, x, train=False)
  assert logits.shape == (4, 10) and bool(jnp.isfinite(logits).all())
