"""Which PyTorch key holds which Flax variable of a model, and how the arrays map.

A layout is a list of entries `(torch key, Flax path, kind)`. Kinds:

* "conv": W[h, w, i, o] = T[o, i, h, w] (Flax HWIO, PyTorch OIHW);
* "dense": W[i, o] = T[o, i];
* ("flatten", h, w): a dense layer after flattening an h x w map, whose rows
  are also reordered from PyTorch's (C, H, W) flatten order to Flax's (H, W, C);
* "vector": the same array (biases, BatchNorm's scale, bias, mean and var);
* "count": BatchNorm's `num_batches_tracked` and MeanSparse's
  `flag_update_statistics` and `batch_num`, PyTorch's alone (no Flax path).

A tensor PyTorch holds under several keys (a module shared or listed twice:
Dai et al.'s one PSSiLU, Chen et al.'s `models.0` = `branch1`) has an entry
per key, all with the same Flax path.
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeAlias

import flax.linen as nn
import numpy as np

from jaxrobust import checks, models
from jaxrobust.interop.architectures import model_ends, model_name

Kind: TypeAlias = str | tuple[str, int, int]
Path: TypeAlias = tuple[str, ...]
Entry: TypeAlias = tuple[str, Path | None, Kind]

# The PyTorch names of a pre-activation block's layers, by role (see
# `torch_twins.PreActBlock`): RobustBench's WideResNet, DeepMind's, PreAct ResNet's.
RB_WRN_BLOCK = dict(bn1="bn1", conv1="conv1", bn2="bn2", conv2="conv2", shortcut="convShortcut")
DM_BLOCK = dict(
  bn1="batchnorm_0", conv1="conv_0", bn2="batchnorm_1", conv2="conv_1", shortcut="shortcut"
)
RB_PREACT_BLOCK = dict(bn1="bn1", conv1="conv1", bn2="bn2", conv2="conv2", shortcut="shortcut.0")
RA_BLOCK = dict(DM_BLOCK, ms0="meansparse_0", ms1="meansparse_1", ms2="meansparse_2", se="se")
DM_PREACT_BLOCK = dict(
  bn1="batchnorm_0", conv1="conv_2d_1", bn2="batchnorm_1", conv2="conv_2d_2", shortcut="shortcut"
)


def _conv(key: str, path: Path, bias: bool = False) -> list[Entry]:
  entries: list[Entry] = [(f"{key}.weight", ("params", *path, "kernel"), "conv")]
  return entries + ([(f"{key}.bias", ("params", *path, "bias"), "vector")] if bias else [])


def _dense(key: str, path: Path, kind: Kind = "dense") -> list[Entry]:
  return [
    (f"{key}.weight", ("params", *path, "kernel"), kind),
    (f"{key}.bias", ("params", *path, "bias"), "vector"),
  ]


def _bn(key: str, path: Path) -> list[Entry]:
  return [
    (f"{key}.weight", ("params", *path, "scale"), "vector"),
    (f"{key}.bias", ("params", *path, "bias"), "vector"),
    (f"{key}.running_mean", ("batch_stats", *path, "mean"), "vector"),
    (f"{key}.running_var", ("batch_stats", *path, "var"), "vector"),
    (f"{key}.num_batches_tracked", None, "count"),
  ]


def _meansparse(key: str, path: Path) -> list[Entry]:
  return [
    (f"{key}.running_mean", ("batch_stats", *path, "mean"), "vector"),
    (f"{key}.running_var", ("batch_stats", *path, "var"), "vector"),
    (f"{key}.threshold", ("batch_stats", *path, "threshold"), "vector"),
    (f"{key}.flag_update_statistics", None, "count"),
    (f"{key}.batch_num", None, "count"),
  ]


def _preact_block(
  key: str,
  path: Path,
  params: Mapping[str, Any],
  names: Mapping[str, str],
  meansparse: bool = False,
) -> list[Entry]:
  """A `models.PreActBlock` (Flax: BN, [shortcut conv], conv, BN, conv, [SE], [MeanSparse])."""
  convs = ["conv1", "conv2"]
  if "Conv_2" in params:
    convs = ["shortcut"] + convs
  extra: list[Entry] = []
  if "SqueezeExcitation_0" in params:
    for fc in ("fc1", "fc2"):
      extra += _conv(f"{key}.{names['se']}.{fc}", (*path, "SqueezeExcitation_0", fc), bias=True)
  if meansparse:
    for i in range(3):
      extra += _meansparse(f"{key}.{names[f'ms{i}']}", (*path, f"MeanSparse_{i}"))
  return extra + (
    _bn(f"{key}.{names['bn1']}", (*path, "BatchNorm_0"))
    + _bn(f"{key}.{names['bn2']}", (*path, "BatchNorm_1"))
    + [
      e for i, role in enumerate(convs) for e in _conv(f"{key}.{names[role]}", (*path, f"Conv_{i}"))
    ]
  )


def _basic_block(
  key: str, path: Path, params: Mapping[str, Any], shortcut: str = "shortcut"
) -> list[Entry]:
  """A `models.BasicBlock` (Flax: conv, BN, conv, BN, [shortcut conv, BN])."""
  entries = (
    _conv(f"{key}.conv1", (*path, "Conv_0"))
    + _bn(f"{key}.bn1", (*path, "BatchNorm_0"))
    + _conv(f"{key}.conv2", (*path, "Conv_1"))
    + _bn(f"{key}.bn2", (*path, "BatchNorm_1"))
  )
  if "Conv_2" in params:
    entries += _conv(f"{key}.{shortcut}.0", (*path, "Conv_2")) + _bn(
      f"{key}.{shortcut}.1", (*path, "BatchNorm_2")
    )
  return entries


def _blocks(params: Mapping[str, Any], kind: str) -> list[tuple[str, Any]]:
  """The `(name, parameters)` of the blocks `kind`_0, `kind`_1, ... in order."""
  names = sorted((k for k in params if k.startswith(kind)), key=lambda k: int(k.split("_")[1]))
  return [(n, params[n]) for n in names]


def _cnn_layout(name: str, input_hw: Sequence[int]) -> list[Entry]:
  """The layout of `small_cnn` or `seed_cnn` on `input_hw` images."""
  if name == "small_cnn":
    h, w = input_hw[0] // 4, input_hw[1] // 4
    return (
      [e for i in range(4) for e in _conv(f"convs.{i}", (f"Conv_{i}",), bias=True)]
      + _dense("fc1", ("Dense_0",), ("flatten", h, w))
      + _dense("fc2", ("Dense_1",))
    )
  h, w = input_hw
  for _ in range(2):
    h, w = (h - 4) // 2, (w - 4) // 2
  return (
    _conv("conv1", ("Conv_0",), bias=True)
    + _conv("conv2", ("Conv_1",), bias=True)
    + _dense("fc1", ("Dense_0",), ("flatten", h, w))
    + _dense("fc2", ("Dense_1",))
    + _dense("fc3", ("Dense_2",))
  )


def _wide_resnet_layout(name: str, depth: int, params: Mapping[str, Any]) -> list[Entry]:
  """The layout of `wide_resnet` (RobustBench's names) or `dm_wide_resnet` (DeepMind's)."""
  n = (depth - 4) // 6
  dm = name == "dm_wide_resnet"
  block_key: Callable[[int], str] = (
    (lambda k: f"layer.{k // n}.block.{k % n}")
    if dm
    else (lambda k: f"block{k // n + 1}.layer.{k % n}")
  )
  first, last = model_ends(name, {})
  entries = _conv(first, ("Conv_0",))
  shared = ["activation"] if "activation" in params else []  # one PSSiLU, under every block too
  for k, (block, p) in enumerate(_blocks(params, "PreActBlock")):
    entries += _preact_block(block_key(k), (block,), p, DM_BLOCK if dm else RB_WRN_BLOCK)
    shared += [f"{block_key(k)}.activation"] if shared else []
  for key in shared:
    entries += [(f"{key}.{v}", ("params", "activation", v), "vector") for v in ("alpha", "beta")]
  head = _dense(last, ("Dense_0",))
  if "bias" not in params["Dense_0"]:  # the cosine head
    head = [(f"{last}.weight", ("params", "Dense_0", "kernel"), "dense")]
  return entries + _bn("batchnorm" if dm else "bn1", ("BatchNorm_0",)) + head


def _robust_wide_resnet_layout(
  model: nn.Module, params: Mapping[str, Any], robust_resnet: bool
) -> list[Entry]:
  """The layout of `robust_wide_resnet` (`RobustWideResNet`) or `robust_resnet` (`robust_resnet.py`)."""
  keys = [f"blocks.{s}.layer.{b}" for s, n in enumerate(model.depths) for b in range(n)]
  entries = _conv("stem_conv", ("Conv_0",))
  for key, (block, p) in zip(keys, _blocks(params, "PreActBlock"), strict=True):
    entries += _preact_block(key, (block,), p, RB_PREACT_BLOCK if robust_resnet else RB_WRN_BLOCK)
  final = _bn("norm1" if robust_resnet else "bn1", ("BatchNorm_0",))
  return entries + final + _dense("fc", ("Dense_0",))


def _ra_wide_resnet_layout(model: nn.Module, params: Mapping[str, Any]) -> list[Entry]:
  """The layout of `ra_wide_resnet` (RobustBench's `NormalizedWideResNet`, MeanSparse's)."""
  keys = [f"layer.{s}.block.{b}" for s, n in enumerate(model.depths) for b in range(n)]
  entries = _conv("init_conv", ("Conv_0",))
  for key, (block, p) in zip(keys, _blocks(params, "PreActBlock"), strict=True):
    entries += _preact_block(key, (block,), p, RA_BLOCK, model.meansparse)
  entries += _bn("batchnorm", ("BatchNorm_0",)) + _dense("logits", ("Dense_0",))
  return entries + (_meansparse("meansparse_end", ("MeanSparse_0",)) if model.meansparse else [])


def _ensemble_layout(model: nn.Module) -> list[Entry]:
  """The layout of `preact_resnet50_ensemble` (`Chen2020AdversarialNet`, each branch twice)."""
  entries: list[Entry] = []
  stages = models.bottleneck_blocks(model.width, model.stage_blocks)
  for b in range(model.branches):
    path: Path = (f"branch{b + 1}",)
    for top in (f"branch{b + 1}", f"models.{b}"):
      entries += _conv(f"{top}.conv1", (*path, "conv1")) + _bn(f"{top}.bn1", (*path, "bn1"))
      for k, (stage, _, _) in enumerate(stages):
        j = k - sum(1 for s, _, _ in stages[:k] if s < stage)
        key, block = f"{top}.layer{stage + 1}.{j}", (*path, f"block{k}")
        entries += _bn(f"{key}.bn0", (*block, "bn0"))
        for i in (1, 2, 3):
          entries += _conv(f"{key}.conv{i}", (*block, f"conv{i}"))
          entries += _bn(f"{key}.bn{i}", (*block, f"bn{i}")) if i < 3 else []
        if k == 0 or stages[k - 1][0] != stage:  # the first block of a stage
          entries += _conv(f"{key}.shortcut.0", (*block, "shortcut_conv"))
          entries += _bn(f"{key}.shortcut.1", (*block, "shortcut_bn"))
      entries += _dense(f"{top}.linear", (*path, "fc"))
  return entries


def _resnet_layout(model: nn.Module, name: str, params: Mapping[str, Any]) -> list[Entry]:
  """The layout of `preact_resnet18`, `resnet18` (RobustBench's names) or `dm_preact_resnet18`."""
  if name == "dm_preact_resnet18":
    entries = _conv("conv_2d", ("Conv_0",))
    for k, (block, p) in enumerate(_blocks(params, "PreActBlock")):
      entries += _preact_block(f"layer_{k // 2}.{k % 2}", (block,), p, DM_PREACT_BLOCK)
    return entries + _bn("batchnorm", ("BatchNorm_0",)) + _dense("logits", ("Dense_0",))
  if name == "preact_resnet18":
    entries = _conv("conv1", ("Conv_0",))
    for k, (block, p) in enumerate(_blocks(params, "PreActBlock")):
      entries += _preact_block(f"layer{k // 2 + 1}.{k % 2}", (block,), p, RB_PREACT_BLOCK)
    final = _bn("bn", ("BatchNorm_0",)) if model.final_bn else []
    return entries + final + _dense("linear", ("Dense_0",))
  torchvision = model.stem == "imagenet"
  entries = _conv("conv1", ("Conv_0",)) + _bn("bn1", ("BatchNorm_0",))
  for k, (block, p) in enumerate(_blocks(params, "BasicBlock")):
    shortcut = "downsample" if torchvision else "shortcut"
    entries += _basic_block(f"layer{k // 2 + 1}.{k % 2}", (block,), p, shortcut)
  return entries + _dense("fc" if torchvision else "linear", ("Dense_0",))


def _resnet50_layout(model: nn.Module, params: Mapping[str, Any]) -> list[Entry]:
  """The layout of `resnet50`: torchvision's names (ImageNet stem) or RobustBench's (CIFAR)."""
  torchvision = model.stem == "imagenet"
  shortcut = "downsample" if torchvision else "shortcut"
  entries = _conv("conv1", ("conv1",)) + _bn("bn1", ("bn1",))
  stages = models.bottleneck_blocks(model.width, model.stage_blocks)
  for k, (stage, _, _) in enumerate(stages):
    b = k - sum(1 for s, _, _ in stages[:k] if s < stage)
    key, path = f"layer{stage + 1}.{b}", (f"block{k}",)
    for i in (1, 2, 3):
      entries += _conv(f"{key}.conv{i}", (*path, f"conv{i}")) + _bn(
        f"{key}.bn{i}", (*path, f"bn{i}")
      )
    if "shortcut_conv" in params[f"block{k}"]:
      entries += _conv(f"{key}.{shortcut}.0", (*path, "shortcut_conv"))
      entries += _bn(f"{key}.{shortcut}.1", (*path, "shortcut_bn"))
  return entries + _dense("fc" if torchvision else "linear", ("fc",))


def layout(
  model: nn.Module, params: Mapping[str, Any], input_hw: Sequence[int] | None = None
) -> list[Entry]:
  """The PyTorch keys of a model's variables.

  Args:
    model: a jaxrobust model (`models.MODELS`).
    params: its parameters, a tree of arrays or shapes.
    input_hw: the image size (`small_cnn`, `seed_cnn`: the flatten's size).

  Returns:
    `[(torch key, Flax path, kind)]`, the order of the PyTorch state dict
    within each layer.
  """
  name = model_name(model)
  if name in ("small_cnn", "seed_cnn"):
    checks.require(input_hw is not None, f"the layout of {name} needs input_hw")
    assert input_hw is not None
    return _cnn_layout(name, input_hw)
  if name in ("wide_resnet", "dm_wide_resnet"):
    return _wide_resnet_layout(name, model.depth, params)
  if name == "resnet50":
    return _resnet50_layout(model, params)
  if name in ("robust_wide_resnet", "robust_resnet"):
    return _robust_wide_resnet_layout(model, params, name == "robust_resnet")
  if name == "ra_wide_resnet":
    return _ra_wide_resnet_layout(model, params)
  if name == "preact_resnet50_ensemble":
    return _ensemble_layout(model)
  return _resnet_layout(model, name, params)


def to_torch_layout(kind: Kind, a: Any) -> np.ndarray:
  """The PyTorch tensor of a Flax array.

  Args:
    kind: the layer's kind (see the module's docstring).
    a: the Flax array.

  Returns:
    The tensor as a contiguous numpy array (OIHW, [out, in], ...).
  """
  a = np.asarray(a)
  if kind == "conv":
    return np.ascontiguousarray(a.transpose(3, 2, 0, 1))
  if kind == "dense":
    return np.ascontiguousarray(a.T)
  if isinstance(kind, tuple):  # rows (h, w, c) -> (c, h, w)
    _, h, w = kind
    c = a.shape[0] // (h * w)
    return np.ascontiguousarray(
      a.reshape(h, w, c, -1).transpose(2, 0, 1, 3).reshape(h * w * c, -1).T
    )
  return a


def from_torch_layout(kind: Kind, t: Any) -> np.ndarray:
  """The Flax array of a PyTorch tensor, `to_torch_layout`'s inverse.

  Args:
    kind: the layer's kind (see the module's docstring).
    t: the tensor as a numpy array of the layout's shape.

  Returns:
    The Flax array (HWIO, [in, out], ...).
  """
  t = np.asarray(t)
  if kind == "conv":
    return np.ascontiguousarray(t.transpose(2, 3, 1, 0))
  if kind == "dense":
    return np.ascontiguousarray(t.T)
  if isinstance(kind, tuple):
    _, h, w = kind
    c = t.shape[1] // (h * w)
    return np.ascontiguousarray(
      t.T.reshape(c, h, w, -1).transpose(1, 2, 0, 3).reshape(h * w * c, -1)
    )
  return t


def torch_shape(kind: Kind, shape: Sequence[int]) -> tuple[int, ...]:
  """The shape of the PyTorch tensor of a Flax array of `shape` and `kind`."""
  if kind == "conv":
    return (shape[3], shape[2], shape[0], shape[1])
  if kind == "dense" or isinstance(kind, tuple):
    return tuple(shape[::-1])
  return tuple(shape)


def get_path(tree: Mapping[str, Any], path: Path) -> Any:
  """The leaf of nested dicts `tree` at `path`."""
  node: Any = tree
  for k in path:
    node = node[k]
  return node


def set_path(tree: dict[str, Any], path: Path, value: Any) -> None:
  """Sets the leaf of nested dicts `tree` at `path`, making the dicts on the way."""
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value
