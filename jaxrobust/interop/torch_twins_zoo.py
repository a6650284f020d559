"""PyTorch twins of ResNet-18 and ResNet-50 (CIFAR, torchvision), DeepMind's PreAct ResNet-18, RobustWideResNet.

Like `torch_twins`, each takes NCHW images in [0, 1], holds the
normalisation as buffers `mean` and `std` [C, 1, 1], and carries the
`state_dict` keys of RobustBench's (or torchvision's) definition. This
module imports PyTorch: import it only through `interop`.
"""

import torch
import torch.nn.functional as F
from torch import nn

from jaxrobust import models
from jaxrobust.interop.layouts import DM_PREACT_BLOCK, RB_PREACT_BLOCK, RB_WRN_BLOCK
from jaxrobust.interop.torch_twins import (
  ACTIVATIONS,
  Conv2d,
  Group,
  PreActBlock,
  Twin,
  _resnet18_layers,
  batch_norm,
)


class BasicBlock(nn.Module):
  """`models.BasicBlock`: `shortcut.0` conv, `shortcut.1` BN (torchvision's: `downsample`)."""

  def __init__(self, cin, cout, stride, *, padding="same", shortcut_name="shortcut"):
    super().__init__()
    self.conv1 = Conv2d(cin, cout, 3, stride, padding=padding)
    self.bn1 = batch_norm(cout)
    self.conv2 = Conv2d(cout, cout, 3, padding=padding)
    self.bn2 = batch_norm(cout)
    shortcut = nn.Sequential()
    if stride != 1 or cin != cout:
      shortcut = nn.Sequential(Conv2d(cin, cout, 1, stride, padding=padding), batch_norm(cout))
    self.shortcut_name = shortcut_name
    setattr(self, shortcut_name, shortcut)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    out = F.relu(self.bn1(self.conv1(x)))
    return F.relu(self.bn2(self.conv2(out)) + getattr(self, self.shortcut_name)(x))


class ResNet18(Twin):
  """`models.ResNet18`, in RobustBench's `ResNet18` layout (torchvision's with `stem="imagenet"`)."""

  layer1: nn.Module  # set by `_resnet18_layers`
  layer2: nn.Module
  layer3: nn.Module
  layer4: nn.Module

  def __init__(self, num_classes, mean, std, *, padding="same", width=64, stem="cifar"):
    super().__init__(mean, std)
    self.stem = stem
    k, s = (7, 2) if stem == "imagenet" else (3, 1)
    self.conv1 = Conv2d(len(mean), width, k, s, padding=padding)
    self.bn1 = batch_norm(width)
    shortcut_name = "downsample" if stem == "imagenet" else "shortcut"
    _resnet18_layers(self, BasicBlock, width, padding=padding, shortcut_name=shortcut_name)
    setattr(self, "fc" if stem == "imagenet" else "linear", nn.Linear(8 * width, num_classes))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = F.relu(self.bn1(self.conv1(self.normalize(x))))
    if self.stem == "imagenet":
      x = F.max_pool2d(x, 3, 2, padding=1)
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    head = getattr(self, "fc" if self.stem == "imagenet" else "linear")
    return head(torch.mean(x, dim=(2, 3)))


class DMPreActResNet18(Twin):
  """`models.DMPreActResNet18`, in RobustBench's `DMPreActResNet` layout."""

  layer_0: nn.Module  # set in __init__
  layer_1: nn.Module
  layer_2: nn.Module
  layer_3: nn.Module

  def __init__(
    self,
    num_classes,
    mean=models.CIFAR10_MEAN,
    std=models.CIFAR10_STD,
    *,
    activation="swish",
    width=64,
  ):
    super().__init__(mean, std)
    self.act = ACTIVATIONS[activation]
    self.conv_2d = Conv2d(len(mean), width, 3, padding="dm")
    settings = dict(
      names=DM_PREACT_BLOCK,
      activation=activation,
      padding="dm",
      shortcut_from="input",
      shortcut_kernel=3,
    )
    _resnet18_layers(self, PreActBlock, width, **settings)
    for s in range(4):  # RobustBench's names: layer_0 ... layer_3
      setattr(self, f"layer_{s}", self._modules.pop(f"layer{s + 1}"))
    self.batchnorm = batch_norm(8 * width)
    self.logits = nn.Linear(8 * width, num_classes)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.conv_2d(self.normalize(x))
    x = self.layer_3(self.layer_2(self.layer_1(self.layer_0(x))))
    return self.logits(torch.mean(self.act(self.batchnorm(x)), dim=(2, 3)))


class Bottleneck(nn.Module):
  """`models.Bottleneck`; its shortcut is `shortcut_name` (`shortcut` or torchvision's `downsample`)."""

  def __init__(self, cin, planes, stride, *, shortcut_name="shortcut", inner=None):
    super().__init__()
    cout, inner = 4 * planes, inner or planes
    self.conv1, self.bn1 = Conv2d(cin, inner, 1, padding="torch"), batch_norm(inner)
    self.conv2 = Conv2d(inner, inner, 3, stride, padding="torch")
    self.bn2 = batch_norm(inner)
    self.conv3, self.bn3 = Conv2d(inner, cout, 1, padding="torch"), batch_norm(cout)
    self.shortcut_name = shortcut_name
    shortcut = nn.Sequential()
    if stride != 1 or cin != cout:
      shortcut = nn.Sequential(Conv2d(cin, cout, 1, stride, padding="torch"), batch_norm(cout))
    setattr(self, shortcut_name, shortcut)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    out = F.relu(self.bn1(self.conv1(x)))
    out = F.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return F.relu(out + getattr(self, self.shortcut_name)(x))


class ResNet50(Twin):
  """`models.ResNet50`: RobustBench's CIFAR `ResNet50` or torchvision's `resnet50` layout."""

  def __init__(
    self,
    num_classes,
    mean,
    std,
    *,
    stem="cifar",
    width=64,
    stage_blocks=(3, 4, 6, 3),
    group_width=64,
  ):
    super().__init__(mean, std)
    self.stem = stem
    imagenet = stem == "imagenet"
    self.conv1 = Conv2d(
      len(mean), width, 7 if imagenet else 3, 2 if imagenet else 1, padding="torch"
    )
    self.bn1 = batch_norm(width)
    cin, blocks = width, models.bottleneck_blocks(width, stage_blocks)
    for s in range(len(stage_blocks)):
      layer = []
      for stage, planes, stride in blocks:
        if stage == s:
          shortcut_name = "downsample" if imagenet else "shortcut"
          inner = planes * group_width // 64
          layer.append(Bottleneck(cin, planes, stride, shortcut_name=shortcut_name, inner=inner))
          cin = 4 * planes
      setattr(self, f"layer{s + 1}", nn.Sequential(*layer))
    self.n_stages = len(stage_blocks)
    setattr(self, "fc" if imagenet else "linear", nn.Linear(cin, num_classes))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = F.relu(self.bn1(self.conv1(self.normalize(x))))
    if self.stem == "imagenet":
      x = F.max_pool2d(x, 3, 2, padding=1)
    for s in range(self.n_stages):
      x = getattr(self, f"layer{s + 1}")(x)
    head = getattr(self, "fc" if self.stem == "imagenet" else "linear")
    return head(torch.mean(x, dim=(2, 3)))


class RobustWideResNet(Twin):
  """`models.RobustWideResNet`, in RobustBench's `RobustWideResNet` layout."""

  names, final = RB_WRN_BLOCK, "bn1"

  def __init__(
    self,
    num_classes,
    mean,
    std,
    *,
    channels=(16, 320, 640, 512),
    depths=(5, 5, 5),
    activation="relu",
  ):
    super().__init__(mean, std)
    self.act = ACTIVATIONS[activation]
    self.stem_conv = Conv2d(len(mean), channels[0], 3, padding="torch")
    stages = []
    for s, n in enumerate(depths):
      blocks = [
        PreActBlock(
          channels[s] if b == 0 else channels[s + 1],
          channels[s + 1],
          2 if s > 0 and b == 0 else 1,
          names=self.names,
          padding="torch",
          activation=activation,
        )
        for b in range(n)
      ]
      stages.append(Group("layer", blocks))
    self.blocks = nn.ModuleList(stages)
    setattr(self, self.final, batch_norm(channels[-1]))
    self.fc = nn.Linear(channels[-1], num_classes)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.stem_conv(self.normalize(x))
    for stage in self.blocks:
      x = stage(x)
    return self.fc(torch.mean(self.act(getattr(self, self.final)(x)), dim=(2, 3)))


class RobustResNet(RobustWideResNet):
  """`models.RobustResNet`, in RobustBench's `robust_resnet.PreActResNet` layout."""

  names, final = RB_PREACT_BLOCK, "norm1"

  def __init__(
    self,
    num_classes,
    mean,
    std,
    *,
    channels=(16, 160, 448, 384),
    depths=(27, 28, 13),
    activation="swish",
  ):
    super().__init__(
      num_classes, mean, std, channels=channels, depths=depths, activation=activation
    )


TWINS = {
  "resnet18": ResNet18,
  "dm_preact_resnet18": DMPreActResNet18,
  "resnet50": ResNet50,
  "robust_wide_resnet": RobustWideResNet,
  "robust_resnet": RobustResNet,
}
