"""RobustBench's architecture files for the tests, and the checks that compare jaxrobust with them.

The definitions are read at test time from a RobustBench repository (git
directory), wheel or installed package (`rb_module`): nothing of
RobustBench is vendored, and the tests that need them skip when none is
present (set `JAXROBUST_ROBUSTBENCH` to one). torchvision's `ops.misc`,
which RaWideResNet's files import, is imported, or else run from
torchvision's own files (set `JAXROBUST_TORCHVISION` to its wheel), as its
CUDA build does not import beside PyTorch's CPU build.
"""

import ast
import collections
import importlib.util
import itertools
import os
import re
import subprocess
import sys
import types
import zipfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrobust import interop

torch = pytest.importorskip("torch")
nn = torch.nn

ATOL = 1e-4


def _installed_robustbench() -> str:
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


def rb_file(relative: str) -> str | None:
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


def rb_source(module: str) -> str | None:
  """The text of RobustBench's `architectures/<module>.py`, or None."""
  return rb_file(f"{PREFIX.removeprefix('robustbench/')}{module}.py")


# RobustBench's imports of its sibling architecture files, relative or absolute.
SIBLING = r"^from (?:\.|robustbench\.model_zoo\.architectures\.)(\w+) import"


def rb_module(module: str, tmp_path: Path) -> types.ModuleType:
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
  assert spec is not None and spec.loader is not None
  mod = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(mod)
  except (ImportError, RuntimeError) as error:  # a package it imports is missing
    pytest.skip(f"RobustBench's {module}.py does not import here: {error}")
  return mod


def rb_zoo_class(dataset: str, name: str, **namespace: Any) -> type:
  """Class `name` of RobustBench's `model_zoo/<dataset>.py`, its source run in `namespace`."""
  text = rb_file(f"model_zoo/{dataset}.py")
  if text is None:
    pytest.skip(f"RobustBench's model_zoo/{dataset}.py not found (set JAXROBUST_ROBUSTBENCH)")
  (node,) = [n for n in ast.parse(text).body if isinstance(n, ast.ClassDef) and n.name == name]
  source = ast.get_source_segment(text, node)
  assert source is not None
  for old, new in namespace.pop("replace", {}).items():
    assert old in source, old
    source = source.replace(old, new)
  scope = {"torch": torch, "nn": nn, **namespace}
  exec(compile(source, f"robustbench/model_zoo/{dataset}.py", "exec"), scope)  # noqa: S102
  return scope[name]


def randomized(net: Any, seed: int = 0) -> Any:
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


def check_same_logits(
  net: Any, arch: str, hw: tuple[int, int] = (32, 32), roundtrip_atol: float = 0.0, **settings: Any
) -> Any:
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


def random_meansparse(net: Any, seed: int = 1) -> Any:
  """Random statistics and thresholds in every MeanSparse layer of `net`; returns `net`."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in net.modules():
      if type(m).__name__ == "MeanSparse":
        m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=g))
        m.running_var.copy_(0.2 + torch.rand(m.running_var.shape, generator=g))
        m.threshold.fill_(0.4 + 0.4 * float(torch.rand((), generator=g)))
  return net


def _installed_torchvision() -> str:
  """An installed torchvision's folder (found, not imported), or ""."""
  spec = importlib.util.find_spec("torchvision")
  return spec.submodule_search_locations[0] if spec and spec.submodule_search_locations else ""


def _torchvision_file(relative: str) -> str | None:
  """The text of torchvision's `torchvision/<relative>`, from its wheel or folder, or None."""
  for where in filter(
    None, (os.environ.get("JAXROBUST_TORCHVISION", ""), _installed_torchvision())
  ):
    path = Path(where)
    if path.suffix == ".whl" and path.is_file():
      with zipfile.ZipFile(path) as wheel:
        if f"torchvision/{relative}" in wheel.namelist():
          return wheel.read(f"torchvision/{relative}").decode()
    elif (path / relative).is_file():
      return (path / relative).read_text()
  return None


def torchvision_misc(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
  """torchvision's `ops.misc`, importable as such until the test ends; skips without torchvision.

  Imported where torchvision imports; else its own `ops/misc.py` run with the
  two functions it takes from `torchvision/utils.py` (read from the wheel at
  `JAXROBUST_TORCHVISION` or the installed folder), registered in
  `sys.modules` for the test only.
  """
  try:
    from torchvision.ops import misc  # noqa: PLC0415

    return misc
  except (ImportError, OSError, RuntimeError):  # the CUDA build beside torch's CPU build
    pass
  utils, text = _torchvision_file("utils.py"), _torchvision_file("ops/misc.py")
  if utils is None or text is None:
    pytest.skip("torchvision not found (set JAXROBUST_TORCHVISION to its wheel)")
  module = types.ModuleType("torchvision.ops.misc")
  scope = module.__dict__
  scope.update(collections=collections, repeat=itertools.repeat, Any=Any, torch=torch)
  scope["FunctionType"] = types.FunctionType
  wanted = ("_log_api_usage_once", "_make_ntuple")
  nodes: list[ast.stmt] = [
    n for n in ast.parse(utils).body if isinstance(n, ast.FunctionDef) and n.name in wanted
  ]
  exec(compile(ast.Module(nodes, []), "torchvision/utils.py", "exec"), scope)  # noqa: S102
  source = text.replace("from ..utils import _log_api_usage_once, _make_ntuple\n", "")
  assert source != text, "torchvision's ops/misc.py imports its helpers otherwise"
  exec(compile(source, "torchvision/ops/misc.py", "exec"), scope)  # noqa: S102
  package, ops = types.ModuleType("torchvision"), types.ModuleType("torchvision.ops")
  ops.misc, package.ops = module, ops  # type: ignore[attr-defined]
  for name, value in (
    ("torchvision", package),
    ("torchvision.ops", ops),
    (module.__name__, module),
  ):
    monkeypatch.setitem(sys.modules, name, value)
  return module
