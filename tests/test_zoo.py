"""RobustBench's zoo by name (`jaxrobust.zoo`), and its architectures against RobustBench's own.

The architectures are compared with RobustBench's own PyTorch definitions,
read at test time from a RobustBench repository (git directory) or wheel
(`rb_module`): nothing of RobustBench is vendored, and these tests skip when
neither is present (set `JAXROBUST_ROBUSTBENCH` to either).
"""

import importlib.util
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrobust as jr
from jaxrobust import interop, zoo

torch = pytest.importorskip("torch")
nn = torch.nn

ATOL = 1e-4


def _installed_robustbench():
  """An installed robustbench package's folder (never imported: its
  architecture files are copied), or "". CI reads its wheel instead
  (`JAXROBUST_ROBUSTBENCH`, set by .ci/run)."""
  spec = importlib.util.find_spec("robustbench")
  return spec.submodule_search_locations[0] if spec and spec.submodule_search_locations else ""


# Where RobustBench's files are read from: a package folder, a git repository
# or a wheel.
SOURCES = (
  os.environ.get("JAXROBUST_ROBUSTBENCH", ""),
  _installed_robustbench(),
  "/work/.mirror/RobustBench+robustbench/repo",
  "/tmp/rb/robustbench-1.1.1-py3-none-any.whl",
)
PREFIX = "robustbench/model_zoo/architectures/"
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


def rb_source(module):
  """The text of RobustBench's `architectures/<module>.py`, or None."""
  for where in filter(None, SOURCES):
    path = Path(where)
    if path.suffix == ".whl" and path.is_file():
      with zipfile.ZipFile(path) as wheel:
        if f"{PREFIX}{module}.py" in wheel.namelist():
          return wheel.read(f"{PREFIX}{module}.py").decode()
    elif (path / "model_zoo").is_dir():  # an installed package
      file = path / "model_zoo" / "architectures" / f"{module}.py"
      if file.is_file():
        return file.read_text()
    elif path.is_dir():
      out = subprocess.run(
        ["git", "-C", str(path), "show", f"HEAD:{PREFIX}{module}.py"],
        capture_output=True,
        text=True,
        check=False,
      )
      if out.returncode == 0:
        return out.stdout
  return None


def rb_module(module, tmp_path):
  """RobustBench's architecture module, imported from a copy in `tmp_path`; skips without it."""
  text = rb_source(module)
  if text is None:
    pytest.skip(f"RobustBench's {module}.py not found (set JAXROBUST_ROBUSTBENCH)")
  for relative in set(re.findall(r"^from \.(\w+) import", text, re.M)):  # its siblings first
    sys.modules[f"rb_{relative}"] = rb_module(relative, tmp_path)
  path = tmp_path / f"rb_{module}.py"
  path.write_text(re.sub(r"^from \.(\w+) import", r"from rb_\1 import", text, flags=re.M))
  spec = importlib.util.spec_from_file_location(f"rb_{module}", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def randomized(net, seed=0):
  """`net` in evaluation mode with random weights and BatchNorm statistics."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, nn.BatchNorm2d):
        m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
        m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
        m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=g))
        m.running_var.copy_(0.5 + 1.5 * torch.rand(m.running_var.shape, generator=g))
      elif isinstance(m, nn.Conv2d | nn.Linear):
        fan_in = m.weight[0].numel()
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) / fan_in**0.5)
        if m.bias is not None:
          m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
  return net.eval()


def check_same_logits(net, arch, hw=(32, 32), roundtrip_atol=0.0, **settings):
  """RobustBench's `net` and `from_torch(net.state_dict(), arch)` agree, both ways."""
  x = np.random.default_rng(1).uniform(size=(2, *hw, 3)).astype(np.float32)
  with torch.no_grad():
    out = net(interop.nhwc_to_nchw(x))
  expected = (out[0] if isinstance(out, tuple) else out).numpy()
  model, variables = interop.from_torch(net.state_dict(), arch, **settings)
  got = np.asarray(jax.jit(model.apply)(variables, jnp.asarray(x)))
  np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)
  back = interop.torch_state_dict(model, variables)  # to_torch's weights, RobustBench's keys
  wanted = net.state_dict()
  missing, _ = net.load_state_dict(
    {k: torch.from_numpy(np.array(v)) for k, v in back.items() if k in wanted}, strict=False
  )
  assert all(k.startswith("sub_block1.") or k in ("mu", "sigma") for k in missing), missing
  with torch.no_grad():
    out = net(interop.nhwc_to_nchw(x))
  got_back = (out[0] if isinstance(out, tuple) else out).numpy()
  np.testing.assert_allclose(got_back, expected, atol=roundtrip_atol, rtol=0)
  return model


def test_plain_preact_resnet18_matches_robustbench(tmp_path):
  rb = rb_module("resnet", tmp_path)
  model = check_same_logits(randomized(rb.PreActResNet18()), "preact-resnet-18-plain")
  assert not model.final_bn and model.shortcut_from == "input"


def test_preact_resnet18_v2_matches_robustbench(tmp_path):
  rb = rb_module("resnet", tmp_path)
  net = rb.PreActResNet(rb.PreActBlockV2, [2, 2, 2, 2], bn_before_fc=True)
  check_same_logits(randomized(net), "preact-resnet-18")


def test_cifar_resnet50_matches_robustbench(tmp_path):
  rb = rb_module("resnet", tmp_path)
  net = randomized(rb.ResNet(rb.Bottleneck, [1, 2, 1, 1]))
  check_same_logits(net, "resnet-50-cifar", stage_blocks=(1, 2, 1, 1))


@pytest.mark.parametrize("activation", ["Swish", "SiLU"])
def test_dm_preact_resnet18_matches_robustbench(activation, tmp_path):
  rb = rb_module("dm_wide_resnet", tmp_path)
  act = rb.Swish if activation == "Swish" else nn.SiLU
  net = randomized(
    rb.DMPreActResNet(num_classes=100, activation_fn=act, mean=CIFAR100_MEAN, std=CIFAR100_STD)
  )
  model = check_same_logits(net, "dm-preact-resnet-18", mean=CIFAR100_MEAN, std=CIFAR100_STD)
  assert model.num_classes == 100


@pytest.mark.parametrize(
  "depth, width, activation", [(10, 2, "Swish"), (16, 1, "SiLU"), (22, 3, "SiLU")]
)
def test_dm_wide_resnets_of_any_size_match_robustbench(depth, width, activation, tmp_path):
  rb = rb_module("dm_wide_resnet", tmp_path)
  act = rb.Swish if activation == "Swish" else nn.SiLU
  net = randomized(rb.DMWideResNet(num_classes=10, depth=depth, width=width, activation_fn=act))
  model = check_same_logits(net, f"dm-wrn-{depth}-{width}")  # CIFAR-10's statistics by default
  assert model.mean == rb.CIFAR10_MEAN


def test_robust_wide_resnet_matches_robustbench(tmp_path):
  rb = rb_module("robust_wide_resnet", tmp_path)
  net = rb.RobustWideResNet(num_classes=10, channel_configs=[4, 8, 12, 6], depth_configs=[2, 1, 2])
  model = check_same_logits(randomized(net), "robust-wrn-4-8-12-6-2-1-2")
  assert model.channels == (4, 8, 12, 6) and model.depths == (2, 1, 2)


def test_boosting_wide_resnet_matches_robustbench(tmp_path):
  rb = rb_module("boosting_wide_resnet", tmp_path)
  net = randomized(rb.BoostingWideResNet(depth=10, widen_factor=2))
  with torch.no_grad():
    net.mu.copy_(torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1))
  # its forward renormalises the weights in place: normalising twice rounds differently
  model = check_same_logits(net, "wrn-10-2-cosine", roundtrip_atol=1e-6)
  assert model.head == "cosine" and model.mean == pytest.approx((0.4, 0.5, 0.6))


def test_torchvision_resnet50_behind_robustbench_normalisation(tmp_path):
  rb = rb_module("utils_architectures", tmp_path)
  mu, sigma = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
  try:
    import torchvision  # noqa: PLC0415

    inner = torchvision.models.resnet50(num_classes=7)
  except ImportError:  # the library's twin in torchvision's layout
    inner = interop.twin(
      "resnet50", num_classes=7, mean=(0.0,) * 3, std=(1.0,) * 3, stem="imagenet"
    )
  net = randomized(rb.normalize_model(inner, mu, sigma))
  state = {k: v for k, v in net.state_dict().items() if k not in ("model.mean", "model.std")}
  x = np.random.default_rng(1).uniform(size=(2, 40, 40, 3)).astype(np.float32)
  with torch.no_grad():
    expected = net(interop.nhwc_to_nchw(x)).numpy()
  model, variables = interop.from_torch(state, "resnet-50")
  assert model.mean == pytest.approx(mu) and model.stem == "imagenet"
  got = np.asarray(jax.jit(model.apply)(variables, jnp.asarray(x)))
  np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)


# The table (`jaxrobust.zoo`).

CLASSES = {"cifar10": 10, "cifar100": 100, "imagenet": 1000}
SIDE = {"cifar10": 32, "cifar100": 32, "imagenet": 224}


def test_every_entry_has_a_unique_name_and_the_leaderboards_facts():
  keys = [zoo.key(e) for e in zoo.ENTRIES]
  assert len(keys) == len(set(keys)) == 206
  for e in zoo.ENTRIES:
    assert e.dataset in CLASSES and e.threat in ("Linf", "L2", "corruptions")
    assert (e.arch is None) != (e.missing == "")
    if e.threat != "corruptions":
      assert 0 < zoo.eps(e) <= 0.5 and e.robust is not None and e.clean > e.robust
  carmon = zoo.find("Carmon2019Unlabeled")
  assert (carmon.arch, carmon.eps, carmon.clean, carmon.robust) == (
    "wrn-28-10",
    "8/255",
    89.69,
    59.53,
  )
  assert zoo.find("models/cifar10/L2/Standard.pt").threat == "L2"


def test_coverage_counts_the_loadable_entries():
  cov = zoo.coverage(("cifar10",), ("Linf", "L2"))
  assert cov == {"cifar10/Linf": (62, 76), "cifar10/L2": (19, 21)}  # 81 of 97: 84 %
  resnet50s = [e for e in zoo.ENTRIES if e.dataset == "imagenet" and e.arch == "resnet-50"]
  assert len(resnet50s) == 12  # every torchvision resnet50 entry, L-inf and corruptions
  text = zoo.format_list()
  assert all(zoo.key(e) in text for e in zoo.ENTRIES) and "cifar10/Linf: 62 of 76 load" in text


def test_unsupported_entries_say_which_architecture_is_missing():
  assert "Ding2020MMANet" in zoo.status("cifar10/Linf/Ding2020MMA")
  assert zoo.status("cifar10/Linf/Peng2023Robust").startswith("not supported")
  assert zoo.status("cifar10/Linf/Wong2020Fast") == "loads as preact-resnet-18-plain"
  with pytest.raises(jr.InputError, match="'Standard' is held by cifar10/Linf/Standard"):
    zoo.find("Standard")
  with pytest.raises(jr.InputError, match="no zoo entry"):
    zoo.find("Nobody2099")
  with pytest.raises(jr.InputError, match="get_robustarch_model"):
    zoo.load_entry("cifar10/Linf/Peng2023Robust", {})


def _architectures():
  return sorted({(e.arch, e.dataset) for e in zoo.ENTRIES if e.arch is not None})


@pytest.mark.parametrize("arch, dataset", _architectures())
def test_every_supported_architecture_builds_at_full_size(arch, dataset):
  name, settings = interop.architecture(arch)
  model = jr.models.create(
    name, num_classes=CLASSES[dataset], mean=(0,) * 3, std=(1,) * 3, **settings
  )
  side = SIDE[dataset]
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, side, side, 3)))
  n_flax = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes["params"]))
  with torch.device("meta"):
    net = interop.twin(name, num_classes=CLASSES[dataset], mean=(0,) * 3, std=(1,) * 3, **settings)
  assert n_flax == sum(p.numel() for p in net.parameters())
  keys = {k for k, _, kind in interop.layout(model, shapes["params"]) if kind != "count"}
  assert keys == {
    k for k in net.state_dict() if k not in ("mean", "std") and "num_batches" not in k
  }


def _full_size_checkpoint(arch, classes):
  name, settings = interop.architecture(arch)
  torch.manual_seed(0)
  net = interop.twin(name, num_classes=classes, mean=(0,) * 3, std=(1,) * 3, **settings)
  return {k: v for k, v in net.state_dict().items() if k not in ("mean", "std")}


def test_a_checkpoint_loads_by_entry_and_a_wrong_one_is_named_in_one_line():
  state = _full_size_checkpoint("preact-resnet-18-plain", 10)
  model, variables = zoo.load_entry("cifar10/Linf/Wong2020Fast", {"model": state})
  assert model.final_bn is False and model.mean == (0.0,) * 3
  with pytest.raises(jr.InputError) as error:
    zoo.load_entry("cifar10/Linf/Rice2020Overfitting", state)  # a WideResNet-34-20 entry
  message = str(error.value)
  assert "\n" not in message
  assert "cifar10/Linf/Rice2020Overfitting (architecture wrn-34-20)" in message
  assert "'fc.weight'" in message  # the first key the architecture needs


def test_evaluate_entry_sets_the_leaderboards_number_beside_ours():
  state = _full_size_checkpoint("preact-resnet-18-plain", 10)
  model, variables = zoo.load_entry("cifar10/Linf/Wong2020Fast", state)
  x = np.random.default_rng(0).uniform(size=(4, 32, 32, 3)).astype(np.float32)
  wrong = (np.asarray(model.apply(variables, x)).argmax(-1) + 1) % 10  # nothing to attack
  got = zoo.evaluate_entry("cifar10/Linf/Wong2020Fast", state, x=x, y=wrong, batch_size=4)
  assert (got.n, got.clean, got.robust, got.stderr) == (4, 0.0, 0.0, 0.0)
  assert got.leaderboard == 43.21 and got.difference == pytest.approx(-43.21)
  assert "leaderboard 43.21 %" in got.format() and "n=4" in got.format()
  half = zoo.result(zoo.find("cifar10/Linf/Wong2020Fast"), 100, 0.8, 0.5)
  assert half.stderr == pytest.approx(5.0) and half.difference == pytest.approx(50 - 43.21)
  with pytest.raises(jr.InputError, match="not an AutoAttack entry"):
    zoo.evaluate_entry("cifar10/corruptions/Standard", state)


def test_eval_zoo_list_and_a_checkpoint_that_does_not_fit(cli, tmp_path):
  listed = cli("eval.py", "--zoo", "list")
  assert listed.returncode == 0, listed.stderr
  counts = zoo.coverage()
  loaded, total = counts["cifar10/Linf"]
  assert f"cifar10/Linf: {loaded} of {total} load" in listed.stdout
  assert "cifar10/Linf/Wong2020Fast" in listed.stdout
  path = tmp_path / "preact.pt"
  torch.save({"model": _full_size_checkpoint("preact-resnet-18-plain", 10)}, path)
  wrong = cli("eval.py", "--zoo", "cifar10/Linf/Rice2020Overfitting", "--torch-checkpoint", path)
  assert wrong.returncode == 2
  (line,) = wrong.stderr.strip().splitlines()
  assert line.startswith("error: ") and "Rice2020Overfitting (architecture wrn-34-20)" in line
  assert "Traceback" not in wrong.stderr
