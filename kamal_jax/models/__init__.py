"""Networks by name: `create(arch, num_outputs, width_scale)`."""
import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from kamal_jax.models import conv
from kamal_jax.models.bridges import Bridges
from kamal_jax.models.resnet import Outputs, ResNet


@dataclasses.dataclass(frozen=True)
class Arch:
  widths: tuple[int, ...]  # stem, then one per stage
  blocks: tuple[int, ...]
  small_input: bool
  block: str = "basic"


ARCHS = {
    "resnet18": Arch((64, 64, 128, 256, 512), (2, 2, 2, 2), small_input=False),
    "resnet34": Arch((64, 64, 128, 256, 512), (3, 4, 6, 3), small_input=False),
    "resnet50": Arch((64, 256, 512, 1024, 2048), (3, 4, 6, 3), small_input=False,
                     block="bottleneck"),
    # Sized for the 8x8 digits: 3x3 stem, one block per stage, 8 -> 4 -> 2 -> 1.
    "resnet10_digits": Arch((16, 16, 32, 64, 128), (1, 1, 1, 1), small_input=True),
}


DTYPES = ("float32", "bfloat16")


def create(arch: str, num_outputs: int, width_scale: float = 1.0,
           dtype: str = "float32", axis_name: str | None = None) -> ResNet:
  """The named architecture with every width scaled (rounded) by `width_scale`.

  dtype is the compute type ('bfloat16' on GPU/TPU); parameters, batch statistics
  and the returned logits and feature taps stay float32. axis_name: the
  data-parallel axis of the step that trains it (`ResNet.bn_axis_name`), None under
  plain `jit` on one device.
  """
  if arch not in ARCHS:
    raise ValueError(f"Unknown model {arch!r}: use one of {sorted(ARCHS)}.")
  if dtype not in DTYPES:
    raise ValueError(f"Unknown compute dtype {dtype!r}: use one of {DTYPES}.")
  spec = ARCHS[arch]
  widths = tuple(int(round(w * width_scale)) for w in spec.widths)
  return ResNet(widths=widths, blocks=spec.blocks, num_outputs=num_outputs,
                block=spec.block, small_input=spec.small_input, bn_axis_name=axis_name,
                dtype=jnp.dtype(dtype))


def with_backbone(variables: dict, backbone: dict) -> dict:
  """`variables` ({'params', 'batch_stats'} of a network, or of a stack of them with
  leading axes) with every variable of `backbone` (one network of the same
  architecture, e.g. ImageNet weights) copied in, broadcast over the leading axes,
  except the classifier 'head': the network starts from the pretrained features and
  learns a head for its own classes."""
  flat = traverse_util.flatten_dict(variables)
  given = {k: v for k, v in traverse_util.flatten_dict(backbone).items() if "head" not in k}
  missing = [k for k in flat if "head" not in k and k not in given]
  wrong = [k for k, v in given.items()
           if k not in flat or np.shape(flat[k])[np.ndim(flat[k]) - np.ndim(v):] != np.shape(v)]
  if missing or wrong:
    names = ["/".join(k) for k in (missing + wrong)[:4]]
    raise ValueError(f"The pretrained variables do not fit the network ({names} missing "
                     "or of another shape): give a checkpoint of the network's "
                     "architecture and input channels.")
  flat.update({k: np.broadcast_to(v, np.shape(flat[k])) for k, v in given.items()})
  return traverse_util.unflatten_dict(flat)


__all__ = ["ARCHS", "Arch", "Bridges", "Outputs", "ResNet", "conv", "create", "with_backbone"]
