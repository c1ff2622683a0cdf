"""PyTorch ResNets with torchvision's parameter names (no torchvision here), for
the import tests and for imported teachers in pipeline tests."""
import torch
from torch import nn


class TorchBlock(nn.Module):
  """torchvision's BasicBlock / Bottleneck parameter layout, with the last ReLU
  optional so the pre-activation tap can be read."""

  def __init__(self, cin, width, stride, bottleneck):
    super().__init__()
    inner = width // 4 if bottleneck else width
    shapes = ([(cin, inner, 1, 1), (inner, inner, 3, stride), (inner, width, 1, 1)]
              if bottleneck else [(cin, width, 3, stride), (width, width, 3, 1)])
    for j, (i, o, k, s) in enumerate(shapes, start=1):
      setattr(self, f"conv{j}", nn.Conv2d(i, o, k, s, padding=k // 2, bias=False))
      setattr(self, f"bn{j}", nn.BatchNorm2d(o))
    self.count = len(shapes)
    self.downsample = (nn.Sequential(nn.Conv2d(cin, width, 1, stride, bias=False),
                                     nn.BatchNorm2d(width))
                       if stride != 1 or cin != width else None)

  def forward(self, x, final_relu):
    y = x
    for j in range(1, self.count + 1):
      y = getattr(self, f"bn{j}")(getattr(self, f"conv{j}")(y))
      y = torch.relu(y) if j < self.count else y
    y = y + (x if self.downsample is None else self.downsample(x))
    return torch.relu(y) if final_relu else y


class TorchResNet(nn.Module):

  def __init__(self, widths, blocks, num_classes, bottleneck=False, small_input=False,
               channels=3):
    super().__init__()
    kernel, stride = (3, 1) if small_input else (7, 2)
    self.small_input = small_input
    self.conv1 = nn.Conv2d(channels, widths[0], kernel, stride, padding=kernel // 2, bias=False)
    self.bn1 = nn.BatchNorm2d(widths[0])
    cin = widths[0]
    for stage, (width, count) in enumerate(zip(widths[1:], blocks), start=1):
      layer = []
      for index in range(count):
        layer.append(TorchBlock(cin, width, 2 if stage > 1 and index == 0 else 1,
                                bottleneck))
        cin = width
      setattr(self, f"layer{stage}", nn.Sequential(*layer))
    self.stages = len(blocks)
    self.fc = nn.Linear(cin, num_classes)

  def forward(self, x):
    x = self.conv1(x)
    taps = [x]
    x = torch.relu(self.bn1(x))
    if not self.small_input:
      x = nn.functional.max_pool2d(x, 3, 2, padding=1)
    for stage in range(1, self.stages + 1):
      layer = getattr(self, f"layer{stage}")
      for index, block in enumerate(layer):
        x = block(x, final_relu=index < len(layer) - 1)
      taps.append(x)
      x = torch.relu(x)
    return self.fc(x.mean(dim=(2, 3))), taps


def random_net(seed, **arch):
  """A net in eval mode whose batch-norm statistics and affines are far from the
  identity, so a wrong mapping of any of them shows."""
  torch.manual_seed(seed)
  net = TorchResNet(**arch)
  for module in net.modules():
    if isinstance(module, nn.BatchNorm2d):
      module.weight.data.uniform_(0.5, 1.5)
      module.bias.data.uniform_(-0.5, 0.5)
      module.running_mean.uniform_(-0.5, 0.5)
      module.running_var.uniform_(0.5, 1.5)
  return net.eval()
