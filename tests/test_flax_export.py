"""Flax checkpoints of converted models (`interop.flax_files`, `eval.py --export-flax`):
written from PyTorch checkpoints, zoo entries and workdirs, read back where PyTorch
cannot be imported, with the logits of the PyTorch model they came from."""

import json
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
from conftest import ROOT, program_env

from jaxrobust.checks import InputError
from jaxrobust import interop, zoo
from jaxrobust.interop import flax_files
from jaxrobust.training import loop as experiment

torch = pytest.importorskip("torch")

ENTRY = "cifar10/Linf/Rebuffi2021Fixing_R18_ddpm"  # DeepMind's PreActResNet-18, mean and std
# Prepended to a program run as a subprocess: every import of torch fails, as
# on a host without PyTorch (scipy asks for torch only when it is imported).
NO_TORCH = textwrap.dedent(
  """
  import sys
  class NoTorch:
    def find_spec(self, name, path=None, target=None):
      if name == "torch" or name.startswith("torch."):
        raise ImportError("no PyTorch on this host")
  sys.meta_path.insert(0, NoTorch())
  """
)


def without_torch(code: str, *args: Any) -> subprocess.CompletedProcess[str]:
  """Runs `code` (after `NO_TORCH`) in a fresh Python; returns the CompletedProcess."""
  return subprocess.run(
    [sys.executable, "-c", NO_TORCH + textwrap.dedent(code), *map(str, args)],
    cwd=ROOT,
    env=program_env(),
    capture_output=True,
    text=True,
    timeout=600,
  )


def randomize_batch_norm(net: Any, seed: int = 0) -> Any:
  """BatchNorm scales, shifts and running statistics away from their initial values."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
        m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
        m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=g))
        m.running_var.copy_(0.5 + 1.5 * torch.rand(m.running_var.shape, generator=g))
  return net


def logits(model: Any, variables: Any, x: np.ndarray) -> np.ndarray:
  return np.asarray(model.apply(variables, x))


def torch_logits(net: Any, x: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return net(interop.nhwc_to_nchw(x)).numpy()


@pytest.fixture(scope="module")
def zoo_net() -> Any:
  """The entry's architecture at full size in PyTorch, random weights and statistics."""
  arch, settings = zoo.architecture(zoo.find(ENTRY))
  name, own = interop.architecture(arch)
  torch.manual_seed(0)
  return randomize_batch_norm(interop.twin(name, num_classes=10, **settings, **own))


@pytest.fixture(scope="module")
def zoo_file(zoo_net: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
  """The entry's checkpoint as RobustBench stores it: no normalisation buffers."""
  path = tmp_path_factory.mktemp("zoo") / "Rebuffi2021Fixing_R18_ddpm.pt"
  state = {k: v for k, v in zoo_net.state_dict().items() if k not in ("mean", "std")}
  torch.save(state, path)
  return path


@pytest.fixture(scope="module")
def wrn(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path, Path]:
  """(PyTorch WideResNet-10-1 on grey images, its .pt file, its flax checkpoint)."""
  net = randomize_batch_norm(
    interop.twin(
      "wide_resnet", num_classes=10, mean=(0.5,), std=(0.3,), depth=10, width=1, padding="torch"
    )
  )
  folder = tmp_path_factory.mktemp("wrn")
  torch.save({"state_dict": net.state_dict()}, folder / "wrn.pt")
  model, variables = interop.from_torch(interop.load_checkpoint(folder / "wrn.pt"), "wrn-10-1")
  flax_files.save(folder / "wrn", model, variables, arch="wrn-10-1", source="wrn.pt")
  return net, folder / "wrn.pt", folder / "wrn"


def test_a_zoo_export_loads_without_torch_with_the_torch_logits(
  zoo_net: Any, zoo_file: Path, tmp_path: Path
) -> None:
  out = zoo.export_entry(ENTRY, zoo_file, tmp_path / "out")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary sibling left
  x = np.random.default_rng(1).uniform(size=(3, 32, 32, 3)).astype(np.float32)
  np.save(tmp_path / "x.npy", x)
  result = without_torch(
    """
    import json, sys
    import numpy as np
    from jaxrobust import zoo
    from jaxrobust.interop import flax_files
    out, x = sys.argv[1], np.load(sys.argv[2])
    model, variables, meta = flax_files.load(out)
    by_entry, by_entry_variables = zoo.load_entry(meta["zoo"]["entry"], out)
    assert by_entry == model
    np.save(sys.argv[3], np.asarray(model.apply(variables, x)))
    json.dump(meta, open(sys.argv[4], "w"))
    assert "torch" not in sys.modules
    """,
    out,
    tmp_path / "x.npy",
    tmp_path / "logits.npy",
    tmp_path / "meta.json",
  )
  assert result.returncode == 0, result.stderr
  logits = np.load(tmp_path / "logits.npy")
  np.testing.assert_allclose(logits, torch_logits(zoo_net, x), atol=1e-5, rtol=0)
  meta = json.loads((tmp_path / "meta.json").read_text())
  entry = zoo.find(ENTRY)
  assert meta["zoo"] == dict(entry=ENTRY, dataset="cifar10", threat="Linf", eps="8/255")
  assert (meta["arch"], meta["model"], meta["num_classes"]) == (
    entry.arch,
    "dm_preact_resnet18",
    10,
  )
  assert [meta["mean"], meta["std"]] == entry.normalisation
  assert meta["source"] == str(zoo_file) and meta["format_version"] == flax_files.FORMAT_VERSION


def test_save_keeps_the_settings_and_never_overwrites(
  wrn: tuple[Any, Path, Path], snapshot: Callable[[Path], Any], tmp_path: Path
) -> None:
  net, _, exported = wrn
  model, variables, meta = flax_files.load(exported)
  assert meta["settings"] == dict(depth=10, width=1, padding="torch")
  assert (model.mean, model.std, meta["input_hw"]) == ((0.5,), (0.3,), None)
  x = np.random.default_rng(2).uniform(size=(2, 16, 16, 1)).astype(np.float32)
  np.testing.assert_allclose(logits(model, variables, x), torch_logits(net, x), atol=1e-5, rtol=0)
  before = snapshot(exported)
  with pytest.raises(InputError, match="exists; give a new directory"):
    flax_files.save(exported, model, variables)
  assert snapshot(exported) == before
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(InputError, match="exists"):
    flax_files.save(empty, model, variables)
  assert list(empty.iterdir()) == []
  with pytest.raises(InputError, match="does not exist"):
    flax_files.save(tmp_path / "missing" / "out", model, variables)


def test_a_model_with_a_flatten_records_its_image_size(trained: Path, tmp_path: Path) -> None:
  _, model, state = experiment.restore(trained)
  flax_files.save(tmp_path / "cnn", model, state.variables)
  loaded, variables, meta = flax_files.load(tmp_path / "cnn")
  assert (meta["model"], meta["input_hw"], loaded) == ("small_cnn", [8, 8], model)
  for a, b in zip(jax.tree.leaves(jax.device_get(state.variables)), jax.tree.leaves(variables)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_variables_that_do_not_fit_are_named(wrn: tuple[Any, Path, Path], tmp_path: Path) -> None:
  _, _, exported = wrn
  wider = tmp_path / "wider"
  shutil.copytree(exported, wider)
  meta = json.loads((wider / "jaxrobust.json").read_text())
  meta.update(arch="wrn-10-2", settings=dict(meta["settings"], width=2))
  (wider / "jaxrobust.json").write_text(json.dumps(meta))
  with pytest.raises(InputError) as error:
    flax_files.load(wider)
  assert "does not fit its architecture wrn-10-2: 'params/" in str(error.value)
  assert "in the checkpoint, the architecture needs" in str(error.value)
  with pytest.raises(InputError, match="it lacks 'a/b'"):
    flax_files.check_fits({}, {"a/b": (1,)}, "x")
  with pytest.raises(InputError, match="it has 'c' .and 1 more., which the architecture does not"):
    flax_files.check_fits({"c": (1,), "d": (2,)}, {}, "x")


@pytest.mark.parametrize(
  "change, fragment",
  [
    (dict(format_version=99), "has format_version 99; this jaxrobust reads versions up to 1"),
    (dict(settings=[1]), "settings must be a JSON object"),
    (dict(input_hw=[8, "x"]), "input_hw must be null or [height, width], got [8, 'x']"),
    (dict(num_classes="ten"), "model 'wide_resnet' cannot be built"),
  ],
)
def test_metadata_that_does_not_describe_a_model_is_named(
  wrn: tuple[Any, Path, Path], tmp_path: Path, change: dict[str, Any], fragment: str
) -> None:
  _, _, exported = wrn
  edited = tmp_path / "edited"
  shutil.copytree(exported, edited)
  meta = json.loads((edited / "jaxrobust.json").read_text())
  (edited / "jaxrobust.json").write_text(json.dumps({**meta, **change}))
  with pytest.raises(InputError) as error:
    flax_files.load(edited)
  assert fragment in str(error.value) and str(edited / "jaxrobust.json") in str(error.value)


def test_an_export_of_another_entry_or_architecture_is_refused(
  cli: Callable[..., Any], wrn: tuple[Any, Path, Path], zoo_file: Path, tmp_path: Path
) -> None:
  _, _, exported = wrn
  with pytest.raises(InputError, match="holds architecture wrn-10-1; zoo entry .* is wrn-34-20"):
    zoo.load_entry("cifar10/Linf/Rice2020Overfitting", exported)
  out = zoo.export_entry(ENTRY, zoo_file, tmp_path / "r18")
  other = "cifar10/Linf/Rade2021Helper_R18_ddpm"  # the same architecture
  with pytest.raises(InputError, match=f"holds zoo entry {ENTRY}, not {other}"):
    zoo.load_entry(other, out)
  # An export of the entry's architecture that is no zoo export loads as the
  # entry where it normalises as the entry does.
  state = torch.load(zoo_file)
  arch, settings = zoo.architecture(zoo.find(ENTRY))
  model, variables = interop.from_torch(state, arch, mean=(0.5,) * 3, std=(0.25,) * 3)
  plain = flax_files.save(tmp_path / "plain", model, variables, arch=arch)
  with pytest.raises(InputError, match=r"normalises with mean \(0.5, 0.5, 0.5\); zoo entry"):
    zoo.load_entry(ENTRY, plain)
  model, variables = interop.from_torch(state, arch, **settings)  # the entry's mean and std
  same = flax_files.save(tmp_path / "same", model, variables, arch=arch)
  assert zoo.load_entry(ENTRY, same)[0] == model
  result = cli("eval.py", "--flax-checkpoint", out, "--zoo", other)
  assert result.returncode == 2 and "Traceback" not in result.stderr
  assert (
    result.stderr == f"error: flax checkpoint {str(out)!r} holds zoo entry {ENTRY}, not {other}\n"
  )


def digits_eval(cli: Callable[..., Any], *args: Any) -> tuple[float, list[float], str]:
  """eval.py on 16 digits with two steps of PGD, the report's accuracies."""
  report = Path(args[-1])
  result = cli(
    "eval.py",
    *args[:-1],
    "--data=digits",
    "--attacks=pgd_linf",
    "--config.eval.attacks.pgd_linf.steps=2",
    "--limit=16",
    "--sanity=false",
    f"--out={report}",
  )
  assert result.returncode == 0, result.stderr
  rep = json.loads(report.read_text())
  return rep["clean_accuracy"], [row["accuracy"] for row in rep["results"]], result.stdout


def test_export_flax_of_a_torch_checkpoint(
  cli: Callable[..., Any], wrn: tuple[Any, Path, Path], tmp_path: Path
) -> None:
  net, pt, _ = wrn
  out = tmp_path / "wrn"
  result = cli("eval.py", "--torch-checkpoint", pt, "--arch", "wrn-10-1", "--export-flax", out)
  assert result.returncode == 0, result.stderr
  assert f"wrote {out}: wide_resnet" in result.stdout
  model, variables, meta = flax_files.load(out)
  assert (meta["arch"], meta["source"], meta.get("zoo")) == ("wrn-10-1", str(pt), None)
  x = np.random.default_rng(5).uniform(size=(2, 8, 8, 1)).astype(np.float32)
  np.testing.assert_allclose(logits(model, variables, x), torch_logits(net, x), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_a_flax_checkpoint_evaluates_as_its_torch_checkpoint(
  cli: Callable[..., Any], wrn: tuple[Any, Path, Path], tmp_path: Path
) -> None:
  _, pt, exported = wrn
  torch_clean, torch_robust, _ = digits_eval(
    cli, "--torch-checkpoint", pt, "--arch=wrn-10-1", tmp_path / "a.json"
  )
  clean, robust, stdout = digits_eval(cli, "--flax-checkpoint", exported, tmp_path / "b.json")
  assert f"flax checkpoint {exported}: arch wrn-10-1" in stdout
  assert (clean, robust) == (torch_clean, torch_robust)


def test_export_flax_of_a_workdir(cli: Callable[..., Any], trained: Path, tmp_path: Path) -> None:
  out = tmp_path / "run"
  result = cli("eval.py", "--workdir", trained, "--export-flax", out)
  assert result.returncode == 0, result.stderr
  _, model, state = experiment.restore(trained)
  loaded, variables, _ = flax_files.load(out)
  x = np.random.default_rng(3).uniform(size=(4, 8, 8, 1)).astype(np.float32)
  np.testing.assert_array_equal(
    logits(loaded, variables, x), logits(model, jax.device_get(state.variables), x)
  )


@pytest.mark.slow
def test_the_zoo_round_trip_on_the_command_line(
  cli: Callable[..., Any], zoo_net: Any, zoo_file: Path, tmp_path: Path
) -> None:
  # Images the model gets wrong: AutoAttack has nothing to attack, so the
  # round trip runs in seconds; the line compared holds the leaderboard's number.
  x = np.random.default_rng(4).uniform(size=(4, 32, 32, 3)).astype(np.float32)
  y = (torch_logits(zoo_net, x).argmax(1) + 1) % 10
  np.savez(tmp_path / "data.npz", x=x, y=y)
  data = f"--data=npz:{tmp_path / 'data.npz'}"
  out = tmp_path / "out"
  exported = cli("eval.py", "--zoo", ENTRY, "--torch-checkpoint", zoo_file, "--export-flax", out)
  assert exported.returncode == 0, exported.stderr
  assert f"wrote {out}: zoo entry {ENTRY}" in exported.stdout
  by_torch = cli("eval.py", "--zoo", ENTRY, "--torch-checkpoint", zoo_file, data)
  assert by_torch.returncode == 0, by_torch.stderr
  code = (
    "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
  )
  by_flax = without_torch(code, ROOT / "eval.py", "--flax-checkpoint", out, data)
  assert by_flax.returncode == 0, by_flax.stderr
  line = (
    f"{ENTRY}: AutoAttack 0.00 % (clean 0.00 %, n=4, standard error 0.00) | leaderboard 56.66 %"
  )
  assert line in by_flax.stdout
  assert by_flax.stdout.splitlines()[-1] == by_torch.stdout.splitlines()[-1]
