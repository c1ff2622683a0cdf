"""Random PyTorch ResNets with torchvision's parameter names, for the import tests and
for imported teachers in pipeline tests."""
import torch
from torch import nn

from kamal_jax.third_party.torch_nets import TorchResNet


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
