"""PyTorch twins of RaWideResNet (with MeanSparse) and Chen et al.'s ResNet-50 ensemble.

Like `torch_twins`, each takes NCHW images in [0, 1], holds the
normalisation as buffers `mean` and `std` [C, 1, 1], and carries the
`state_dict` keys of RobustBench's definition. This module imports
PyTorch: import it only through `interop`.
"""

import torch
import torch.nn.functional as F
from torch import nn

from jaxrobust import models
from jaxrobust.interop.torch_twins import ACTIVATIONS, Conv2d, Group, Twin, batch_norm


class MeanSparse(nn.Module):
  """`models.MeanSparse`, with the buffers of RobustBench's `MeanSparse`."""

  running_mean: torch.Tensor
  running_var: torch.Tensor
  threshold: torch.Tensor

  def __init__(self, channels):
    super().__init__()
    self.register_buffer("running_mean", torch.zeros(channels))
    self.register_buffer("running_var", torch.zeros(channels))
    self.register_buffer("threshold", torch.tensor(0.0))
    self.register_buffer("flag_update_statistics", torch.tensor(0))
    self.register_buffer("batch_num", torch.tensor(0.0))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    mean = self.running_mean.view(1, -1, 1, 1)
    crop = self.threshold * torch.sqrt(self.running_var).view(1, -1, 1, 1)
    return torch.where(torch.abs(x - mean) < crop, mean.expand_as(x), x)


class SqueezeExcitation(nn.Module):
  """`models.SqueezeExcitation`, torchvision's layout (`fc1`, `fc2`)."""

  def __init__(self, channels, squeeze):
    super().__init__()
    self.fc1 = nn.Conv2d(channels, squeeze, 1)
    self.fc2 = nn.Conv2d(squeeze, channels, 1)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    s = self.fc2(F.relu(self.fc1(torch.mean(x, dim=(2, 3), keepdim=True))))
    return x * torch.sigmoid(s)


class RaBlock(nn.Module):
  """`models.PreActBlock` with "dm" padding, squeeze-excitation and MeanSparse (`RA_BLOCK` names)."""

  def __init__(self, cin, cout, stride, *, activation, se_ratio, meansparse):
    super().__init__()
    self.act = ACTIVATIONS[activation]
    self.batchnorm_0 = batch_norm(cin)
    self.conv_0 = Conv2d(cin, cout, 3, stride, padding="dm")
    self.batchnorm_1 = batch_norm(cout)
    self.conv_1 = Conv2d(cout, cout, 3, padding="dm")
    self.has_shortcut = stride != 1 or cin != cout
    if self.has_shortcut:
      self.shortcut = Conv2d(cin, cout, 1, stride, padding="dm")
    self.se = SqueezeExcitation(cout, int(round(se_ratio * cout))) if se_ratio else None
    self.meansparse = meansparse
    if meansparse:
      self.meansparse_0, self.meansparse_1 = MeanSparse(cin), MeanSparse(cout)
      self.meansparse_2 = MeanSparse(cout)

  def _sparse(self, i: int, x: torch.Tensor) -> torch.Tensor:
    return getattr(self, f"meansparse_{i}")(x) if self.meansparse else x

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    out = self.act(self._sparse(0, self.batchnorm_0(x)))
    shortcut = self.shortcut(out) if self.has_shortcut else x
    out = self.conv_0(out)
    out = self.conv_1(self.act(self._sparse(1, self.batchnorm_1(out))))
    if self.se is not None:
      out = self.se(out)
    return self._sparse(2, out + shortcut)


class RaWideResNet(Twin):
  """`models.RaWideResNet`, in RobustBench's `NormalizedWideResNet` layout."""

  def __init__(
    self,
    num_classes,
    mean=models.CIFAR10_MEAN,
    std=models.CIFAR10_STD,
    *,
    stem_width=96,
    depths=(30, 31, 10),
    widths=(216, 432, 864),
    se_ratio=0.25,
    activation="swish",
    meansparse=False,
  ):
    super().__init__(mean, std)
    self.act = ACTIVATIONS[activation]
    self.init_conv = Conv2d(len(mean), stem_width, 3, padding="dm")
    settings = dict(activation=activation, se_ratio=se_ratio, meansparse=meansparse)
    stages, cin = [], stem_width
    for s, (n, width) in enumerate(zip(depths, widths, strict=True)):
      blocks = [
        RaBlock(cin if b == 0 else width, width, 2 if s > 0 and b == 0 else 1, **settings)
        for b in range(n)
      ]
      stages.append(Group("block", blocks))
      cin = width
    self.layer = nn.Sequential(*stages)
    self.batchnorm = batch_norm(widths[-1])
    self.meansparse_end = MeanSparse(widths[-1]) if meansparse else nn.Identity()
    self.logits = nn.Linear(widths[-1], num_classes)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.layer(self.init_conv(self.normalize(x)))
    x = self.act(self.meansparse_end(self.batchnorm(x)))
    return self.logits(torch.mean(x, dim=(2, 3)))


class PreActBottleneck(nn.Module):
  """`models.PreActBottleneck`, RobustBench's `BottleneckChen2020AdversarialNet` layout."""

  def __init__(self, cin, planes, stride):
    super().__init__()
    cout = 4 * planes
    self.bn0 = batch_norm(cin)
    self.conv1, self.bn1 = Conv2d(cin, planes, 1, padding="torch"), batch_norm(planes)
    self.conv2 = Conv2d(planes, planes, 3, stride, padding="torch")
    self.bn2 = batch_norm(planes)
    self.conv3 = Conv2d(planes, cout, 1, padding="torch")
    self.shortcut = nn.Sequential()
    if stride != 1 or cin != cout:
      self.shortcut = nn.Sequential(Conv2d(cin, cout, 1, stride, padding="torch"), batch_norm(cout))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    pre = F.relu(self.bn0(x))
    out = F.relu(self.bn1(self.conv1(pre)))
    out = self.conv3(F.relu(self.bn2(self.conv2(out))))
    return out + (self.shortcut(pre) if len(self.shortcut) else x)


class PreActResNet50Branch(nn.Module):
  """`models.PreActResNet50Branch`, RobustBench's CIFAR `ResNet` layout (`conv1`, `linear`)."""

  def __init__(self, num_classes, cin=3, *, width=64, stage_blocks=(3, 4, 6, 3)):
    super().__init__()
    self.conv1, self.bn1 = Conv2d(cin, width, 3, padding="torch"), batch_norm(width)
    blocks = models.bottleneck_blocks(width, stage_blocks)
    for s in range(len(stage_blocks)):
      layer = []
      for stage, planes, stride in blocks:
        if stage == s:
          layer.append(PreActBottleneck(width, planes, stride))
          width = 4 * planes
      setattr(self, f"layer{s + 1}", nn.Sequential(*layer))
    self.n_stages = len(stage_blocks)
    self.linear = nn.Linear(width, num_classes)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = F.relu(self.bn1(self.conv1(x)))
    for s in range(self.n_stages):
      x = getattr(self, f"layer{s + 1}")(x)
    return self.linear(torch.mean(x, dim=(2, 3)))


class PreActResNet50Ensemble(Twin):
  """`models.PreActResNet50Ensemble`, in RobustBench's `Chen2020AdversarialNet` layout."""

  def __init__(self, num_classes, mean, std, *, branches=3, width=64, stage_blocks=(3, 4, 6, 3)):
    super().__init__(mean, std)
    for b in range(branches):
      branch = PreActResNet50Branch(num_classes, len(mean), width=width, stage_blocks=stage_blocks)
      setattr(self, f"branch{b + 1}", branch)
    self.models = nn.ModuleList([getattr(self, f"branch{b + 1}") for b in range(branches)])

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.normalize(x)
    probs = [torch.softmax(branch(x), dim=1) for branch in self.models]
    return torch.stack(probs).sum(dim=0) / len(probs)


TWINS = {
  "ra_wide_resnet": RaWideResNet,
  "preact_resnet50_ensemble": PreActResNet50Ensemble,
}
