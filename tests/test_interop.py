"""PyTorch models in, Flax models out (`jaxrobust.interop`); skipped without PyTorch.

Every architecture, with random weights and BatchNorm statistics away from
their initial values, computes the same logits in PyTorch and in jaxrobust
whichever side the weights start on, and a Flax -> PyTorch -> Flax round trip
returns the arrays it started from. The checkpoints of RobustBench's zoo are
stood in for by small PyTorch networks written here in RobustBench's layout.
"""

import functools
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrobust as jr
from jaxrobust import interop

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional

ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
ATOL = 1e-4

# Every architecture, tiny: (arch, settings, image height and width).
ARCHS = {
  "small_cnn": ("small_cnn", dict(width=2), (12, 8)),
  "seed_cnn": ("seed_cnn", {}, (20, 16)),
  "preact-resnet-18": ("preact-resnet-18", dict(width=2), (8, 8)),
  "resnet-18": ("resnet-18", dict(width=2), (8, 8)),
  "wrn-10-1": ("wrn-10-1", {}, (8, 8)),
  "wide_resnet (same, pads 0-1 then 1-1)": ("wide_resnet", dict(depth=10, width=1), (10, 10)),
  # Swish: test_robustbench_checkpoints_load.
  "dm-wrn-10-1 (relu)": ("dm-wrn-10-1", dict(activation="relu"), (8, 8)),
  "preact-resnet-18-plain": ("preact-resnet-18-plain", dict(width=2), (8, 8)),
  "dm-preact-resnet-18": ("dm-preact-resnet-18", dict(width=2), (8, 8)),
  "resnet-50-cifar": ("resnet-50-cifar", dict(width=2, stage_blocks=(1, 2, 1, 1)), (8, 8)),
  "resnet-50 (torchvision)": ("resnet-50", dict(width=2, stage_blocks=(1, 2, 1, 1)), (18, 18)),
  "wide-resnet-50-2": ("wide-resnet-50-2", dict(width=2, stage_blocks=(1, 1, 2, 1)), (17, 17)),
  "robust-wrn-4-6-8-4-1-2-1": ("robust-wrn-4-6-8-4-1-2-1", {}, (8, 8)),
  "wrn-10-1-cosine": ("wrn-10-1-cosine", {}, (8, 8)),
}


@functools.cache
def compiled(model):
  return jax.jit(model.apply)


def logits(model, variables, x):
  """The model's logits, compiled once per model (models compare by value, so
  both directions of a test share the program)."""
  return np.asarray(compiled(model)(variables, x))


def flatten_hw(name, hw):
  return hw if name in ("small_cnn", "seed_cnn") else None


def randomize_batch_norm(net, seed):
  """BatchNorm scale, bias and running statistics away from their initial values."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, nn.BatchNorm2d):
        m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
        m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
        m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=g))
        m.running_var.copy_(0.5 + 1.5 * torch.rand(m.running_var.shape, generator=g))
  return net


def random_variables(model, hw, channels=3, seed=0):
  """Random Flax variables of `model` on `hw` images (numpy, no jax.random: XLA:CPU
  compiles the initialisers for tens of seconds): kernels N(0, 1 / fan-in),
  biases and BatchNorm shifts and means N(0, 0.2^2), scales 1 + N(0, 0.2^2),
  variances U(0.5, 2)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *hw, channels)))
  rng = np.random.default_rng(seed)

  def draw(path, s):
    name = str(getattr(path[-1], "key", ""))
    if name == "kernel":
      a = rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1]))
    elif name == "var":
      a = rng.uniform(0.5, 2.0, size=s.shape)
    else:
      a = (name == "scale") + 0.2 * rng.normal(size=s.shape)
    return jnp.asarray(a, jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def images(hw, n=3, seed=1):
  return np.random.default_rng(seed).uniform(size=(n, *hw, 3)).astype(np.float32)


def torch_logits(net, x):
  with torch.no_grad():
    return net(interop.nhwc_to_nchw(x)).numpy()


@pytest.mark.parametrize("arch, settings, hw", ARCHS.values(), ids=ARCHS)
def test_torch_weights_give_the_same_logits_in_jaxrobust(arch, settings, hw):
  name, full = interop.architecture(arch, **settings)
  net = randomize_batch_norm(
    interop.twin(name, num_classes=5, mean=MEAN, std=STD, input_hw=hw, **full), seed=0
  )
  x = images(hw)
  model, variables = interop.from_torch(
    net.state_dict(), arch, input_hw=flatten_hw(name, hw), **settings
  )
  assert model.mean == MEAN and model.std == STD and model.num_classes == 5
  expected = torch_logits(net, x)
  got = logits(model, variables, x)
  assert got.shape == expected.shape == (3, 5)
  np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch, settings, hw", ARCHS.values(), ids=ARCHS)
def test_flax_weights_give_the_same_logits_in_torch_and_round_trip(arch, settings, hw):
  name, full = interop.architecture(arch, **settings)
  model = jr.models.create(name, num_classes=5, mean=MEAN, std=STD, **full)
  x = images(hw)
  variables = random_variables(model, hw)
  net = interop.to_torch(model, variables, input_hw=flatten_hw(name, hw))
  assert not net.training
  np.testing.assert_allclose(torch_logits(net, x), logits(model, variables, x), atol=ATOL, rtol=0)

  back, back_variables = interop.from_torch(
    net.state_dict(), arch, input_hw=flatten_hw(name, hw), **settings
  )
  assert back == model
  assert jax.tree.structure(back_variables) == jax.tree.structure(variables)
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(back_variables)):
    assert np.array_equal(np.asarray(a), np.asarray(b))


# Real sizes: the PyTorch layout of the zoo's architectures, on the meta
# device (shapes only, no memory), against the Flax model's.
REAL = {
  "wrn-28-10": 36_479_194,
  "wrn-34-10": 46_160_474,
  "wrn-34-20": None,
  "wrn-70-16": None,
  "dm-wrn-28-10": 36_479_194,
  "dm-wrn-70-16": None,
  "resnet-18": 11_173_962,
  "preact-resnet-18": None,
  "preact-resnet-18-plain": 11_171_146,
  "dm-preact-resnet-18": None,
  "resnet-50-cifar": 23_520_842,
  "resnet-50": 25_557_032,  # torchvision's resnet50, 1000 classes
  "wide-resnet-50-2": 68_883_240,  # torchvision's wide_resnet50_2
}


@pytest.mark.parametrize("arch", REAL)
def test_real_size_layouts_match_robustbench(arch):
  name, settings = interop.architecture(arch)
  classes, side = (1000, 224) if arch in ("resnet-50", "wide-resnet-50-2") else (10, 32)
  model = jr.models.create(name, num_classes=classes, mean=MEAN, std=STD, **settings)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, side, side, 3)))
  shapes = jax.tree.map(lambda s: s.shape, shapes)
  want = {
    key: (
      () if kind == "count" else interop.torch_shape(kind, interop.layouts.get_path(shapes, path))
    )
    for key, path, kind in interop.layout(model, shapes["params"])
  }
  with torch.device("meta"):
    net = interop.twin(name, num_classes=classes, mean=MEAN, std=STD, **settings)
  got = {k: tuple(v.shape) for k, v in net.state_dict().items() if k not in ("mean", "std")}
  assert got == want
  n_params = sum(p.numel() for p in net.parameters())
  assert n_params == sum(
    np.prod(s) for s in jax.tree.leaves(shapes["params"], is_leaf=lambda s: isinstance(s, tuple))
  )
  if REAL[arch] is not None:
    assert n_params == REAL[arch]
  if arch == "wrn-28-10":
    assert got["block1.layer.0.convShortcut.weight"] == (160, 16, 1, 1)
    assert got["block3.layer.3.conv2.weight"] == (640, 640, 3, 3)
    assert got["fc.weight"] == (10, 640)
  if arch == "dm-wrn-70-16":
    assert got["layer.2.block.10.conv_1.weight"] == (1024, 1024, 3, 3)
    assert got["init_conv.weight"] == (16, 3, 3, 3) and got["logits.weight"] == (10, 1024)


# RobustBench's layouts, written here from its definitions (not the library's
# twins): DeepMind's WideResNet pads by hand, (1, 1) at stride 1 and (0, 1) at
# stride 2, with Swish; the standard WideResNet pads (1, 1) whatever the stride.


class RBDMBlock(nn.Module):
  def __init__(self, cin, cout, stride):
    super().__init__()
    self.batchnorm_0 = nn.BatchNorm2d(cin)
    self.conv_0 = nn.Conv2d(cin, cout, 3, stride, padding=0, bias=False)
    self.batchnorm_1 = nn.BatchNorm2d(cout)
    self.conv_1 = nn.Conv2d(cout, cout, 3, 1, padding=1, bias=False)
    self.has_shortcut = cin != cout
    if self.has_shortcut:
      self.shortcut = nn.Conv2d(cin, cout, 1, stride, padding=0, bias=False)
    self.stride = stride

  def forward(self, x):
    swish = lambda v: v * torch.sigmoid(v)
    act = swish(self.batchnorm_0(x))
    padded = F.pad(act, (1, 1, 1, 1) if self.stride == 1 else (0, 1, 0, 1))
    out = self.conv_1(swish(self.batchnorm_1(self.conv_0(padded))))
    return out + (self.shortcut(act) if self.has_shortcut else x)


class RBDMGroup(nn.Module):
  def __init__(self, n, cin, cout, stride):
    super().__init__()
    self.block = nn.Sequential(
      *[RBDMBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)]
    )

  def forward(self, x):
    return self.block(x)


class RBDMWideResNet(nn.Module):
  def __init__(self, depth, width, mean, std, num_classes=10):
    super().__init__()
    n, c = (depth - 4) // 6, [16, 16 * width, 32 * width, 64 * width]
    self.register_buffer("mean", torch.tensor(mean).view(3, 1, 1))
    self.register_buffer("std", torch.tensor(std).view(3, 1, 1))
    self.init_conv = nn.Conv2d(3, 16, 3, 1, padding=1, bias=False)
    self.layer = nn.Sequential(
      RBDMGroup(n, c[0], c[1], 1), RBDMGroup(n, c[1], c[2], 2), RBDMGroup(n, c[2], c[3], 2)
    )
    self.batchnorm = nn.BatchNorm2d(c[3])
    self.logits = nn.Linear(c[3], num_classes)

  def forward(self, x):
    out = self.layer(self.init_conv((x - self.mean) / self.std))
    out = self.batchnorm(out)
    out = F.avg_pool2d(out * torch.sigmoid(out), out.shape[-1])
    return self.logits(out.flatten(1))


class RBBlock(nn.Module):
  def __init__(self, cin, cout, stride):
    super().__init__()
    self.bn1, self.bn2 = nn.BatchNorm2d(cin), nn.BatchNorm2d(cout)
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, padding=1, bias=False)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, padding=1, bias=False)
    self.equal = cin == cout
    if not self.equal:
      self.convShortcut = nn.Conv2d(cin, cout, 1, stride, padding=0, bias=False)

  def forward(self, x):
    act = F.relu(self.bn1(x))
    out = self.conv2(F.relu(self.bn2(self.conv1(act))))
    return out + (x if self.equal else self.convShortcut(act))


class RBNetworkBlock(nn.Module):
  def __init__(self, n, cin, cout, stride):
    super().__init__()
    self.layer = nn.Sequential(
      *[RBBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)]
    )

  def forward(self, x):
    return self.layer(x)


class RBWideResNet(nn.Module):
  def __init__(self, depth, width, num_classes=10):
    super().__init__()
    n, c = (depth - 4) // 6, [16, 16 * width, 32 * width, 64 * width]
    self.conv1 = nn.Conv2d(3, 16, 3, 1, padding=1, bias=False)
    self.block1 = RBNetworkBlock(n, c[0], c[1], 1)
    self.block2 = RBNetworkBlock(n, c[1], c[2], 2)
    self.block3 = RBNetworkBlock(n, c[2], c[3], 2)
    self.bn1 = nn.BatchNorm2d(c[3])
    self.fc = nn.Linear(c[3], num_classes)

  def forward(self, x):
    out = self.block3(self.block2(self.block1(self.conv1(x))))
    out = F.avg_pool2d(F.relu(self.bn1(out)), 8)
    return self.fc(out.flatten(1))


@pytest.mark.parametrize(
  "arch, net, wrap",
  [
    ("dm-wrn-10-2", lambda: RBDMWideResNet(10, 2, MEAN, STD), "state_dict"),
    ("wrn-10-2", lambda: RBWideResNet(10, 2), "model"),
  ],
)
def test_robustbench_checkpoints_load(arch, net, wrap, tmp_path):
  # As RobustBench stores them: saved from nn.DataParallel ("module."),
  # nested under a key; read back from the file.
  torch.manual_seed(0)
  net = randomize_batch_norm(net().eval(), seed=1)
  path = tmp_path / "model.pt"
  state = net.state_dict()
  if arch.startswith("wrn"):  # TRADES' checkpoints keep an unused copy of block1
    state.update(
      {
        k.replace("block1.", "sub_block1.", 1): torch.zeros_like(v)
        for k, v in state.items()
        if k.startswith("block1.")
      }
    )
  torch.save({wrap: {f"module.{k}": v for k, v in state.items()}}, path)
  model, variables = interop.from_torch(interop.load_checkpoint(path), arch)
  x = images((32, 32), n=4)
  np.testing.assert_allclose(logits(model, variables, x), torch_logits(net, x), atol=ATOL, rtol=0)
  if arch.startswith("dm"):
    assert model.activation == "swish" and model.mean == pytest.approx(MEAN)
  else:  # RobustBench's plain models take [0, 1]: no normalisation
    assert model.mean == (0.0,) * 3 and model.std == (1.0,) * 3 and model.padding == "torch"


def test_mean_and_std_without_buffers_come_from_the_settings():
  torch.manual_seed(0)
  net = RBWideResNet(10, 1).eval()
  model, variables = interop.from_torch(net.state_dict(), "wrn-10-1", mean=MEAN, std=STD)
  x = images((32, 32))
  normalised = (x - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
  np.testing.assert_allclose(
    logits(model, variables, x), torch_logits(net, normalised), atol=ATOL, rtol=0
  )


# Files.


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_save_checkpoint_round_trips_and_records_the_architecture(suffix, tmp_path):
  model = jr.models.create("wide_resnet", num_classes=4, mean=MEAN, std=STD, depth=10, width=1)
  variables = random_variables(model, (8, 8))
  path = tmp_path / f"model{suffix}"
  interop.save_checkpoint(path, model, variables)
  checkpoint = interop.load_checkpoint(path)
  arch, settings = interop.checkpoint_architecture(checkpoint)
  assert (arch, settings) == ("wide_resnet", dict(depth=10, width=1, padding="same"))
  back, back_variables = interop.from_torch(checkpoint, arch, **settings)
  assert back.depth == 10 and back.padding == "same" and back.num_classes == 4
  assert back.mean == pytest.approx(MEAN, rel=1e-6)
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(back_variables)):
    assert np.array_equal(np.asarray(a), np.asarray(b))
  # The .pt file is a PyTorch state dict the twin loads strictly.
  if suffix == ".pt":
    net = interop.twin("wide_resnet", num_classes=4, mean=MEAN, std=STD, **settings)
    net.load_state_dict(checkpoint["state_dict"])


def test_safetensors_are_read_with_numpy(tmp_path):
  tensors = {
    "a": np.arange(6, dtype=np.float32).reshape(2, 3),
    "b": np.array([1, -2], np.int64),
    "c": np.array([0.5, 1.5], np.float16),
  }
  path = tmp_path / "t.safetensors"
  interop.write_safetensors(path, tensors, {"arch": "x"})
  got = interop.read_safetensors(path)
  assert got["__metadata__"] == {"arch": "x"}
  for k, v in tensors.items():
    assert got[k].dtype == v.dtype and np.array_equal(got[k], v)
  # bfloat16: the high half of a float32, as the format stores it.
  values = np.array([1.0, -2.5, 0.15625], np.float32)
  raw = (values.view(np.uint32) >> 16).astype("<u2").tobytes()
  header = json.dumps({"w": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]}}).encode()
  (tmp_path / "bf16.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + raw)
  np.testing.assert_array_equal(
    interop.read_safetensors(tmp_path / "bf16.safetensors")["w"], values
  )


def test_torch_tensors_in_bfloat16_are_read():
  net = interop.twin("small_cnn", num_classes=3, mean=(0.5,), std=(0.5,), width=2, input_hw=(8, 8))
  state = {
    k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in net.state_dict().items()
  }
  model, variables = interop.from_torch(state, "small_cnn", width=2)
  np.testing.assert_array_equal(
    np.asarray(variables["params"]["Conv_0"]["bias"]), state["convs.0.bias"].float().numpy()
  )


# Bad input: one clear InputError naming what is wrong.


def tiny_wrn_state():
  return interop.twin(
    "wide_resnet", num_classes=10, mean=MEAN, std=STD, depth=10, width=1, padding="torch"
  ).state_dict()


def test_a_missing_key_is_named():
  state = tiny_wrn_state()
  del state["block2.layer.0.conv2.weight"]
  with pytest.raises(jr.InputError, match=r"wrn-10-1.*lacks 'block2.layer.0.conv2.weight'"):
    interop.from_torch(state, "wrn-10-1")


def test_an_unknown_key_is_named():
  state = tiny_wrn_state()
  state["block2.layer.0.extra.weight"] = torch.zeros(3)
  with pytest.raises(jr.InputError, match=r"has 'block2.layer.0.extra.weight'.*does not"):
    interop.from_torch(state, "wrn-10-1")


def test_a_wrong_shape_names_the_key_and_both_shapes():
  state = tiny_wrn_state()
  state["block2.layer.0.conv1.weight"] = torch.zeros(32, 16, 5, 5)
  with pytest.raises(
    jr.InputError,
    match=r"'block2.layer.0.conv1.weight' has shape "
    r"\(32, 16, 5, 5\) in the checkpoint, the architecture needs "
    r"\(32, 16, 3, 3\)",
  ):
    interop.from_torch(state, "wrn-10-1")


def test_a_checkpoint_of_another_architecture_is_refused():
  with pytest.raises(jr.InputError, match=r"does not fit arch 'dm-wrn-10-1'.*'init_conv.weight'"):
    interop.from_torch(tiny_wrn_state(), "dm-wrn-10-1")
  with pytest.raises(
    jr.InputError,
    match=r"'wrn-16-1': it lacks 'block1.layer.1.bn1.bias' "
    r"\(and \d+ more\)",
  ):
    interop.from_torch(tiny_wrn_state(), "wrn-16-1")
  with pytest.raises(jr.InputError, match="unknown architecture 'wrn28'"):
    interop.from_torch(tiny_wrn_state(), "wrn28")


@pytest.mark.parametrize(
  "content, fragment",
  [
    (b"", "shorter than the 8-byte header"),
    (b"\xff" * 8 + b"{}", "truncated, or not safetensors"),
    ((2).to_bytes(8, "little") + b"no", "not JSON"),
  ],
)
def test_bad_safetensors_are_refused(content, fragment, tmp_path):
  path = tmp_path / "bad.safetensors"
  path.write_bytes(content)
  with pytest.raises(jr.InputError, match=fragment):
    interop.load_checkpoint(path)


def test_a_pickled_module_is_refused_with_advice(tmp_path):
  net = interop.twin("seed_cnn", num_classes=3, mean=(0.5,), std=(0.5,))
  torch.save(net, tmp_path / "net.pt")
  with pytest.raises(jr.InputError, match=r"pickled Python objects.*state_dict\(\)"):
    interop.load_checkpoint(tmp_path / "net.pt")


def test_truncated_files_are_refused(tmp_path):
  model = jr.models.create("small_cnn", num_classes=3, mean=(0.5,), std=(0.5,), width=2)
  variables = random_variables(model, (8, 8), channels=1)
  for suffix, fragment in ((".safetensors", "truncated"), (".pt", "not one, or truncated")):
    path = tmp_path / f"m{suffix}"
    interop.save_checkpoint(path, model, variables)
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(jr.InputError, match=fragment):
      interop.load_checkpoint(path)


def test_unsupported_models_are_refused():
  with pytest.raises(jr.InputError, match="no PyTorch converter"):
    interop.to_torch(object(), {})
  spectral = jr.models.create(
    "small_cnn", num_classes=3, mean=(0.5,), std=(0.5,), width=2, spectral=dict(mode="operator")
  )
  variables = random_variables(spectral, (8, 8), channels=1)
  with pytest.raises(jr.InputError, match="spectral normalisation"):
    interop.to_torch(spectral, variables)


def test_missing_torch_is_a_clear_error(monkeypatch, tmp_path):
  # `import jaxrobust` (and interop) never imports torch; asking for it without
  # torch installed says how to install it.
  code = (
    "import sys, jaxrobust; jaxrobust.interop.read_safetensors; "
    "assert 'torch' not in sys.modules, 'torch imported'"
  )
  result = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
  )
  assert result.returncode == 0, result.stderr
  monkeypatch.setitem(sys.modules, "torch", None)  # what Python does for a missing package
  with pytest.raises(jr.InputError, match=r'pip install "jaxrobust\[torch\]"'):
    interop.load_checkpoint(Path(__file__))


# The benchmark's uses of the converter (attacks need input gradients to agree).


def test_input_gradients_agree():
  model = jr.models.create("small_cnn", num_classes=10, mean=MEAN, std=STD, width=2)
  x = jnp.asarray(images((8, 8), n=2))
  y = jnp.array([3, 7])
  variables = random_variables(model, (8, 8))
  loss = lambda x: -jnp.sum(jax.nn.log_softmax(model.apply(variables, x))[jnp.arange(2), y])
  expected = np.asarray(jax.jit(jax.grad(loss))(x))
  net = interop.to_torch(model, variables)
  xt = interop.nhwc_to_nchw(np.asarray(x)).requires_grad_(True)
  F.cross_entropy(net(xt), torch.tensor([3, 7]), reduction="sum").backward()
  np.testing.assert_allclose(interop.nchw_to_nhwc(xt.grad), expected, atol=1e-5, rtol=1e-4)


def test_batch_norm_settings_match_flax():
  model = jr.models.create("preact_resnet18", num_classes=10, mean=MEAN, std=STD, width=4)
  net = interop.to_torch(model, random_variables(model, (16, 16)))
  bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
  assert len(bns) == 17
  assert all(bn.eps == 1e-5 and abs(bn.momentum - 0.1) < 1e-9 for bn in bns)


# The command line: eval.py --export-torch and --torch-checkpoint.


def test_eval_exports_a_run_and_evaluates_the_checkpoint(cli, trained, tmp_path):
  # `trained`: a digits run of the small CNN, width 4 (conftest).
  workdir = trained
  from jaxrobust import data  # pylint: disable=g-import-not-at-top
  from jaxrobust.training import loop as experiment

  out = tmp_path / "small.pt"
  result = cli("eval.py", "--workdir", workdir, "--export-torch", out)
  assert result.returncode == 0, result.stderr
  assert f"wrote {out}" in result.stdout
  _, model, state = experiment.restore(workdir)
  checkpoint = interop.load_checkpoint(out)
  assert interop.checkpoint_architecture(checkpoint) == (
    "small_cnn",
    dict(width=4, input_hw=[8, 8]),
  )
  _, variables = interop.from_torch(checkpoint, "small_cnn", width=4)
  for a, b in zip(jax.tree.leaves(jax.device_get(state.variables)), jax.tree.leaves(variables)):
    assert np.array_equal(np.asarray(a), np.asarray(b))

  # Evaluated without the workdir (the checkpoint also records its architecture).
  report = tmp_path / "report.json"
  result = cli(
    "eval.py",
    "--torch-checkpoint",
    out,
    "--arch",
    "small_cnn",
    "--data",
    "digits",
    "--attacks",
    "pgd_linf",
    "--config.eval.attacks.pgd_linf.steps=2",
    "--limit",
    16,
    "--sanity=false",
    "--out",
    report,
  )
  assert result.returncode == 0, result.stderr
  assert f"PyTorch checkpoint {out}: arch small_cnn" in result.stdout
  assert "data digits (test split" in result.stdout
  rep = json.loads(report.read_text())
  assert (rep["torch_checkpoint"], rep["arch"], rep["data"]) == (str(out), "small_cnn", "digits")
  test = data.load("digits", "test")
  net = interop.to_torch(model, jax.device_get(state.variables))
  predicted = torch_logits(net, test.x[:16]).argmax(1)
  assert rep["n_examples"] == 16
  assert rep["clean_accuracy"] == pytest.approx(np.mean(predicted == test.y[:16]))
  pgd = rep["results"][0]
  assert pgd["attack"] == "pgd_linf" and pgd["settings"]["steps"] == 2
  assert pgd["accuracy"] <= rep["clean_accuracy"]
