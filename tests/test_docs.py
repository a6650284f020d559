"""Every command the documentation shows runs, with tiny settings.

What runs: every ```bash and ```python block of README.md and docs/*.md (the
pages found by glob, so a new page is included), in the page's order, and the
`Command:` line of every packaged config's docstring. What is shown and not
run: ```text blocks (output, usage lines) and ```console blocks (commands
that cannot run here: downloads, GPUs, hours of CIFAR-10 training, the
benchmarks). In a ```bash block every line must be a `train.py`/`eval.py`
command (`python train.py ...` or `jaxrobust-train ...`), a data conversion
(`python -m jaxrobust.data ...` or `jaxrobust-data ...`, run as written), or
one of `SKIPPED` (installs, and the test command itself).

How: every command of every page runs in one scratch directory shared by the
whole session, where `python train.py` (the README's first command, tiny) has
already made `runs/pgd_at`; a page that needs another run trains it itself,
and a command already run in the session is not run again (it would only
resume a finished run). Commands get `TINY[program]` appended (later flags
win), so a run trains one epoch of a width-4 CNN and an evaluation sees 8
images. Python blocks run in-process, from the scratch directory, one
namespace per page (a page reads like a notebook), which starts with `jax`,
`jnp`, `np`, `nn` (flax.linen), `nnx`, `jr`, and `model`, `variables`
(`runs/pgd_at`'s Linen model and variables) and `nnx_model` (an NNX CNN);
`PYTHON_TINY` replaces the few settings that would take minutes (every entry
must still occur in a page).
"""

import importlib
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, program_env

from jaxrobust import data, models
from jaxrobust.training import loop as experiment

PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
SKIPPED = ("pip install ", "python -m pytest")
PROGRAMS = {
  "train.py": "train.py",
  "eval.py": "eval.py",
  "jaxrobust-train": "train.py",
  "jaxrobust-eval": "eval.py",
}
DATA_COMMANDS = ("python -m jaxrobust.data ", "jaxrobust-data ")
TINY_TRAIN = {"model.width": 4, "batch_size": 128, "epochs": 1, "eval.limit": 8}
TINY = {
  "train.py": [f"--config.{k}={v}" for k, v in TINY_TRAIN.items()] + ["--progress=false"],
  "eval.py": ["--limit=8", "--config.eval.batch_size=8"],
}
TINY_CERTIFY = ["--n=64", "--n0=8"]
PYTHON_TINY = {
  'autoattack(norm="linf", eps=0.2)': 'autoattack(norm="linf", eps=0.2, steps=2, queries=8)',
  'autoattack(norm="linf", eps=8 / 255)': 'autoattack(norm="linf", eps=8 / 255, steps=2, queries=8)',
  '"models/cifar10/Linf/Carmon2019Unlabeled.pt"': '"runs/pgd_at.pt"',  # the export above
  'from_torch(checkpoint, "wrn-28-10")': "from_torch(checkpoint, ARCH(checkpoint)[0], **ARCH(checkpoint)[1])",
  "n=100_000": "n=64",
  "n0=100,": "n0=8,",
  "queries=500,": "queries=8,",
}


def blocks(text: str) -> list[tuple[str, str]]:
  """The page's fenced blocks as (language, code), in order."""
  return re.findall(r"^```(\w*)\n(.*?)^```", text, re.S | re.M)


def bash_commands(code: str) -> list[str]:
  """A ```bash block's commands (continuations joined, comments dropped)."""
  lines = []
  for line in code.replace("\\\n", " ").splitlines():
    line = line.split(" #", 1)[0].strip()
    if line and not line.startswith("#"):
      lines.append(line)
  return lines


def config_commands() -> dict[str, str]:
  """The `Command: ...` line of every packaged config's docstring, by config."""
  found = {}
  for path in sorted((ROOT / "jaxrobust" / "configs").glob("*.py")):
    for command in re.findall(r"^Command: (.+)$", path.read_text(), re.M):
      found[path.stem] = command
  return found


def program_of(command: str) -> tuple[str | None, list[str]]:
  """(the program, its arguments) of a train.py/eval.py command, else (None, words)."""
  words = shlex.split(command.rstrip("&"))
  if words[0] == "python" and len(words) > 1 and words[1] in PROGRAMS:
    return PROGRAMS[words[1]], words[2:]
  if words[0] in PROGRAMS:
    return PROGRAMS[words[0]], words[1:]
  return None, words


class Session:
  """The scratch directory every page's commands share, and what ran in it."""

  def __init__(self, cli: Callable[..., Any], directory: Path) -> None:
    self.cli, self.directory = cli, directory
    self.ran: set[tuple[str, ...]] = set()
    self.background: list[tuple[str, subprocess.Popen[str]]] = []

  def run(self, command: str) -> None:
    """Runs a train.py/eval.py command with `TINY` settings (once a session:
    the same program and arguments, however spelled, run once)."""
    if command.startswith(DATA_COMMANDS):
      return self._run_data_command(command)
    program, args = program_of(command)
    assert program, f"not a train.py or eval.py command (tag its block console): {command}"
    if (program, *args) in self.ran:
      return
    self.ran.add((program, *args))
    if "--zoo" not in args:  # the zoo's table takes no run settings
      args = args + TINY[program] + (TINY_CERTIFY if "--certify" in args else [])
    if any(a.startswith("--coordinator_address") for a in args):
      self._run_process(command, program, args)
    else:
      result = self.cli(ROOT / program, *args, cwd=self.directory)
      assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"

  def _run_data_command(self, command: str) -> None:
    words = shlex.split(command)
    args = words[3:] if words[0] == "python" else words[1:]
    if ("jaxrobust.data", *args) in self.ran:
      return
    self.ran.add(("jaxrobust.data", *args))
    result = subprocess.run(
      [sys.executable, "-m", "jaxrobust.data", *args],
      cwd=self.directory,
      text=True,
      capture_output=True,
      env=program_env(),
    )
    assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"

  def _run_process(self, command: str, program: str, args: list[str]) -> None:
    # One process of a multi-process run: a real process (JAX's distributed
    # service shuts down at exit), in the background when the line ends in &.
    process = subprocess.Popen(
      [sys.executable, str(ROOT / program), *args],
      cwd=self.directory,
      text=True,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      env=program_env(),
    )
    self.background.append((command, process))
    if command.endswith("&"):
      return
    for started, running in self.background:
      out, _ = running.communicate(timeout=600)
      assert running.returncode == 0, f"{started}\n{out}"
    self.background = []


@pytest.fixture(scope="session")
def session(cli: Callable[..., Any], tmp_path_factory: pytest.TempPathFactory) -> Session:
  """The shared scratch directory, with `python train.py` run (tiny)."""
  shared = Session(cli, tmp_path_factory.mktemp("docs"))
  shared.run("python train.py")
  return shared


def page_namespace(directory: Path) -> dict[str, Any]:
  """What a page's Python blocks start with (see the module docstring)."""
  from flax import linen as nn
  from flax import nnx

  import jaxrobust as jr
  from jaxrobust import interop

  _, model, state = experiment.restore(directory / "runs" / "pgd_at")

  class NNXNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
      self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
      self.dense = nnx.Linear(4 * 8 * 8, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
      return self.dense(nnx.relu(self.conv(x)).reshape(x.shape[0], -1))

  return {
    **dict(jax=jax, jnp=jnp, np=np, nn=nn, nnx=nnx, jr=jr),
    **dict(model=model, variables=state.variables, nnx_model=NNXNet(nnx.Rngs(0))),
    "ARCH": interop.checkpoint_architecture,  # (arch, settings) of an exported file
  }


def tiny_python(code: str) -> str:
  """`code` with `PYTHON_TINY`'s replacements."""
  for old, new in PYTHON_TINY.items():
    code = code.replace(old, new)
  return code


@pytest.mark.slow  # trains or evaluates for a minute: .ci/run runs it after the fast suite
@pytest.mark.parametrize("page", PAGES)
def test_every_block_of_the_page_runs(
  page: str, session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
  namespace = None
  monkeypatch.chdir(session.directory)
  for language, code in blocks((ROOT / page).read_text()):
    if language == "bash":
      for command in bash_commands(code):
        if not command.startswith(SKIPPED):
          session.run(command)
    elif language == "python":
      namespace = namespace or page_namespace(session.directory)
      exec(compile(tiny_python(code), page, "exec"), namespace)  # noqa: S102
    else:
      assert language in ("text", "console", "", "json"), f"{page}: unknown block ```{language}"


def test_every_tiny_replacement_is_used() -> None:
  text = "".join(code for page in PAGES for _, code in blocks((ROOT / page).read_text()))
  assert [old for old in PYTHON_TINY if old not in text] == []


def test_the_readme_shows_training_evaluation_and_the_test_command() -> None:
  readme = [code for lang, code in blocks((ROOT / "README.md").read_text()) if lang == "bash"]
  commands = [c for code in readme for c in bash_commands(code)]
  assert "python train.py" in commands
  assert any(c.startswith("python eval.py") for c in commands)
  assert "python -m pytest -q -n 2" in commands


def test_every_config_documents_its_command() -> None:
  # gpu_recipes documents GPU-scale runs, not commands for this machine;
  # test_recipes.py builds and checks its configs.
  names = {p.stem for p in (ROOT / "jaxrobust" / "configs").glob("*.py")}
  assert sorted(config_commands()) == sorted(names - {"__init__", "common", "gpu_recipes"})
  for name, command in config_commands().items():
    assert shlex.split(command)[:4] == ["python", "train.py", "--config", name]


@pytest.mark.slow  # trains or evaluates for a minute: .ci/run runs it after the fast suite
@pytest.mark.parametrize("name", sorted(config_commands()))
def test_every_config_command_runs_and_restores_as_its_config(name: str, session: Session) -> None:
  """A config's command leaves a run that restores as that config's objective
  and model (randomized or not), trained, with finite logits."""
  command = config_commands()[name]
  session.run(command)
  _, args = program_of(command)
  workdir = Path(session.directory) / args[args.index("--workdir") + 1]
  config = importlib.import_module(f"jaxrobust.configs.{name}").get_config()
  resolved, model, state = experiment.restore(workdir)
  assert int(state.step) > 0
  assert resolved["objective"] == config.objective
  assert models.is_randomized(model) == ("noise" in config.model)
  x = jnp.asarray(data.load("digits", "test").x[:4])
  logits = model.apply(state.variables, x, train=False)
  assert logits.shape == (4, 10) and bool(jnp.isfinite(logits).all())
