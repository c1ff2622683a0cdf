"""Convolutions as one matrix product where XLA:CPU's own lowering is slow.

XLA:CPU runs convolutions through Eigen, which is slow on feature maps of a few
pixels with many channels: at batch 64, a 3x3 64 -> 64 convolution on 2x2 maps took
1.4 ms forward and 3.2 ms with its gradients, against 0.22 and 0.69 ms as patches
times kernel (one matrix product), and PyTorch's 0.13 and 0.62 ms. On maps of 4x4
and more Eigen was as fast or faster (2.5x at 28x28), so only outputs of at most
SMALL_OUTPUT pixels, on CPU, take the matrix-product path
(`python benchmarks/conv_lowering.py` measures both).
"""
import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["as_product", "conv_general_dilated", "SMALL_OUTPUT"]

SMALL_OUTPUT = 4  # output pixels (H x W) up to which CPU convolutions are products
_LAYOUT = ("NHWC", "HWIO", "NHWC")


def _live_taps(size: int, taps: int, stride: int, outputs: int, low: int) -> tuple:
  """[first, last + 1) of the kernel offsets along one axis that read an input pixel
  for some output (the input spans [low, low + size) of the padded axis). Offsets
  outside only multiply padding: on maps smaller than the kernel's reach, e.g. 3x3
  on 1x1, where only the centre counts."""
  live = [i for i in range(taps)
          if any(low <= i + stride * o < low + size for o in range(outputs))]
  live = live or [0]  # no offset reads the image: the output is zeros, as any one gives
  return live[0], live[-1] + 1


def as_product(x: jnp.ndarray, kernel: jnp.ndarray, strides, padding) -> jnp.ndarray:
  """The convolution of x [B, H, W, C] with kernel [kh, kw, C, O] (explicit padding
  pairs, no dilation) as patches [B, H', W', taps * C] times kernel [taps * C, O]:
  [B, H', W', O], over the taps that read the image, not only its padding."""
  kh, kw, channels, outputs = kernel.shape
  (sh, sw), (height, width) = strides, x.shape[1:3]
  (top, bottom), (left, right) = padding
  rows = (height + top + bottom - kh) // sh + 1
  cols = (width + left + right - kw) // sw + 1
  (i0, i1), (j0, j1) = (_live_taps(height, kh, sh, rows, top),
                        _live_taps(width, kw, sw, cols, left))
  x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  patches = jnp.concatenate(
      [x[:, i:i + sh * (rows - 1) + 1:sh, j:j + sw * (cols - 1) + 1:sw]
       for i in range(i0, i1) for j in range(j0, j1)], axis=-1)  # (i, j, c) order
  return patches @ kernel[i0:i1, j0:j1].reshape(-1, outputs)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None, **kwargs):
  """`lax.conv_general_dilated` (as flax.linen.Conv calls it), computed by `as_product`
  on CPU for plain NHWC convolutions with at most SMALL_OUTPUT output pixels."""
  conv = lambda: lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count, precision=precision, **kwargs)
  plain = (jax.default_backend() == "cpu" and lhs.ndim == 4 and feature_group_count == 1
           and not kwargs and not isinstance(padding, str)
           and all(d == 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
           and dimension_numbers == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _LAYOUT))
  if not plain:
    return conv()
  rows, cols = jax.eval_shape(conv).shape[1:3]
  if rows * cols > SMALL_OUTPUT:
    return conv()
  return as_product(lhs, rhs, window_strides, padding)
