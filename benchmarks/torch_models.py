"""PyTorch twins of jaxrobust's Flax models, with the same weights.

`to_torch(model, variables)` returns a `torch.nn.Module` in evaluation mode
that computes the same logits as `model.apply(variables, x, train=False)`, on
images in [0, 1] laid out NCHW (PyTorch's convention; torchattacks expects
that) instead of NHWC. Supported: `SmallCNN`, `SeedCNN`, `PreActResNet18` and
`WideResNet`.

What the conversion takes care of:
- conv kernels: Flax HWIO -> PyTorch OIHW;
- dense kernels: Flax [in, out] -> PyTorch [out, in]; the first dense layer
  after a flatten also has its input rows reordered from Flax's (H, W, C)
  flatten order to PyTorch's (C, H, W), so the PyTorch model flattens NCHW
  activations directly;
- "SAME" padding: symmetric `padding=k // 2` where XLA's SAME padding is
  symmetric (stride 1, odd kernels); a strided 3x3 SAME conv pads 0 before and
  1 after on even inputs, which PyTorch's symmetric padding cannot express, so
  an explicit `F.pad` does it;
- BatchNorm: scale/bias -> weight/bias, the running mean and variance, eps
  (Flax's default 1e-5) and momentum (Flax 0.9 is PyTorch 0.1);
- the `Normalize` layer inside every model: (x - mean) / std per channel.

PyTorch is a benchmark-only dependency; this module imports it at import time.
"""
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from jaxrobust import models as jr_models


def _tensor(a):
  return torch.from_numpy(np.array(a, dtype=np.float32, copy=True))


class Normalize(nn.Module):
  """(x - mean) / std per channel, on NCHW images."""

  def __init__(self, mean, std):
    super().__init__()
    self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
    self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

  def forward(self, x):
    return (x - self.mean) / self.std


class SamePadConv2d(nn.Conv2d):
  """A conv with XLA's "SAME" padding: total max((out-1)*s + k - in, 0), the
  smaller half before. Symmetric cases use PyTorch's own padding."""

  def __init__(self, in_channels, out_channels, kernel_size, stride=1, bias=True):
    super().__init__(in_channels, out_channels, kernel_size, stride=stride,
                     padding=0, bias=bias)

  def forward(self, x):
    pads = []
    for size, k, s in zip(x.shape[:-3:-1], self.kernel_size[::-1], self.stride[::-1]):
      out = -(-size // s)
      total = max((out - 1) * s + k - size, 0)
      pads += [total // 2, total - total // 2]
    if any(pads):
      x = F.pad(x, pads)
    return super().forward(x)


def _conv(kernel, bias=None, stride=1, padding="SAME"):
  """A torch conv with Flax's HWIO `kernel` (and `bias`)."""
  kh, kw, cin, cout = kernel.shape
  symmetric = padding == "VALID" or (stride == 1 and kh % 2 == 1 and kw % 2 == 1)
  if symmetric:
    pad = 0 if padding == "VALID" else (kh // 2, kw // 2)
    conv = nn.Conv2d(cin, cout, (kh, kw), stride=stride, padding=pad, bias=bias is not None)
  else:
    conv = SamePadConv2d(cin, cout, (kh, kw), stride=stride, bias=bias is not None)
  with torch.no_grad():
    conv.weight.copy_(_tensor(np.transpose(np.asarray(kernel), (3, 2, 0, 1))))
    if bias is not None:
      conv.bias.copy_(_tensor(bias))
  return conv


def _dense(kernel, bias, flatten_hwc=None):
  """A torch linear layer with Flax's [in, out] `kernel`.

  `flatten_hwc=(H, W, C)` reorders the input rows from Flax's NHWC flatten
  order to PyTorch's NCHW one.
  """
  kernel = np.asarray(kernel)
  if flatten_hwc is not None:
    h, w, c = flatten_hwc
    kernel = kernel.reshape(h, w, c, -1).transpose(2, 0, 1, 3).reshape(h * w * c, -1)
  linear = nn.Linear(kernel.shape[0], kernel.shape[1])
  with torch.no_grad():
    linear.weight.copy_(_tensor(kernel.T))
    linear.bias.copy_(_tensor(bias))
  return linear


def _batch_norm(params, stats, eps=1e-5, momentum=0.9):
  bn = nn.BatchNorm2d(params["scale"].shape[0], eps=eps, momentum=1.0 - momentum)
  with torch.no_grad():
    bn.weight.copy_(_tensor(params["scale"]))
    bn.bias.copy_(_tensor(params["bias"]))
    bn.running_mean.copy_(_tensor(stats["mean"]))
    bn.running_var.copy_(_tensor(stats["var"]))
  return bn


class SmallCNN(nn.Module):
  """jaxrobust's SmallCNN: conv-conv-pool twice, dense, dense."""

  def __init__(self, model, variables, input_hw=(32, 32)):
    super().__init__()
    p = variables["params"]
    self.normalize = Normalize(model.mean, model.std)
    self.convs = nn.ModuleList([_conv(p[f"Conv_{i}"]["kernel"], p[f"Conv_{i}"]["bias"])
                                for i in range(4)])
    h, w = input_hw[0] // 4, input_hw[1] // 4
    self.fc1 = _dense(p["Dense_0"]["kernel"], p["Dense_0"]["bias"], (h, w, 2 * model.width))
    self.fc2 = _dense(p["Dense_1"]["kernel"], p["Dense_1"]["bias"])

  def forward(self, x):
    x = self.normalize(x)
    for stage in range(2):
      x = F.relu(self.convs[2 * stage](x))
      x = F.relu(self.convs[2 * stage + 1](x))
      x = F.max_pool2d(x, 2, 2)
    x = torch.flatten(x, 1)
    return self.fc2(F.relu(self.fc1(x)))


class SeedCNN(nn.Module):
  """jaxrobust's SeedCNN, the PyTorch tutorial's network."""

  def __init__(self, model, variables, input_hw=(32, 32)):
    super().__init__()
    p = variables["params"]
    self.normalize = Normalize(model.mean, model.std)
    self.conv1 = _conv(p["Conv_0"]["kernel"], p["Conv_0"]["bias"], padding="VALID")
    self.conv2 = _conv(p["Conv_1"]["kernel"], p["Conv_1"]["bias"], padding="VALID")
    h, w = input_hw
    for _ in range(2):
      h, w = (h - 4) // 2, (w - 4) // 2
    self.fc1 = _dense(p["Dense_0"]["kernel"], p["Dense_0"]["bias"], (h, w, 16))
    self.fc2 = _dense(p["Dense_1"]["kernel"], p["Dense_1"]["bias"])
    self.fc3 = _dense(p["Dense_2"]["kernel"], p["Dense_2"]["bias"])

  def forward(self, x):
    x = self.normalize(x)
    x = F.max_pool2d(F.relu(self.conv1(x)), 2, 2)
    x = F.max_pool2d(F.relu(self.conv2(x)), 2, 2)
    x = torch.flatten(x, 1)
    return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class PreActBlock(nn.Module):
  """jaxrobust's PreActBlock: BN-ReLU-conv, BN-ReLU-conv, plus shortcut."""

  def __init__(self, params, stats, strides):
    super().__init__()
    # Flax names modules in call order: BN, [shortcut conv], conv, BN, conv.
    convs = [params[f"Conv_{i}"] for i in range(3) if f"Conv_{i}" in params]
    self.has_shortcut = len(convs) == 3
    if self.has_shortcut:
      self.shortcut = _conv(convs[0]["kernel"], stride=strides)
      convs = convs[1:]
    self.bn1 = _batch_norm(params["BatchNorm_0"], stats["BatchNorm_0"])
    self.conv1 = _conv(convs[0]["kernel"], stride=strides)
    self.bn2 = _batch_norm(params["BatchNorm_1"], stats["BatchNorm_1"])
    self.conv2 = _conv(convs[1]["kernel"])

  def forward(self, x):
    out = F.relu(self.bn1(x))
    shortcut = self.shortcut(out) if self.has_shortcut else x
    out = self.conv1(out)
    out = self.conv2(F.relu(self.bn2(out)))
    return out + shortcut


class _PreActNet(nn.Module):
  """Stem conv, pre-activation blocks, BN-ReLU, global average pool, dense."""

  def __init__(self, model, variables, strides):
    super().__init__()
    p, s = variables["params"], variables["batch_stats"]
    self.normalize = Normalize(model.mean, model.std)
    self.stem = _conv(p["Conv_0"]["kernel"])
    self.blocks = nn.Sequential(*[
        PreActBlock(p[f"PreActBlock_{i}"], s[f"PreActBlock_{i}"], stride)
        for i, stride in enumerate(strides)])
    self.bn = _batch_norm(p["BatchNorm_0"], s["BatchNorm_0"])
    self.fc = _dense(p["Dense_0"]["kernel"], p["Dense_0"]["bias"])

  def forward(self, x):
    x = self.blocks(self.stem(self.normalize(x)))
    x = F.relu(self.bn(x))
    return self.fc(torch.mean(x, dim=(2, 3)))


class PreActResNet18(_PreActNet):
  """jaxrobust's PreActResNet18."""

  def __init__(self, model, variables, input_hw=None):
    del input_hw
    super().__init__(model, variables, [1, 1, 2, 1, 2, 1, 2, 1])


class WideResNet(_PreActNet):
  """jaxrobust's WideResNet-depth-width."""

  def __init__(self, model, variables, input_hw=None):
    del input_hw
    blocks = (model.depth - 4) // 6
    strides = [2 if stage > 0 and b == 0 else 1 for stage in range(3) for b in range(blocks)]
    super().__init__(model, variables, strides)


CONVERTERS = {
    jr_models.SmallCNN: SmallCNN,
    jr_models.SeedCNN: SeedCNN,
    jr_models.PreActResNet18: PreActResNet18,
    jr_models.WideResNet: WideResNet,
}


def to_torch(model, variables, input_hw=(32, 32)):
  """The PyTorch twin of Flax `model` with `variables`, in evaluation mode.

  Args:
    model: a jaxrobust model (`SmallCNN`, `SeedCNN`, `PreActResNet18`,
      `WideResNet`).
    variables: its Flax variables (`{"params": ..., "batch_stats": ...}`).
    input_hw: image height and width (the flatten layer of the plain CNNs
      depends on it).

  Returns:
    `torch.nn.Module` mapping NCHW float32 images in [0, 1] to logits.
  """
  converter = CONVERTERS.get(type(model))
  if converter is None:
    raise ValueError(f"no PyTorch converter for {type(model).__name__}; "
                     f"supported: {', '.join(c.__name__ for c in CONVERTERS)}")
  variables = {k: v for k, v in variables.items()}
  net = converter(model, variables, tuple(input_hw))
  return net.eval()


def nhwc_to_nchw(x):
  """numpy NHWC images -> a contiguous float32 torch NCHW tensor."""
  return torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(x, np.float32), (0, 3, 1, 2))))


def nchw_to_nhwc(x):
  """torch NCHW tensor -> numpy NHWC array."""
  return np.ascontiguousarray(x.detach().cpu().numpy().transpose(0, 2, 3, 1))
