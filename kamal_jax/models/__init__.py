"""Networks by name: `create(arch, num_outputs, width_scale)`."""
import dataclasses

import jax.numpy as jnp

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
           dtype: str = "float32") -> ResNet:
  """The named architecture with every width scaled (rounded) by `width_scale`.

  dtype is the compute type ('bfloat16' on GPU/TPU); parameters, batch statistics
  and the returned logits and feature taps stay float32.
  """
  if arch not in ARCHS:
    raise ValueError(f"Unknown model {arch!r}: use one of {sorted(ARCHS)}.")
  if dtype not in DTYPES:
    raise ValueError(f"Unknown compute dtype {dtype!r}: use one of {DTYPES}.")
  spec = ARCHS[arch]
  widths = tuple(int(round(w * width_scale)) for w in spec.widths)
  return ResNet(widths=widths, blocks=spec.blocks, num_outputs=num_outputs,
                block=spec.block, small_input=spec.small_input, dtype=jnp.dtype(dtype))


__all__ = ["ARCHS", "Arch", "Bridges", "Outputs", "ResNet", "create"]
