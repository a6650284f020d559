"""PyTorch twins of jaxrobust's models: the same functions, in PyTorch's layout.

Each twin takes NCHW images in [0, 1] and computes the logits of its Flax
model (`jaxrobust.models`) with the same hyper-parameters; `interop` moves
the weights between the two. The twins of the zoo's architectures carry
RobustBench's parameter names (`state_dict` keys), so RobustBench's
checkpoints load into them and into the Flax models:

| jaxrobust model | PyTorch layout |
| --- | --- |
| `wide_resnet` | RobustBench's `WideResNet` (`conv1`, `block1.layer.0.bn1`, `fc`), `PAF_WideResNet` |
| `dm_wide_resnet` | RobustBench's `DMWideResNet` (`init_conv`, `layer.0.block.0.conv_0`) |
| `resnet18` | RobustBench's `ResNet18`, torchvision's `resnet18` (`torch_twins_zoo`) |
| `preact_resnet18` | RobustBench's `PreActResNet` (`PreActBlockV2` and `bn_before_fc`, or plain) |
| `dm_preact_resnet18` | RobustBench's `DMPreActResNet` (`torch_twins_zoo`) |
| `resnet50` | RobustBench's CIFAR `ResNet50`, torchvision's `resnet50` (`torch_twins_zoo`) |
| `robust_wide_resnet` | RobustBench's `RobustWideResNet` (`torch_twins_zoo`) |
| `ra_wide_resnet` | RobustBench's `NormalizedWideResNet`, MeanSparse's (`torch_twins_entries`) |
| `preact_resnet50_ensemble` | RobustBench's `Chen2020AdversarialNet` (`torch_twins_entries`) |
| `small_cnn`, `seed_cnn` | jaxrobust's own (`convs.0`, `fc1`; `conv1`, `fc1`) |

Every twin holds the normalisation as buffers `mean` and `std` of shape
[C, 1, 1] (as `DMWideResNet` does). This module imports PyTorch: import it
only through `interop`, which says how to install PyTorch when it is missing.
"""

import torch
import torch.nn.functional as F
from torch import nn

from jaxrobust import models
from jaxrobust.interop.layouts import DM_BLOCK, RB_PREACT_BLOCK, RB_WRN_BLOCK

ACTIVATIONS = {"relu": F.relu, "swish": F.silu}  # silu(x) = x sigmoid(x)


class PSSiLU(nn.Module):
  """`models.PSSiLU`, RobustBench's `PSSiLU` (parameters `alpha`, `beta`)."""

  def __init__(self):
    super().__init__()
    self.alpha = nn.Parameter(torch.ones(1))
    self.beta = nn.Parameter(torch.full((1,), 1e-8))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    beta = torch.abs(self.beta)
    return x * (torch.sigmoid(torch.abs(self.alpha) * x) - beta) / (1 - beta)


class Conv2d(nn.Conv2d):
  """`nn.Conv2d` padded as jaxrobust pads.

  `padding` is "valid" or one of `models.PADDINGS` ("same" depends on the
  input's size, so it pads in `forward`).
  """

  def __init__(self, in_channels, out_channels, kernel, stride=1, *, bias=False, padding="same"):
    super().__init__(in_channels, out_channels, kernel, stride, padding=0, bias=bias)
    self.mode = padding

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    if self.mode != "valid":
      (top, bottom), (left, right) = (
        models.padding_pair(self.mode, n, k, s)
        for n, k, s in zip(x.shape[2:], self.kernel_size, self.stride)
      )
      if top or bottom or left or right:
        x = F.pad(x, (left, right, top, bottom))
    return super().forward(x)


def batch_norm(channels: int) -> nn.BatchNorm2d:
  """PyTorch's BatchNorm2d with the settings of Flax's `nn.BatchNorm(momentum=0.9)`.

  eps 1e-5 on both sides; PyTorch's momentum is 1 - Flax's.

  Args:
    channels: the number of channels.

  Returns:
    `nn.BatchNorm2d(channels, eps=1e-5, momentum=0.1)`.
  """
  return nn.BatchNorm2d(channels, eps=1e-5, momentum=0.1)


class Twin(nn.Module):
  """A twin's normalisation: buffers `mean` and `std` [C, 1, 1]."""

  mean: torch.Tensor
  std: torch.Tensor

  def __init__(self, mean, std):
    super().__init__()
    self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1))
    self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(-1, 1, 1))

  def normalize(self, x: torch.Tensor) -> torch.Tensor:
    return (x - self.mean) / self.std


class SmallCNN(Twin):
  """`models.SmallCNN`: conv-conv-pool twice, dense, dense."""

  def __init__(self, num_classes, mean, std, *, width=32, input_hw=(32, 32)):
    super().__init__(mean, std)
    c = len(mean)
    chans = [(c, width), (width, width), (width, 2 * width), (2 * width, 2 * width)]
    self.convs = nn.ModuleList([Conv2d(i, o, 3, bias=True) for i, o in chans])
    h, w = input_hw[0] // 4, input_hw[1] // 4
    self.fc1 = nn.Linear(h * w * 2 * width, 4 * width)
    self.fc2 = nn.Linear(4 * width, num_classes)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.normalize(x)
    for stage in range(2):
      x = F.relu(self.convs[2 * stage](x))
      x = F.max_pool2d(F.relu(self.convs[2 * stage + 1](x)), 2, 2)
    return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


class SeedCNN(Twin):
  """`models.SeedCNN`, the PyTorch tutorial's network."""

  def __init__(self, num_classes, mean, std, *, input_hw=(32, 32)):
    super().__init__(mean, std)
    self.conv1 = Conv2d(len(mean), 6, 5, bias=True, padding="valid")
    self.conv2 = Conv2d(6, 16, 5, bias=True, padding="valid")
    h, w = input_hw
    for _ in range(2):
      h, w = (h - 4) // 2, (w - 4) // 2
    self.fc1 = nn.Linear(h * w * 16, 120)
    self.fc2 = nn.Linear(120, 84)
    self.fc3 = nn.Linear(84, num_classes)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.normalize(x)
    x = F.max_pool2d(F.relu(self.conv1(x)), 2, 2)
    x = F.max_pool2d(F.relu(self.conv2(x)), 2, 2)
    x = torch.flatten(x, 1)
    return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class PreActBlock(nn.Module):
  """`models.PreActBlock`, its layers named by `names` (role -> attribute).

  The roles are bn1, conv1, bn2, conv2, shortcut; a shortcut name ending in
  ".0" is a one-conv `nn.Sequential`. An `activation` that is a module (a
  shared `PSSiLU`) is registered as `activation`, as RobustBench's
  `PAF_BasicBlock` does.
  """

  def __init__(
    self,
    cin,
    cout,
    stride,
    *,
    names,
    activation="relu",
    padding="same",
    shortcut_from="activation",
    shortcut_kernel=1,
  ):
    super().__init__()
    self.names = names
    if isinstance(activation, nn.Module):
      self.activation = activation
    else:
      self.act = ACTIVATIONS[activation]
    self.shortcut_from = shortcut_from
    setattr(self, names["bn1"], batch_norm(cin))
    setattr(self, names["conv1"], Conv2d(cin, cout, 3, stride, padding=padding))
    setattr(self, names["bn2"], batch_norm(cout))
    setattr(self, names["conv2"], Conv2d(cout, cout, 3, padding=padding))
    self.has_shortcut = stride != 1 or cin != cout
    if self.has_shortcut:
      conv = Conv2d(cin, cout, shortcut_kernel, stride, padding=padding)
      attr = names["shortcut"].removesuffix(".0")
      setattr(self, attr, nn.Sequential(conv) if attr != names["shortcut"] else conv)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    layer = lambda role: getattr(self, self.names[role].removesuffix(".0"))
    act = self.activation if "activation" in self._modules else self.act
    out = act(layer("bn1")(x))
    source = out if self.shortcut_from == "activation" else x
    shortcut = layer("shortcut")(source) if self.has_shortcut else x
    out = layer("conv1")(out)
    out = layer("conv2")(act(layer("bn2")(out)))
    return out + shortcut


class Group(nn.Module):
  """Blocks in an `nn.Sequential` named `attr`.

  RobustBench's `NetworkBlock.layer` and `_BlockGroup.block`.
  """

  def __init__(self, attr, blocks):
    super().__init__()
    self.attr = attr
    setattr(self, attr, nn.Sequential(*blocks))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return getattr(self, self.attr)(x)


def _wrn_stages(depth, width, names, **block_settings):
  """[[block, ...] per stage] of a WideResNet-depth-width."""
  n = (depth - 4) // 6
  chans = [16, 16 * width, 32 * width, 64 * width]
  return [
    [
      PreActBlock(
        chans[s] if b == 0 else chans[s + 1],
        chans[s + 1],
        2 if s > 0 and b == 0 else 1,
        names=names,
        **block_settings,
      )
      for b in range(n)
    ]
    for s in range(3)
  ]


class WideResNet(Twin):
  """`models.WideResNet`, in RobustBench's `WideResNet` layout."""

  block1: nn.Module  # set by name in __init__
  block2: nn.Module
  block3: nn.Module

  def __init__(
    self,
    num_classes,
    mean,
    std,
    *,
    depth=28,
    width=10,
    padding="same",
    head="dense",
    activation="relu",
    per_image=False,
  ):
    super().__init__(mean, std)
    self.conv1 = Conv2d(len(mean), 16, 3, padding=padding)
    act = PSSiLU() if activation == "pssilu" else activation
    stages = _wrn_stages(depth, width, RB_WRN_BLOCK, padding=padding, activation=act)
    for s, blocks in enumerate(stages):
      setattr(self, f"block{s + 1}", Group("layer", blocks))
    self.bn1 = batch_norm(64 * width)
    self.head, self.per_image = head, per_image
    self.fc = nn.Linear(64 * width, num_classes, bias=head == "dense")
    if isinstance(act, nn.Module):
      self.activation = act
    else:
      self.act = ACTIVATIONS[act]

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.normalize(x)
    if self.per_image:
      std = torch.clamp(x.std(dim=(1, 2, 3), keepdim=True), min=x[0].numel() ** -0.5)
      x = (x - x.mean(dim=(1, 2, 3), keepdim=True)) / std
    x = self.block3(self.block2(self.block1(self.conv1(x))))
    act = self.activation if "activation" in self._modules else self.act
    x = torch.mean(act(self.bn1(x)), dim=(2, 3))
    if self.head == "cosine":
      return F.linear(F.normalize(x, dim=1), F.normalize(self.fc.weight, dim=1))
    return self.fc(x)


class DMWideResNet(Twin):
  """`models.DMWideResNet`, in RobustBench's `DMWideResNet` layout."""

  def __init__(
    self,
    num_classes,
    mean=models.CIFAR10_MEAN,
    std=models.CIFAR10_STD,
    *,
    depth=28,
    width=10,
    activation="swish",
  ):
    super().__init__(mean, std)
    self.act = ACTIVATIONS[activation]
    self.init_conv = Conv2d(len(mean), 16, 3, padding="dm")
    self.layer = nn.Sequential(
      *[
        Group("block", blocks)
        for blocks in _wrn_stages(depth, width, DM_BLOCK, activation=activation, padding="dm")
      ]
    )
    self.batchnorm = batch_norm(64 * width)
    self.logits = nn.Linear(64 * width, num_classes)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.layer(self.init_conv(self.normalize(x)))
    return self.logits(torch.mean(self.act(self.batchnorm(x)), dim=(2, 3)))


def _resnet18_layers(module, block, width, **settings):
  """Sets `module.layer1` to `layer4` (RobustBench's names) to `models.resnet18_blocks`."""
  blocks = models.resnet18_blocks(width)
  for s in range(4):
    layer = [
      block(cin, cout, stride, **settings) for stage, cin, cout, stride in blocks if stage == s
    ]
    setattr(module, f"layer{s + 1}", nn.Sequential(*layer))


class PreActResNet18(Twin):
  """`models.PreActResNet18`, in RobustBench's `PreActResNet` layout.

  With `PreActBlockV2` and `bn_before_fc=True`; with `final_bn=False` and
  `shortcut_from="input"`, the plain `PreActResNet18` (`PreActBlock`).
  """

  layer1: nn.Module  # set by `_resnet18_layers`
  layer2: nn.Module
  layer3: nn.Module
  layer4: nn.Module

  def __init__(
    self,
    num_classes,
    mean,
    std,
    *,
    padding="same",
    width=64,
    final_bn=True,
    shortcut_from="activation",
  ):
    super().__init__(mean, std)
    self.conv1 = Conv2d(len(mean), width, 3, padding=padding)
    _resnet18_layers(
      self, PreActBlock, width, names=RB_PREACT_BLOCK, padding=padding, shortcut_from=shortcut_from
    )
    self.final_bn = final_bn
    if final_bn:
      self.bn = batch_norm(8 * width)
    self.linear = nn.Linear(8 * width, num_classes)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.conv1(self.normalize(x))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    if self.final_bn:
      x = F.relu(self.bn(x))
    return self.linear(torch.mean(x, dim=(2, 3)))


TWINS = {
  "small_cnn": SmallCNN,
  "seed_cnn": SeedCNN,
  "preact_resnet18": PreActResNet18,
  "wide_resnet": WideResNet,
  "dm_wide_resnet": DMWideResNet,
}
