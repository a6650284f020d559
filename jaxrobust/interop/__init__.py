"""PyTorch models in, Flax models out: checkpoints of RobustBench's zoo and others.

`from_torch(state_dict, arch)` returns a jaxrobust model and its variables
that compute what the PyTorch model with that `state_dict` computes;
`to_torch(model, variables)` the PyTorch twin (`torch_twins`) of a
jaxrobust model. Every model takes NHWC images in [0, 1] (the twins NCHW)
and normalises them inside. What the conversion maps, for a Flax variable W
and the PyTorch tensor T of the same layer:

* conv kernels: W[h, w, i, o] = T[o, i, h, w] (Flax HWIO, PyTorch OIHW);
* dense kernels: W[i, o] = T[o, i]; after a flatten (`small_cnn`,
  `seed_cnn`) the rows are also reordered from PyTorch's (C, H, W) flatten
  order to Flax's (H, W, C);
* BatchNorm: scale, bias = weight, bias; mean, var = running_mean,
  running_var; both use eps 1e-5, and Flax's momentum 0.9 is PyTorch's 0.1
  (`num_batches_tracked` is PyTorch's alone: read, ignored, written as 0);
* padding: XLA's "SAME" pads a stride-2 3x3 conv (0, 1) on even inputs,
  PyTorch's `padding=1` pads (1, 1): the zoo's architectures use the
  padding of their PyTorch definition (`models.PADDINGS`), and the twins pad
  as the Flax model does;
* normalisation: buffers `mean` and `std` [C, 1, 1] (DeepMind's
  WideResNet, and every twin) become the model's mean and std; a checkpoint
  without them gets the `mean`/`std` settings, else the architecture's
  default (identity for RobustBench's plain models, which take [0, 1]).

RobustBench's checkpoints are read as they are stored: the state dict may
be nested under "state_dict" or "model", and its keys may start with
"module." (saved from `nn.DataParallel`); a WideResNet's `sub_block1` (an
unused copy of `block1` in TRADES-derived checkpoints, such as Carmon et
al.'s) is ignored. Files: `.pt`/`.pth` (`torch.load`
with `weights_only=True`, needs PyTorch) and `.safetensors` (read here with
numpy, no PyTorch needed); `load_checkpoint`, `save_checkpoint`.

PyTorch is optional (`pip install "jaxrobust[torch]"`): it is imported only
by the functions that need it, and its absence raises `InputError`.
"""

import json
import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxrobust import checks, models

INSTALL_TORCH = 'pip install "jaxrobust[torch]"'

# RobustBench's names for the zoo's architectures: (jaxrobust model, settings).
ZOO = {
  "preact-resnet-18": ("preact_resnet18", {"padding": "torch"}),
  "resnet-18": ("resnet18", {"padding": "torch"}),
}
_WRN = re.compile(r"(dm-)?wrn-(\d+)-(\d+)")
ARCHS = (
  *models.MODELS,
  *ZOO,
  "wrn-<depth>-<width> (wrn-28-10, wrn-34-10, wrn-34-20, wrn-70-16)",
  "dm-wrn-<depth>-<width> (dm-wrn-28-10, dm-wrn-70-16)",
)

# (first conv, classifier) of each model's PyTorch layout: they fix the input
# channels and the classes.
_ENDS = {
  "small_cnn": ("convs.0", "fc2"),
  "seed_cnn": ("conv1", "fc3"),
  "preact_resnet18": ("conv1", "linear"),
  "resnet18": ("conv1", "linear"),
  "wide_resnet": ("conv1", "fc"),
  "dm_wide_resnet": ("init_conv", "logits"),
}
_FLATTENS = ("small_cnn", "seed_cnn")  # a dense layer after a flatten: input size matters


def import_torch():
  """The `torch` module, or `InputError` saying how to install it."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise checks.InputError(f"PyTorch is not installed; this needs it: {INSTALL_TORCH}") from None
  return torch


def architecture(arch, **settings):
  """(jaxrobust model name, settings) of `arch`: a name of `models.MODELS`, of
  `ZOO`, "wrn-D-W" (RobustBench's WideResNet-D-W) or "dm-wrn-D-W"
  (DeepMind's); `settings` override the architecture's."""
  checks.require(isinstance(arch, str), f"arch must be a name, got {arch!r}")
  wrn = _WRN.fullmatch(arch)
  if wrn:
    name = "dm_wide_resnet" if wrn.group(1) else "wide_resnet"
    own = dict(depth=int(wrn.group(2)), width=int(wrn.group(3)))
    if not wrn.group(1):
      own["padding"] = "torch"
  elif arch in ZOO:
    name, own = ZOO[arch][0], dict(ZOO[arch][1])
  else:
    checks.require(
      arch in models.MODELS, f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}"
    )
    name, own = arch, {}
  return name, {**own, **settings}


# ----------------------------------------------------------------------------
# The layout: which PyTorch key holds which Flax variable, and how.
# An entry is (torch key, Flax path, kind); kinds: "conv", "dense", "vector",
# "count" (BatchNorm's num_batches_tracked, no Flax variable) and
# ("flatten", h, w) (a dense layer after flattening an h x w map).


def _conv(key, path, bias=False):
  entries = [(f"{key}.weight", ("params", *path, "kernel"), "conv")]
  return entries + ([(f"{key}.bias", ("params", *path, "bias"), "vector")] if bias else [])


def _dense(key, path, kind="dense"):
  return [
    (f"{key}.weight", ("params", *path, "kernel"), kind),
    (f"{key}.bias", ("params", *path, "bias"), "vector"),
  ]


def _bn(key, path):
  return [
    (f"{key}.weight", ("params", *path, "scale"), "vector"),
    (f"{key}.bias", ("params", *path, "bias"), "vector"),
    (f"{key}.running_mean", ("batch_stats", *path, "mean"), "vector"),
    (f"{key}.running_var", ("batch_stats", *path, "var"), "vector"),
    (f"{key}.num_batches_tracked", None, "count"),
  ]


def _preact_block(key, path, params, names):
  """A `models.PreActBlock` (Flax: BN, [shortcut conv], conv, BN, conv)."""
  convs = ["conv1", "conv2"]
  if "Conv_2" in params:
    convs = ["shortcut"] + convs
  return (
    _bn(f"{key}.{names['bn1']}", (*path, "BatchNorm_0"))
    + _bn(f"{key}.{names['bn2']}", (*path, "BatchNorm_1"))
    + [
      e for i, role in enumerate(convs) for e in _conv(f"{key}.{names[role]}", (*path, f"Conv_{i}"))
    ]
  )


def _basic_block(key, path, params):
  """A `models.BasicBlock` (Flax: conv, BN, conv, BN, [shortcut conv, BN])."""
  entries = (
    _conv(f"{key}.conv1", (*path, "Conv_0"))
    + _bn(f"{key}.bn1", (*path, "BatchNorm_0"))
    + _conv(f"{key}.conv2", (*path, "Conv_1"))
    + _bn(f"{key}.bn2", (*path, "BatchNorm_1"))
  )
  if "Conv_2" in params:
    entries += _conv(f"{key}.shortcut.0", (*path, "Conv_2")) + _bn(
      f"{key}.shortcut.1", (*path, "BatchNorm_2")
    )
  return entries


def _blocks(params, kind):
  names = sorted((k for k in params if k.startswith(kind)), key=lambda k: int(k.split("_")[1]))
  return [(n, params[n]) for n in names]


def layout(model, params, input_hw=None):
  """[(torch key, Flax path, kind)] of `model` with parameters `params` (a
  tree of arrays or shapes); `input_hw`: the image size (`small_cnn`, `seed_cnn`)."""
  from jaxrobust.interop import torch_twins as tt  # pylint: disable=g-import-not-at-top

  name = model_name(model)
  if name == "small_cnn":
    h, w = input_hw[0] // 4, input_hw[1] // 4
    return (
      [e for i in range(4) for e in _conv(f"convs.{i}", (f"Conv_{i}",), bias=True)]
      + _dense("fc1", ("Dense_0",), ("flatten", h, w))
      + _dense("fc2", ("Dense_1",))
    )
  if name == "seed_cnn":
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
  if name in ("wide_resnet", "dm_wide_resnet"):
    n = (model.depth - 4) // 6
    dm = name == "dm_wide_resnet"
    block_key = (
      (lambda k: f"layer.{k // n}.block.{k % n}")
      if dm
      else (lambda k: f"block{k // n + 1}.layer.{k % n}")
    )
    first, last = _ENDS[name]
    entries = _conv(first, ("Conv_0",))
    for k, (block, p) in enumerate(_blocks(params, "PreActBlock")):
      entries += _preact_block(block_key(k), (block,), p, tt.DM_BLOCK if dm else tt.RB_WRN_BLOCK)
    return (
      entries + _bn("batchnorm" if dm else "bn1", ("BatchNorm_0",)) + _dense(last, ("Dense_0",))
    )
  if name == "preact_resnet18":
    entries = _conv("conv1", ("Conv_0",))
    for k, (block, p) in enumerate(_blocks(params, "PreActBlock")):
      entries += _preact_block(f"layer{k // 2 + 1}.{k % 2}", (block,), p, tt.RB_PREACT_BLOCK)
    return entries + _bn("bn", ("BatchNorm_0",)) + _dense("linear", ("Dense_0",))
  entries = _conv("conv1", ("Conv_0",)) + _bn("bn1", ("BatchNorm_0",))  # resnet18
  for k, (block, p) in enumerate(_blocks(params, "BasicBlock")):
    entries += _basic_block(f"layer{k // 2 + 1}.{k % 2}", (block,), p)
  return entries + _dense("linear", ("Dense_0",))


def to_torch_layout(kind, a):
  """The PyTorch tensor (numpy) of Flax array `a` of a layer of `kind`."""
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


def from_torch_layout(kind, t):
  """The Flax array of PyTorch tensor `t` (numpy, of the right shape)."""
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


def _torch_shape(kind, shape):
  if kind == "conv":
    return (shape[3], shape[2], shape[0], shape[1])
  if kind == "dense" or isinstance(kind, tuple):
    return tuple(shape[::-1])
  return tuple(shape)


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _set(tree, path, value):
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


# ----------------------------------------------------------------------------
# Flax -> PyTorch.


def model_name(model):
  """The `models.MODELS` name of a jaxrobust model; `InputError` for others."""
  for name, cls in models.MODELS.items():
    if type(model) is cls:  # pylint: disable=unidiomatic-typecheck
      return name
  checks.require(
    not models.is_randomized(model),
    "no PyTorch converter for a randomized model (Randomized): convert its "
    "base classifier, model.classifier",
  )
  raise checks.InputError(
    f"no PyTorch converter for {type(model).__name__}; supported: "
    f"{', '.join(c.__name__ for c in models.MODELS.values())}"
  )


def model_settings(model):
  """The hyper-parameters of `model` that `models.create` takes (no classes,
  normalisation or axis name): what an exported checkpoint records."""
  skip = {"num_classes", "mean", "std", "axis_name", "parent", "name", "spectral"}
  return {k: getattr(model, k) for k in type(model).__dataclass_fields__ if k not in skip}


def _input_hw(model, params, input_hw):
  """The image size the flatten of `small_cnn`/`seed_cnn` was built for:
  `input_hw`, else the square one its first dense layer's rows imply."""
  if model_name(model) not in _FLATTENS:
    return None
  if input_hw is not None:
    return tuple(input_hw)
  name = model_name(model)
  rows = np.shape(params["Dense_0"]["kernel"])[0]
  channels = 2 * model.width if name == "small_cnn" else 16
  side = math.isqrt(rows // channels)
  checks.require(
    side * side * channels == rows,
    f"{name}'s first dense layer has {rows} inputs, not those of a square "
    f"image; pass input_hw=(height, width)",
  )
  # side is the map size after the convs and pools; invert to the image size.
  return (side * 4, side * 4) if name == "small_cnn" else ((side * 2 + 4) * 2 + 4,) * 2


def torch_state_dict(model, variables, *, input_hw=None):
  """The PyTorch `state_dict` (numpy arrays, PyTorch's layout and key names)
  of jaxrobust `model` with `variables`; no PyTorch needed."""
  name = model_name(model)
  checks.require(
    not getattr(model, "spectral", None),
    f"{name} with spectral normalisation has no PyTorch twin; its kernels are "
    "rescaled on the fly (export a model without model.spectral)",
  )
  variables = jax.device_get(variables)
  params = variables["params"]
  hw = _input_hw(model, params, input_hw)
  state = {}
  for key, path, kind in layout(model, params, hw):
    state[key] = (
      np.zeros((), np.int64)
      if kind == "count"
      else to_torch_layout(kind, np.asarray(_get(variables, path), np.float32))
    )
  state["mean"] = np.asarray(model.mean, np.float32).reshape(-1, 1, 1)
  state["std"] = np.asarray(model.std, np.float32).reshape(-1, 1, 1)
  return state


def twin(name, *, num_classes, mean, std, input_hw=None, **settings):
  """A PyTorch twin of model `name` with `settings`, randomly initialised, in
  evaluation mode."""
  import_torch()
  from jaxrobust.interop import torch_twins  # pylint: disable=g-import-not-at-top

  if name in _FLATTENS:
    settings["input_hw"] = tuple(input_hw or (32, 32))
  return torch_twins.TWINS[name](num_classes, mean, std, **settings).eval()


def to_torch(model, variables, input_hw=None):
  """The PyTorch twin of jaxrobust `model` with `variables`, in evaluation mode.

  It maps NCHW float32 images in [0, 1] to the logits of
  `model.apply(variables, x, train=False)` (x NHWC). `input_hw`: the image
  size of `small_cnn`/`seed_cnn` (default: the square one their weights imply).
  """
  torch = import_torch()
  name = model_name(model)
  state = torch_state_dict(model, variables, input_hw=input_hw)
  hw = _input_hw(model, variables["params"], input_hw)
  net = twin(
    name,
    num_classes=model.num_classes,
    mean=tuple(model.mean),
    std=tuple(model.std),
    input_hw=hw,
    **model_settings(model),
  )
  net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
  return net.eval()


def nhwc_to_nchw(x):
  """numpy NHWC images -> a contiguous float32 torch NCHW tensor."""
  torch = import_torch()
  return torch.from_numpy(
    np.ascontiguousarray(np.transpose(np.asarray(x, np.float32), (0, 3, 1, 2)))
  )


def nchw_to_nhwc(x):
  """torch NCHW tensor -> numpy NHWC array."""
  return np.ascontiguousarray(x.detach().cpu().numpy().transpose(0, 2, 3, 1))


# ----------------------------------------------------------------------------
# PyTorch -> Flax.


def _numpy(key, value):
  if isinstance(value, np.ndarray):
    return value
  if hasattr(value, "detach"):  # a torch tensor (bfloat16 has no numpy dtype)
    value = value.detach().cpu()
    return (value.float() if value.is_floating_point() else value).numpy()
  raise checks.InputError(
    f"not a state_dict: key {key!r} holds a {type(value).__name__}, not a tensor"
  )


def state_dict_of(checkpoint):
  """The flat `{key: numpy array}` state dict in `checkpoint`: unwrapped from
  "state_dict" or "model" entries, with a "module." prefix removed."""
  state = checkpoint
  while isinstance(state, dict):
    inner = next(
      (state[k] for k in ("state_dict", "model") if isinstance(state.get(k), dict)), None
    )
    if inner is None:
      break
    state = inner
  checks.require(
    isinstance(state, dict) and state,
    f"not a state_dict: a {type(checkpoint).__name__} without tensors",
  )
  state = {k: v for k, v in state.items() if k != "__metadata__"}
  checks.require(state, "not a state_dict: a checkpoint without tensors")
  if all(k.startswith("module.") for k in state):
    state = {k.removeprefix("module."): v for k, v in state.items()}
  return {k: _numpy(k, v) for k, v in state.items()}


def _some(keys):
  """'first' (and N more) of `keys`."""
  keys = sorted(keys)
  return f"{keys[0]!r}" + (f" (and {len(keys) - 1} more)" if len(keys) > 1 else "")


def _shapes_error(arch, key, got, want):
  return checks.InputError(
    f"checkpoint does not fit arch {arch!r}: {key!r} has shape "
    f"{tuple(got)} in the checkpoint, the architecture needs "
    f"{tuple(want)}"
  )


def from_torch(state_dict, arch, *, input_hw=None, **settings):
  """A jaxrobust model and variables computing what the PyTorch model does.

  Args:
    state_dict: a PyTorch `state_dict` (tensors or numpy arrays), or a
      checkpoint holding one (see `state_dict_of`).
    arch: the architecture (see `architecture`): e.g. "wrn-28-10" for
      RobustBench's WideResNet-28-10, "dm-wrn-70-16" for DeepMind's.
    input_hw: the image size of `small_cnn`/`seed_cnn` (default: square).
    **settings: the model's settings (`models.create`), e.g. mean and std
      for a checkpoint without normalisation buffers.

  Returns:
    `(model, variables)`, `model.apply(variables, x)` on NHWC images in [0, 1].

  Raises:
    InputError: an unknown architecture, or a state dict that does not fit
      it (a missing or unknown key, or a shape), named with both shapes.
  """
  state = state_dict_of(state_dict)
  name, settings = architecture(arch, **settings)
  first, last = _ENDS[name]
  for key in (f"{first}.weight", f"{last}.weight"):
    checks.require(
      key in state,
      f"checkpoint does not fit arch {arch!r}: it has no "
      f"{key!r} (its keys begin {', '.join(list(state)[:3])})",
    )
  checks.require(
    state[f"{first}.weight"].ndim == 4 and state[f"{last}.weight"].ndim == 2,
    f"checkpoint does not fit arch {arch!r}: {first}.weight and {last}.weight "
    f"have shapes {state[f'{first}.weight'].shape} and "
    f"{state[f'{last}.weight'].shape}, not a conv's and a dense layer's",
  )
  channels, num_classes = state[f"{first}.weight"].shape[1], state[f"{last}.weight"].shape[0]
  mean, std = _normalisation(state, name, channels, settings)
  model = models.create(name, num_classes=int(num_classes), mean=mean, std=std, **settings)
  hw = (
    (_square_hw(state, name, arch, settings) if input_hw is None else tuple(input_hw))
    if name in _FLATTENS
    else (32, 32)
  )
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *hw, channels)))
  shapes = jax.tree.map(lambda s: s.shape, shapes)
  entries = layout(model, shapes["params"], hw)
  needed = {k for k, _, kind in entries if kind != "count"}
  optional = {k for k, _, kind in entries if kind == "count"} | {"mean", "std"}
  if name == "wide_resnet":  # TRADES-derived WideResNets keep an unused copy of block1
    optional |= {k for k in state if k.startswith("sub_block1.")}
  missing, unknown = needed - set(state), set(state) - needed - optional
  for key, path, kind in entries:  # shapes first: they say the most (e.g. another width)
    want = None if kind == "count" else _torch_shape(kind, _get(shapes, path))
    if key in state and want is not None and tuple(state[key].shape) != want:
      raise _shapes_error(arch, key, state[key].shape, want)
  if missing:
    raise checks.InputError(
      f"checkpoint does not fit arch {arch!r}: it lacks "
      f"{_some(missing)}, which the architecture needs"
    )
  if unknown:
    raise checks.InputError(
      f"checkpoint does not fit arch {arch!r}: it has "
      f"{_some(unknown)}, which the architecture does not"
    )
  variables = {}
  for key, path, kind in entries:
    if kind != "count":
      _set(variables, path, jnp.asarray(from_torch_layout(kind, state[key]), jnp.float32))
  return model, variables


def _normalisation(state, name, channels, settings):
  """(mean, std): the checkpoint's buffers, else `settings`', else the default."""
  default = (
    (models.CIFAR10_MEAN, models.CIFAR10_STD)
    if name == "dm_wide_resnet" and channels == 3
    else ((0.0,) * channels, (1.0,) * channels)
  )
  out = []
  for i, which in enumerate(("mean", "std")):
    given = settings.pop(which, None)
    if which in state:
      # float32 buffers: the shortest decimals that round-trip in float32 (0.49, not
      # 0.49000000953674316), so a model exported and read back compares equal.
      stored = tuple(float(str(v)) for v in np.asarray(state[which], np.float32).reshape(-1))
      checks.require(
        len(stored) == channels,
        f"the checkpoint's {which} has {len(stored)} values for {channels} input channels",
      )
      checks.require(
        given is None or np.allclose(given, stored, rtol=1e-6, atol=0),
        f"{which} {tuple(given or ())} differs from the checkpoint's {stored}",
      )
      out.append(stored)
    else:
      out.append(tuple(default[i] if given is None else given))
  return tuple(out)


def _square_hw(state, name, arch, settings):
  """The square image size implied by the first dense layer of a CNN."""
  rows = state["fc1.weight"].shape[1] if "fc1.weight" in state else 0
  channels = 2 * settings.get("width", 32) if name == "small_cnn" else 16
  side = math.isqrt(rows // channels) if rows else 0
  checks.require(
    side > 0 and side * side * channels == rows,
    f"checkpoint does not fit arch {arch!r}: fc1.weight has "
    f"{rows} inputs, not those of a square image; pass input_hw",
  )
  return (side * 4, side * 4) if name == "small_cnn" else ((side * 2 + 4) * 2 + 4,) * 2


# ----------------------------------------------------------------------------
# Files.

_SAFETENSORS = {
  "F64": np.float64,
  "F32": np.float32,
  "F16": np.float16,
  "I64": np.int64,
  "I32": np.int32,
  "I16": np.int16,
  "I8": np.int8,
  "U8": np.uint8,
  "BOOL": np.bool_,
  "BF16": None,
}


def load_checkpoint(path):
  """The contents of a checkpoint file: `.safetensors` (read with numpy) gives
  `{key: array}` (plus "__metadata__" when present); `.pt`/`.pth`/`.bin`
  (`torch.load(weights_only=True)`) gives what was saved.

  Raises:
    InputError: a missing file, one that is not a checkpoint, or a truncated one.
  """
  path = Path(path)
  checks.require(path.is_file(), f"checkpoint {str(path)!r} not found")
  if path.suffix == ".safetensors":
    return read_safetensors(path)
  torch = import_torch()
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except  # torch raises many kinds
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "Unsupported global" in str(e):  # a pickled class, not only tensors
      raise checks.InputError(
        f"{str(path)!r} holds pickled Python objects (a whole "
        "nn.Module?), which are not read here: save its "
        "model.state_dict() instead"
      ) from None
    raise checks.InputError(
      f"cannot read {str(path)!r} as a PyTorch checkpoint (not one, or truncated): {reason[:200]}"
    ) from None


def read_safetensors(path):
  """`{key: numpy array}` of a `.safetensors` file: an 8-byte little-endian
  header length n, n bytes of JSON `{key: {dtype, shape, data_offsets}}`,
  then the tensors' bytes (offsets relative to the end of the header)."""
  data = Path(path).read_bytes()
  bad = lambda why: checks.InputError(f"cannot read {str(path)!r} as safetensors: {why}")
  if len(data) < 8:
    raise bad(f"{len(data)} bytes, shorter than the 8-byte header length")
  n = int.from_bytes(data[:8], "little")
  if n > len(data) - 8:
    raise bad(
      f"its header needs {n} bytes, the file has {len(data) - 8} after the length "
      "(truncated, or not safetensors)"
    )
  try:
    header = json.loads(data[8 : 8 + n])
  except (UnicodeDecodeError, json.JSONDecodeError):
    raise bad("the header is not JSON") from None
  if not isinstance(header, dict):
    raise bad("the header is not a JSON object")
  buffer, out = memoryview(data)[8 + n :], {}
  for key, info in header.items():
    if key == "__metadata__":
      out[key] = info
      continue
    try:
      dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
    except (KeyError, TypeError, ValueError):
      raise bad(f"tensor {key!r} has no dtype, shape and data_offsets") from None
    if dtype not in _SAFETENSORS:
      raise bad(f"tensor {key!r} has dtype {dtype!r}, not one of {', '.join(_SAFETENSORS)}")
    size = 2 if dtype == "BF16" else np.dtype(_SAFETENSORS[dtype]).itemsize
    if not 0 <= begin <= end <= len(buffer):
      raise bad(
        f"tensor {key!r} lies at bytes {begin}-{end}, past the data's "
        f"{len(buffer)} bytes (truncated)"
      )
    if end - begin != size * math.prod(shape):
      raise bad(
        f"tensor {key!r} of shape {shape} and dtype {dtype} needs "
        f"{size * math.prod(shape)} bytes, has {end - begin}"
      )
    raw = buffer[begin:end]
    if dtype == "BF16":  # the high 16 bits of a float32
      a = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
    else:
      a = np.frombuffer(raw, np.dtype(_SAFETENSORS[dtype]).newbyteorder("<"))
    out[key] = a.reshape(shape).astype(a.dtype.newbyteorder("="))
  return out


def write_safetensors(path, tensors, metadata=None):
  """Writes `{key: array}` as a `.safetensors` file (`read_safetensors`'s format)."""
  codes = {np.dtype(v): k for k, v in _SAFETENSORS.items() if v is not None}
  header, chunks, offset = {}, [], 0
  for key, a in tensors.items():
    a = np.ascontiguousarray(a)
    checks.require(a.dtype in codes, f"cannot write {key!r} of dtype {a.dtype} as safetensors")
    raw = a.astype(a.dtype.newbyteorder("<")).tobytes()
    header[key] = {
      "dtype": codes[a.dtype],
      "shape": list(a.shape),
      "data_offsets": [offset, offset + len(raw)],
    }
    chunks.append(raw)
    offset += len(raw)
  if metadata:
    header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
  text = json.dumps(header, separators=(",", ":")).encode()
  text += b" " * (-len(text) % 8)  # the format pads the header to 8 bytes
  Path(path).write_bytes(len(text).to_bytes(8, "little") + text + b"".join(chunks))


def save_checkpoint(path, model, variables, *, input_hw=None):
  """Writes jaxrobust `model` with `variables` as a PyTorch checkpoint: `.pt`
  or `.pth` (`torch.save` of {"arch", "settings", "state_dict"}) or
  `.safetensors` (the state dict, with arch and settings in its metadata).
  `from_torch` reads either back (`checkpoint_architecture` gives the arch)."""
  path = check_export_path(path)
  name = model_name(model)
  settings = model_settings(model)
  state = torch_state_dict(model, variables, input_hw=input_hw)
  if name in _FLATTENS:
    settings["input_hw"] = list(_input_hw(model, variables["params"], input_hw))
  if path.suffix == ".safetensors":
    write_safetensors(path, state, {"arch": name, "settings": json.dumps(settings)})
    return
  torch = import_torch()
  torch.save(
    {
      "arch": name,
      "settings": settings,
      "state_dict": {k: torch.from_numpy(np.array(v)) for k, v in state.items()},
    },
    path,
  )


def check_export_path(path):
  """`path` as a Path if `save_checkpoint` can write its format (.pt, .pth or
  .safetensors), else InputError; checked before the export's work starts."""
  path = Path(path)
  checks.require(
    path.suffix in (".pt", ".pth", ".safetensors"),
    f"--export-torch writes .pt, .pth or .safetensors, not {path.name!r}",
  )
  return path


def checkpoint_architecture(checkpoint):
  """(arch, settings) a checkpoint written by `save_checkpoint` records, else None."""
  if not isinstance(checkpoint, dict):
    return None
  if isinstance(checkpoint.get("arch"), str):
    return checkpoint["arch"], dict(checkpoint.get("settings") or {})
  meta = checkpoint.get("__metadata__")
  if isinstance(meta, dict) and "arch" in meta:
    return meta["arch"], json.loads(meta.get("settings", "{}"))
  return None
