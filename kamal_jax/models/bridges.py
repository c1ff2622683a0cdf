"""Transfer bridges: one bias-free 1x1 convolution per feature tap.

A stack of K bridge sets (one per teacher or component) is a Bridges parameter tree
with a leading K axis, initialised with `jax.vmap`; a stage applies all K at once as
one batched matrix product per tap (`amalgamate._bridge`).
"""
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from kamal_jax.models import conv

__all__ = ["Bridges"]


class Bridges(nn.Module):
  widths: Sequence[int]  # output channels per tap

  @nn.compact
  def __call__(self, feats: Sequence[jnp.ndarray]) -> tuple:
    if len(feats) != len(self.widths):
      raise ValueError(f"Bridges for {len(self.widths)} taps got {len(feats)} feature maps.")
    return tuple(
        nn.Conv(width, (1, 1), use_bias=False, name=f"tap{l}",
                conv_general_dilated=conv.conv_general_dilated)(f)
        for l, (width, f) in enumerate(zip(self.widths, feats)))
