"""RobustBench's zoo by name (`jaxrobust.zoo`), and its architectures against RobustBench's own.

The architectures are compared with RobustBench's own PyTorch definitions,
read at test time from a RobustBench repository (git directory) or wheel
(`rb_module`): nothing of RobustBench is vendored, and these tests skip when
neither is present (set `JAXROBUST_ROBUSTBENCH` to either).
"""

import ast
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


def rb_file(relative):
  """The text of RobustBench's `robustbench/<relative>`, or None."""
  for where in filter(None, SOURCES):
    path = Path(where)
    if path.suffix == ".whl" and path.is_file():
      with zipfile.ZipFile(path) as wheel:
        if f"robustbench/{relative}" in wheel.namelist():
          return wheel.read(f"robustbench/{relative}").decode()
    elif (path / "model_zoo").is_dir():  # an installed package
      file = path / relative
      if file.is_file():
        return file.read_text()
    elif path.is_dir():
      out = subprocess.run(
        ["git", "-C", str(path), "show", f"HEAD:robustbench/{relative}"],
        capture_output=True,
        text=True,
        check=False,
      )
      if out.returncode == 0:
        return out.stdout
  return None


def rb_source(module):
  """The text of RobustBench's `architectures/<module>.py`, or None."""
  return rb_file(f"{PREFIX.removeprefix('robustbench/')}{module}.py")


# RobustBench's imports of its sibling architecture files, relative or absolute.
SIBLING = r"^from (?:\.|robustbench\.model_zoo\.architectures\.)(\w+) import"


def rb_module(module, tmp_path):
  """RobustBench's architecture module, imported from a copy in `tmp_path`; skips without it
  (or without a package it imports, e.g. torchvision)."""
  text = rb_source(module)
  if text is None:
    pytest.skip(f"RobustBench's {module}.py not found (set JAXROBUST_ROBUSTBENCH)")
  for relative in set(re.findall(SIBLING, text, re.M)):  # its siblings first
    sys.modules[f"rb_{relative}"] = rb_module(relative, tmp_path)
  path = tmp_path / f"rb_{module}.py"
  path.write_text(re.sub(SIBLING, r"from rb_\1 import", text, flags=re.M))
  spec = importlib.util.spec_from_file_location(f"rb_{module}", path)
  mod = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(mod)
  except (ImportError, RuntimeError) as error:  # torchvision's build can miss torch's
    pytest.skip(f"RobustBench's {module}.py does not import here: {error}")
  return mod


def rb_zoo_class(dataset, name, **namespace):
  """Class `name` of RobustBench's `model_zoo/<dataset>.py`, its source run in `namespace`."""
  text = rb_file(f"model_zoo/{dataset}.py")
  if text is None:
    pytest.skip(f"RobustBench's model_zoo/{dataset}.py not found (set JAXROBUST_ROBUSTBENCH)")
  (node,) = [n for n in ast.parse(text).body if isinstance(n, ast.ClassDef) and n.name == name]
  source = ast.get_source_segment(text, node)
  for old, new in namespace.pop("replace", {}).items():
    assert old in source, old
    source = source.replace(old, new)
  scope = {"torch": torch, "nn": nn, **namespace}
  exec(compile(source, f"robustbench/model_zoo/{dataset}.py", "exec"), scope)  # noqa: S102
  return scope[name]


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


def test_ding_mma_net_standardises_each_image_as_robustbench_does(tmp_path):
  rb = rb_module("wide_resnet", tmp_path)
  ding = rb_zoo_class("cifar10", "Ding2020MMANet", WideResNet=rb.WideResNet)
  net = randomized(ding(depth=10, widen_factor=2))
  x = np.random.default_rng(1).uniform(size=(2, 32, 32, 3)).astype(np.float32)
  model = check_same_logits(net, "wrn-10-2-per-image")
  assert model.per_image and model.mean == (0.0,) * 3
  # the standardisation is there: a brightness shift leaves the logits alone
  model, variables = interop.from_torch(net.state_dict(), "wrn-10-2-per-image")
  np.testing.assert_allclose(
    model.apply(variables, x), model.apply(variables, 0.5 * x + 0.2), atol=1e-4, rtol=0
  )


def test_pssilu_wide_resnet_matches_robustbench(tmp_path):
  rb = rb_module("paf_wide_resnet", tmp_path)
  net = randomized(rb.PAF_WideResNet(rb.PSSiLU(), depth=10, widen_factor=2))
  with torch.no_grad():
    net.activation.alpha.fill_(-1.7)  # the absolute values count
    net.activation.beta.fill_(0.3)
  assert sum(k.endswith(".alpha") for k in net.state_dict()) == 4  # shared by 3 blocks and the top
  model = check_same_logits(net, "wrn-10-2-pssilu")
  assert model.activation == "pssilu"


def _random_meansparse(net, seed=1):
  """Random statistics and thresholds in every MeanSparse layer of `net`; returns `net`."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in net.modules():
      if type(m).__name__ == "MeanSparse":
        m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=g))
        m.running_var.copy_(0.2 + torch.rand(m.running_var.shape, generator=g))
        m.threshold.fill_(0.4 + 0.4 * float(torch.rand((), generator=g)))
  return net


@pytest.mark.parametrize("module", ["Meansparse_wrn_70_16", "Meansparse_wrn_94_16"])
def test_meansparse_dm_wide_resnets_match_robustbench(module, tmp_path):
  rb = rb_module(module, tmp_path)
  cls = rb.DMWideResNet if module.endswith("70_16") else rb.MeanSparse_DMWideResNet
  net = _random_meansparse(
    randomized(cls(num_classes=10, depth=10, width=2, activation_fn=nn.SiLU))
  )
  x = interop.nhwc_to_nchw(np.random.default_rng(1).uniform(size=(2, 32, 32, 3)).astype(np.float32))
  with torch.no_grad():
    sparse = net.layer[0].block[0].meansparse_0
    hidden = net.layer[0].block[0].batchnorm_0(net.init_conv((x - net.mean) / net.std))
    assert 0 < float((sparse(hidden) == sparse.running_mean.view(1, -1, 1, 1)).float().mean()) < 1
  model = check_same_logits(net, "dm-wrn-10-2-meansparse")
  assert model.meansparse and model.mean == rb.CIFAR10_MEAN


def test_ra_wide_resnet_matches_robustbench(tmp_path):
  rb = rb_module("robustarch_wide_resnet", tmp_path)  # skips where torchvision does not import
  settings = dict(stem_width=8, depths=(1, 2, 1), widths=(12, 16, 24))
  net = rb.NormalizedWideResNet(
    rb.CIFAR10_MEAN,
    rb.CIFAR10_STD,
    depth=list(settings["depths"]),
    stage_width=list(settings["widths"]),
    stem_width=settings["stem_width"],
    groups=[1, 1, 1],
    activation_fn=nn.SiLU,
    se_ratio=0.25,
    se_activation=nn.ReLU,
    se_order=2,
  )
  model = check_same_logits(randomized(net), "ra-wrn-70-16", **settings)
  assert model.se_ratio == 0.25


def test_ra_wide_resnet_with_meansparse_matches_robustbench(tmp_path):
  rb = rb_module("Meansparse_ra_wrn_70_16", tmp_path)  # skips where torchvision does not import
  settings = dict(stem_width=8, depths=(1, 2, 1), widths=(12, 16, 24))
  net = rb.NormalizedWideResNet(
    rb.CIFAR10_MEAN,
    rb.CIFAR10_STD,
    depth=list(settings["depths"]),
    stage_width=list(settings["widths"]),
    stem_width=settings["stem_width"],
    groups=[1, 1, 1],
    activation_fn=nn.SiLU,
    se_ratio=0.25,
    se_activation=nn.ReLU,
    se_order=2,
  )
  check_same_logits(_random_meansparse(randomized(net)), "ra-wrn-70-16-meansparse", **settings)


def test_chen_ensemble_matches_robustbench(tmp_path):
  rb = rb_module("resnet", tmp_path)
  chen = rb_zoo_class(
    "cifar10",
    "Chen2020AdversarialNet",
    ResNet=rb.ResNet,
    BottleneckChen2020AdversarialNet=rb.BottleneckChen2020AdversarialNet,
    replace={"[3, 4, 6, 3]": "[1, 2, 1, 1]"},  # fewer blocks, to keep the test short
  )
  net = randomized(chen())
  model = check_same_logits(net, "preact-resnet-50-x3", stage_blocks=(1, 2, 1, 1))
  assert model.branches == 3 and model.mean == pytest.approx((0.485, 0.456, 0.406))


def test_torchvision_resnet18_behind_robustbench_normalisation(tmp_path):
  rb = rb_module("utils_architectures", tmp_path)
  mu, sigma = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
  try:
    import torchvision  # noqa: PLC0415

    inner = torchvision.models.resnet18(num_classes=7)
  except (ImportError, RuntimeError):  # the library's twin in torchvision's layout
    inner = interop.twin(
      "resnet18", num_classes=7, mean=(0.0,) * 3, std=(1.0,) * 3, stem="imagenet", padding="torch"
    )
  net = randomized(rb.normalize_model(inner, mu, sigma))
  state = {k: v for k, v in net.state_dict().items() if k not in ("model.mean", "model.std")}
  x = np.random.default_rng(1).uniform(size=(2, 40, 40, 3)).astype(np.float32)
  with torch.no_grad():
    expected = net(interop.nhwc_to_nchw(x)).numpy()
  model, variables = interop.from_torch(state, "resnet-18-imagenet")
  assert model.mean == pytest.approx(mu) and model.stem == "imagenet"
  got = np.asarray(jax.jit(model.apply)(variables, jnp.asarray(x)))
  np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
  "arch, settings",
  [
    ("ra-wrn-70-16", dict(stem_width=8, depths=(1, 2, 1), widths=(12, 16, 24))),
    ("ra-wrn-70-16-meansparse", dict(stem_width=8, depths=(1, 2, 1), widths=(12, 16, 24))),
    ("wrn-10-2-pssilu", {}),
    ("wrn-10-2-per-image", {}),
    ("preact-resnet-50-x3", dict(width=8, stage_blocks=(1, 1, 1, 1))),
  ],
)
def test_new_twins_compute_the_flax_models_function(arch, settings):
  name, full = interop.architecture(arch, **settings)
  model = jr.models.create(name, num_classes=5, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.25), **full)
  net = _random_meansparse(
    randomized(
      interop.twin(name, num_classes=5, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.25), **full)
    )
  )
  x = np.random.default_rng(1).uniform(size=(2, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    expected = net(interop.nhwc_to_nchw(x)).numpy()
  loaded, variables = interop.from_torch(net.state_dict(), arch, **settings)
  np.testing.assert_allclose(loaded.apply(variables, x), expected, atol=ATOL, rtol=0)
  back = interop.to_torch(loaded, variables)
  with torch.no_grad():
    np.testing.assert_allclose(back(interop.nhwc_to_nchw(x)).numpy(), expected, atol=1e-6, rtol=0)
  assert loaded == model


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
  assert cov == {"cifar10/Linf": (68, 76), "cifar10/L2": (21, 21)}  # 89 of 97: 92 %
  loaded = sum(done for done, _ in cov.values())
  assert loaded >= 0.9 * sum(total for _, total in cov.values())
  resnet50s = [  # torchvision's ResNet-50s of ImageNet, the loadable and the missing ones
    e
    for e in zoo.ENTRIES
    if e.dataset == "imagenet" and (e.arch == "resnet-50" or "resnet50(" in e.missing)
  ]
  assert len(resnet50s) == 12 and all(e.arch is not None for e in resnet50s)  # L-inf, corruptions
  text = zoo.format_list()
  assert all(zoo.key(e) in text for e in zoo.ENTRIES) and "cifar10/Linf: 68 of 76 load" in text


def test_unsupported_entries_say_which_architecture_is_missing():
  assert zoo.status("cifar10/Linf/Ding2020MMA") == "loads as wrn-28-4-per-image"
  assert zoo.status("imagenet/Linf/Peng2023Robust").startswith("not supported")
  assert "get_robustarch_model" in zoo.status("imagenet/Linf/Peng2023Robust")
  assert zoo.status("cifar10/Linf/Wong2020Fast") == "loads as preact-resnet-18-plain"
  with pytest.raises(jr.InputError, match="'Standard' is held by cifar10/Linf/Standard"):
    zoo.find("Standard")
  with pytest.raises(jr.InputError, match="no zoo entry"):
    zoo.find("Nobody2099")
  with pytest.raises(jr.InputError, match="get_robustarch_model"):
    zoo.load_entry("imagenet/Linf/Peng2023Robust", {})


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
  keys = {k for k, _, _ in interop.layout(model, shapes["params"])}
  assert keys == {k for k in net.state_dict() if k not in ("mean", "std")}


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
