"""RobustBench's zoo by name (`jaxrobust.zoo`), and its architectures against RobustBench's own.

The architectures are compared with RobustBench's own PyTorch definitions,
read at test time from a RobustBench repository (git directory) or wheel
(`rb_module`): nothing of RobustBench is vendored, and these tests skip when
neither is present (set `JAXROBUST_ROBUSTBENCH` to either).
"""

import importlib.util
import os
import subprocess
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrobust import interop

torch = pytest.importorskip("torch")
nn = torch.nn

ATOL = 1e-4
SOURCES = (
  os.environ.get("JAXROBUST_ROBUSTBENCH", ""),
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
  path = tmp_path / f"rb_{module}.py"
  path.write_text(text)
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


def check_same_logits(net, arch, hw=(32, 32), **settings):
  """RobustBench's `net` and `from_torch(net.state_dict(), arch)` agree, both ways."""
  x = np.random.default_rng(1).uniform(size=(2, *hw, 3)).astype(np.float32)
  with torch.no_grad():
    out = net(interop.nhwc_to_nchw(x))
  expected = (out[0] if isinstance(out, tuple) else out).numpy()
  model, variables = interop.from_torch(net.state_dict(), arch, **settings)
  got = np.asarray(jax.jit(model.apply)(variables, jnp.asarray(x)))
  np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)
  back = interop.torch_state_dict(model, variables)  # to_torch's weights, RobustBench's keys
  net.load_state_dict(
    {k: torch.from_numpy(np.array(v)) for k, v in back.items() if k in net.state_dict()}
  )
  with torch.no_grad():
    out = net(interop.nhwc_to_nchw(x))
  np.testing.assert_allclose((out[0] if isinstance(out, tuple) else out).numpy(), expected, atol=0)
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
