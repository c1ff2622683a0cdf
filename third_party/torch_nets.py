"""torchvision's ResNet layout in PyTorch (no torchvision needed), returning the same
feature taps as kamal_jax's ResNet: the stem convolution, then each stage's output
before its last ReLU. `torch_resnet.convert(net.state_dict())` gives the Flax twin.
Used by the import tests and by the PyTorch side of the benchmarks; needs torch.
"""
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
