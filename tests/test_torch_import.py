"""PyTorch ResNets with torchvision's parameter names, imported: same logits and taps."""
import jax
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch_nets import random_net

from kamal_jax.third_party import torch_resnet


def _assert_same_outputs(net, module, variables, size):
  x = np.random.default_rng(0).normal(size=(2, size, size, 3)).astype(np.float32)
  with torch.no_grad():
    logits, taps = net(torch.from_numpy(x.transpose(0, 3, 1, 2)))
  outputs = jax.jit(lambda v, x: module.apply(v, x, train=False))(variables, x)
  np.testing.assert_allclose(outputs.logits, logits.numpy(), rtol=1e-4, atol=1e-4)
  assert len(outputs.feats) == len(taps)
  for ours, theirs in zip(outputs.feats, taps):
    np.testing.assert_allclose(ours, theirs.numpy().transpose(0, 2, 3, 1),
                               rtol=1e-4, atol=1e-4)


def test_resnet18_from_pth_and_safetensors(tmp_path):
  net = random_net(0, widths=(64, 64, 128, 256, 512), blocks=(2, 2, 2, 2),
                          num_classes=10)
  torch.save(net.state_dict(), tmp_path / "r18.pth")
  save_file(net.state_dict(), str(tmp_path / "r18.safetensors"))
  module, variables = torch_resnet.load(str(tmp_path / "r18.pth"))
  assert (module.widths, module.blocks, module.block, module.small_input,
          module.num_outputs) == ((64, 64, 128, 256, 512), (2, 2, 2, 2), "basic", False, 10)
  _assert_same_outputs(net, module, variables, size=64)
  same_module, same_variables = torch_resnet.load(str(tmp_path / "r18.safetensors"))
  assert same_module == module
  jax.tree.map(np.testing.assert_array_equal, same_variables, variables)


def test_bottleneck_resnet_with_small_stem(tmp_path):
  net = random_net(1, widths=(8, 16, 32), blocks=(2, 1), num_classes=3,
                          bottleneck=True, small_input=True)
  torch.save({"state_dict": net.state_dict()}, tmp_path / "wrapped.pth")
  module, variables = torch_resnet.load(str(tmp_path / "wrapped.pth"))
  assert (module.widths, module.blocks, module.block, module.small_input) == (
      (8, 16, 32), (2, 1), "bottleneck", True)
  _assert_same_outputs(net, module, variables, size=8)


class _Payload:
  """Unpickling this would create a file: the import must refuse it first."""

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return (open, (self.path, "w"))


def test_pickled_objects_are_refused_never_executed(tmp_path):
  witness = tmp_path / "executed"
  torch.save({"conv1.weight": torch.zeros(1), "hook": _Payload(str(witness))},
             tmp_path / "evil.pth")
  with pytest.raises(ValueError, match="Refused .*pickled objects"):
    torch_resnet.load(str(tmp_path / "evil.pth"))
  assert not witness.exists()


def test_mismatched_state_dicts_name_the_tensors(tmp_path):
  state = random_net(2, widths=(4, 4, 8), blocks=(1, 1), num_classes=2,
                            small_input=True).state_dict()
  missing = {k: v for k, v in state.items() if k != "layer2.0.bn2.running_var"}
  torch.save(missing, tmp_path / "missing.pth")
  with pytest.raises(ValueError, match=r"missing .*stage2_block1.*bn2.*var"):
    torch_resnet.load(str(tmp_path / "missing.pth"))
  save_file(dict(state, **{"layer1.0.extra.weight": torch.zeros(2)}),
            str(tmp_path / "extra.safetensors"))
  with pytest.raises(ValueError, match="layer1.0.extra.weight"):
    torch_resnet.load(str(tmp_path / "extra.safetensors"))
  with pytest.raises(ValueError, match="does not exist"):
    torch_resnet.load(str(tmp_path / "absent.pth"))
  torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "not_resnet.pth")
  with pytest.raises(ValueError, match="'conv1.weight' is missing"):
    torch_resnet.load(str(tmp_path / "not_resnet.pth"))
