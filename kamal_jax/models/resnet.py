"""ResNet family with feature taps, as the amalgamation losses need them.

A network returns `Outputs(logits, feats)`: `logits` [B, sum(head sizes)] (the heads
of a multi-head classifier laid side by side: one linear map over shared features is
exactly a set of per-head linear maps) and `feats`, one tap per place the bridges
read: the raw stem convolution, then each stage's output before its final ReLU.
"""
from typing import NamedTuple, Sequence

import flax.linen as nn
import jax.numpy as jnp

from kamal_jax.models import conv

__all__ = ["Block", "BLOCKS", "Outputs", "ResNet"]


class Outputs(NamedTuple):
  logits: jnp.ndarray  # [B, C]
  feats: tuple  # ([B, H_l, W_l, D_l] for each tap l)


def _conv(width: int, kernel: int, stride: int, dtype, name: str) -> nn.Conv:
  """A bias-free convolution padded like torchvision's (kernel // 2 on each side)."""
  return nn.Conv(width, (kernel, kernel), (stride, stride), padding=kernel // 2,
                 use_bias=False, dtype=dtype, name=name,
                 conv_general_dilated=conv.conv_general_dilated)


class Block(nn.Module):
  """A residual block as torchvision builds it: basic (two 3x3 convolutions) or
  bottleneck (1x1 down to a quarter of the width, 3x3 strided as in its v1.5, 1x1
  back up), each convolution followed by batch norm, plus the shortcut (a strided 1x1
  projection where the shape changes). `final_relu=False` leaves the pre-activation
  sum, which is what a feature tap reads."""
  width: int  # output channels
  stride: int
  final_relu: bool
  bottleneck: bool
  norm: type
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    inner = self.width // 4
    convs = ([(inner, 1, 1), (inner, 3, self.stride), (self.width, 1, 1)] if self.bottleneck
             else [(self.width, 3, self.stride), (self.width, 3, 1)])
    y = x
    for j, (width, kernel, stride) in enumerate(convs, start=1):
      y = _conv(width, kernel, stride, self.dtype, f"conv{j}")(y)
      if j < len(convs):
        y = nn.relu(self.norm(name=f"bn{j}")(y))
      else:  # the residual branch starts at zero
        y = self.norm(name=f"bn{j}", scale_init=nn.initializers.zeros)(y)
    if x.shape[-1] != self.width or self.stride != 1:
      x = _conv(self.width, 1, self.stride, self.dtype, "shortcut_conv")(x)
      x = self.norm(name="shortcut_bn")(x)
    y = x + y
    return nn.relu(y) if self.final_relu else y


BLOCKS = ("basic", "bottleneck")


class ResNet(nn.Module):
  """ResNet by width list.

  Attributes:
    widths: (stem width, stage 1 width, ..., stage N width).
    blocks: number of blocks per stage (len(widths) - 1 entries).
    block: 'basic' (ResNet-18/34) or 'bottleneck' (ResNet-50 and deeper); a
      stage's width is its output channels either way.
    num_outputs: total logits (sum of the head sizes).
    small_input: a 3x3 stride-1 stem and no max-pool (8x8 or 32x32 images)
      instead of the ImageNet 7x7 stride-2 stem and 3x3 max-pool.
    bn_axis_name: the data-parallel axis the caller's step maps over, or None (the
      default: plain `jit`/`grad` on one device). With it, training-mode batch
      statistics are computed over the whole global batch, so a step on N devices
      equals the step on one; the project's own step names `train.AXIS`.
  """
  widths: Sequence[int]
  blocks: Sequence[int]
  num_outputs: int
  block: str = "basic"
  small_input: bool = False
  bn_axis_name: str | None = None
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False) -> Outputs:
    if len(self.blocks) != len(self.widths) - 1:
      raise ValueError(
          f"ResNet needs one block count per stage: widths {tuple(self.widths)} "
          f"give {len(self.widths) - 1} stages but blocks is {tuple(self.blocks)}.")
    if self.block not in BLOCKS:
      raise ValueError(f"Unknown ResNet block {self.block!r}: use one of {BLOCKS}.")
    norm = lambda **kw: nn.BatchNorm(
        use_running_average=not train, momentum=0.9, epsilon=1e-5,
        axis_name=self.bn_axis_name if train else None, dtype=self.dtype, **kw)
    x = x.astype(self.dtype)
    kernel, stride = (3, 1) if self.small_input else (7, 2)
    x = _conv(self.widths[0], kernel, stride, self.dtype, "stem_conv")(x)
    feats = [x]
    x = nn.relu(norm(name="stem_bn")(x))
    if not self.small_input:  # padded by hand: ONNX exporters take no explicit pads
      x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
      x = nn.max_pool(x, (3, 3), (2, 2))
    for stage, (width, count) in enumerate(zip(self.widths[1:], self.blocks)):
      for index in range(count):
        stride = 2 if stage > 0 and index == 0 else 1
        x = Block(width, stride, final_relu=index < count - 1,
                  bottleneck=self.block == "bottleneck", norm=norm, dtype=self.dtype,
                  name=f"stage{stage + 1}_block{index + 1}")(x)
      feats.append(x)
      x = nn.relu(x)
    x = jnp.mean(x, axis=(1, 2))  # [B, D]
    logits = nn.Dense(self.num_outputs, dtype=self.dtype, name="head")(x)
    return Outputs(logits.astype(jnp.float32),
                   tuple(f.astype(jnp.float32) for f in feats))
