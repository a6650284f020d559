"""jaxrobust's zoo architectures against RobustBench's own PyTorch definitions (`robustbench_files`).

Each architecture, with random weights and BatchNorm statistics, gives the
logits of RobustBench's definition within 1e-4, converted both ways.
"""

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrobust as jr
from jaxrobust import interop, zoo
from robustbench_files import (
  ATOL,
  CIFAR100_MEAN,
  CIFAR100_STD,
  check_same_logits,
  random_meansparse,
  randomized,
  rb_module,
  rb_zoo_class,
  torchvision_misc,
)

torch = pytest.importorskip("torch")
nn = torch.nn


def test_plain_preact_resnet18_matches_robustbench(tmp_path: Path) -> None:
  rb = rb_module("resnet", tmp_path)
  model = check_same_logits(randomized(rb.PreActResNet18()), "preact-resnet-18-plain")
  assert not model.final_bn and model.shortcut_from == "input"


def test_preact_resnet18_v2_matches_robustbench(tmp_path: Path) -> None:
  rb = rb_module("resnet", tmp_path)
  net = rb.PreActResNet(rb.PreActBlockV2, [2, 2, 2, 2], bn_before_fc=True)
  check_same_logits(randomized(net), "preact-resnet-18")


def test_cifar_resnet50_matches_robustbench(tmp_path: Path) -> None:
  rb = rb_module("resnet", tmp_path)
  net = randomized(rb.ResNet(rb.Bottleneck, [1, 2, 1, 1]))
  check_same_logits(net, "resnet-50-cifar", stage_blocks=(1, 2, 1, 1))


@pytest.mark.parametrize("activation", ["Swish", "SiLU"])
def test_dm_preact_resnet18_matches_robustbench(activation: str, tmp_path: Path) -> None:
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
def test_dm_wide_resnets_of_any_size_match_robustbench(
  depth: int, width: int, activation: str, tmp_path: Path
) -> None:
  rb = rb_module("dm_wide_resnet", tmp_path)
  act = rb.Swish if activation == "Swish" else nn.SiLU
  net = randomized(rb.DMWideResNet(num_classes=10, depth=depth, width=width, activation_fn=act))
  model = check_same_logits(net, f"dm-wrn-{depth}-{width}")  # CIFAR-10's statistics by default
  assert model.mean == rb.CIFAR10_MEAN


def test_robust_wide_resnet_matches_robustbench(tmp_path: Path) -> None:
  rb = rb_module("robust_wide_resnet", tmp_path)
  net = rb.RobustWideResNet(num_classes=10, channel_configs=[4, 8, 12, 6], depth_configs=[2, 1, 2])
  model = check_same_logits(randomized(net), "robust-wrn-4-8-12-6-2-1-2")
  assert model.channels == (4, 8, 12, 6) and model.depths == (2, 1, 2)


def test_wrn_a4_matches_robustbench(tmp_path: Path) -> None:
  rb = rb_module("robust_resnet", tmp_path)
  net = rb.PreActResNet(
    channel_configs=[4, 8, 12, 6],
    depth_configs=[2, 1, 2],
    activations=("SiLU",) * 3,
    use_init=False,
    pre_process=True,  # WRN-A4's: CIFAR-10's statistics as buffers mu and sigma
  )
  sizes: dict[str, Any] = dict(channels=(4, 8, 12, 6), depths=(2, 1, 2))
  model = check_same_logits(randomized(net), "wrn-a4", **sizes)
  assert model.activation == "swish" and model.mean == pytest.approx((0.4914, 0.4822, 0.4465))
  # its file lacks mu and sigma (RobustBench loads it without them): the entry's are the class's
  state = {k: v for k, v in net.state_dict().items() if k not in ("mu", "sigma")}
  normalisation = zoo.find("cifar10/Linf/Huang2022Revisiting_WRN-A4").normalisation
  assert isinstance(normalisation, list)
  model, variables = interop.from_torch(
    state, "wrn-a4", mean=normalisation[0], std=normalisation[1], **sizes
  )
  x = np.random.default_rng(2).uniform(size=(2, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    expected = net(interop.nhwc_to_nchw(x)).numpy()
  np.testing.assert_allclose(jax.jit(model.apply)(variables, x), expected, atol=ATOL, rtol=0)


def test_boosting_wide_resnet_matches_robustbench(tmp_path: Path) -> None:
  rb = rb_module("boosting_wide_resnet", tmp_path)
  net = randomized(rb.BoostingWideResNet(depth=10, widen_factor=2))
  with torch.no_grad():
    net.mu.copy_(torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1))
  # its forward renormalises the weights in place: normalising twice rounds differently
  model = check_same_logits(net, "wrn-10-2-cosine", roundtrip_atol=1e-6)
  assert model.head == "cosine" and model.mean == pytest.approx((0.4, 0.5, 0.6))


def test_torchvision_resnet50_behind_robustbench_normalisation(tmp_path: Path) -> None:
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


def test_ding_mma_net_standardises_each_image_as_robustbench_does(tmp_path: Path) -> None:
  rb = rb_module("wide_resnet", tmp_path)
  ding = rb_zoo_class("cifar10", "Ding2020MMANet", WideResNet=rb.WideResNet)
  net = randomized(ding(depth=10, widen_factor=2))
  x = np.random.default_rng(1).uniform(size=(2, 32, 32, 3)).astype(np.float32)
  model = check_same_logits(net, "wrn-10-2-per-image")
  assert model.per_image and model.mean == (0.0,) * 3
  # the standardisation is there: a brightness shift leaves the logits alone
  model, variables = interop.from_torch(net.state_dict(), "wrn-10-2-per-image")
  np.testing.assert_allclose(
    jax.jit(model.apply)(variables, x),
    jax.jit(model.apply)(variables, 0.5 * x + 0.2),
    atol=1e-4,
    rtol=0,
  )


def test_pssilu_wide_resnet_matches_robustbench(tmp_path: Path) -> None:
  rb = rb_module("paf_wide_resnet", tmp_path)
  net = randomized(rb.PAF_WideResNet(rb.PSSiLU(), depth=10, widen_factor=2))
  with torch.no_grad():
    net.activation.alpha.fill_(-1.7)  # the absolute values count
    net.activation.beta.fill_(0.3)
  assert sum(k.endswith(".alpha") for k in net.state_dict()) == 4  # shared by 3 blocks and the top
  model = check_same_logits(net, "wrn-10-2-pssilu")
  assert model.activation == "pssilu"


@pytest.mark.parametrize("module", ["Meansparse_wrn_70_16", "Meansparse_wrn_94_16"])
def test_meansparse_dm_wide_resnets_match_robustbench(module: str, tmp_path: Path) -> None:
  rb = rb_module(module, tmp_path)
  cls = rb.DMWideResNet if module.endswith("70_16") else rb.MeanSparse_DMWideResNet
  net = random_meansparse(randomized(cls(num_classes=10, depth=10, width=2, activation_fn=nn.SiLU)))
  x = interop.nhwc_to_nchw(np.random.default_rng(1).uniform(size=(2, 32, 32, 3)).astype(np.float32))
  with torch.no_grad():
    sparse = net.layer[0].block[0].meansparse_0
    hidden = net.layer[0].block[0].batchnorm_0(net.init_conv((x - net.mean) / net.std))
    assert 0 < float((sparse(hidden) == sparse.running_mean.view(1, -1, 1, 1)).float().mean()) < 1
  model = check_same_logits(net, "dm-wrn-10-2-meansparse")
  assert model.meansparse and model.mean == rb.CIFAR10_MEAN


RA_SETTINGS: dict[str, Any] = dict(stem_width=8, depths=(1, 2, 1), widths=(12, 16, 24))


def small_ra_wide_resnet(rb: Any) -> Any:
  """RobustBench's RaWideResNet (module `rb`) in the settings `RA_SETTINGS` name."""
  return rb.NormalizedWideResNet(
    rb.CIFAR10_MEAN,
    rb.CIFAR10_STD,
    depth=list(RA_SETTINGS["depths"]),
    stage_width=list(RA_SETTINGS["widths"]),
    stem_width=RA_SETTINGS["stem_width"],
    groups=[1, 1, 1],
    activation_fn=nn.SiLU,
    se_ratio=0.25,
    se_activation=nn.ReLU,
    se_order=2,
  )


def test_ra_wide_resnet_matches_robustbench(
  tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
  torchvision_misc(monkeypatch)
  rb = rb_module("robustarch_wide_resnet", tmp_path)
  net = small_ra_wide_resnet(rb)
  model = check_same_logits(randomized(net), "ra-wrn-70-16", **RA_SETTINGS)
  assert model.se_ratio == 0.25


def test_ra_wide_resnet_with_meansparse_matches_robustbench(
  tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
  torchvision_misc(monkeypatch)
  rb = rb_module("Meansparse_ra_wrn_70_16", tmp_path)
  net = small_ra_wide_resnet(rb)
  check_same_logits(random_meansparse(randomized(net)), "ra-wrn-70-16-meansparse", **RA_SETTINGS)


@pytest.mark.slow  # three ResNet-50 branches in each library
def test_chen_ensemble_matches_robustbench(tmp_path: Path) -> None:
  rb = rb_module("resnet", tmp_path)
  chen = rb_zoo_class(
    "cifar10",
    "Chen2020AdversarialNet",
    ResNet=rb.ResNet,
    BottleneckChen2020AdversarialNet=rb.BottleneckChen2020AdversarialNet,
    replace={"[3, 4, 6, 3]": "[1, 2, 1, 1]"},  # fewer blocks (one with an identity shortcut)
  )
  net = randomized(chen())
  model = check_same_logits(net, "preact-resnet-50-x3", stage_blocks=(1, 2, 1, 1))
  assert model.branches == 3 and model.mean == pytest.approx((0.485, 0.456, 0.406))
  # RobustBench's files: one a branch (load_model's `<entry>_m<i>.pt`), without mu and sigma
  branches = [{"state_dict": branch.state_dict()} for branch in net.models]
  entry = zoo.find("cifar10/Linf/Chen2020Adversarial")
  assert isinstance(entry.normalisation, list)
  mean, std = entry.normalisation
  settings: dict[str, Any] = dict(stage_blocks=(1, 2, 1, 1), mean=mean, std=std)
  from_branches, variables = interop.from_torch(branches, "preact-resnet-50-x3", **settings)
  _, whole = interop.from_torch(net.state_dict(), "preact-resnet-50-x3", stage_blocks=(1, 2, 1, 1))
  assert from_branches == model  # the class's normalisation, which no file holds
  as_lists = lambda tree: jax.tree.map(lambda a: np.asarray(a).tolist(), tree)
  assert as_lists(variables) == as_lists(whole)


def test_torchvision_resnet18_behind_robustbench_normalisation(tmp_path: Path) -> None:
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
def test_new_twins_compute_the_flax_models_function(arch: str, settings: dict[str, Any]) -> None:
  name, full = interop.architecture(arch, **settings)
  model = jr.models.create(name, num_classes=5, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.25), **full)
  net = random_meansparse(
    randomized(
      interop.twin(name, num_classes=5, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.25), **full)
    )
  )
  x = np.random.default_rng(1).uniform(size=(2, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    expected = net(interop.nhwc_to_nchw(x)).numpy()
  loaded, variables = interop.from_torch(net.state_dict(), arch, **settings)
  np.testing.assert_allclose(jax.jit(loaded.apply)(variables, x), expected, atol=ATOL, rtol=0)
  back = interop.to_torch(loaded, variables)
  with torch.no_grad():
    np.testing.assert_allclose(back(interop.nhwc_to_nchw(x)).numpy(), expected, atol=1e-6, rtol=0)
  assert loaded == model
