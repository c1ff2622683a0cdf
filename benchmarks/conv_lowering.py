"""XLA:CPU's convolution against the same convolution as one matrix product
(`kamal_jax.models.conv.as_product`), and PyTorch's, per layer shape.

  python benchmarks/conv_lowering.py --record

Forward and forward + gradients (input and kernel) of a 3x3 convolution, padding 1,
for the layers of the digits nets (batch 64) and of ResNet-18 at 112 px (batch 32);
medians over alternating rounds, in milliseconds. Where the product wins decides
`conv.SMALL_OUTPUT`.
"""
import jax
import jax.numpy as jnp
import numpy as np
import torch
from absl import app, flags
from jax import lax

import side_by_side as sbs
from kamal_jax import report
from kamal_jax.models import conv

FLAGS = flags.FLAGS
flags.DEFINE_integer("rounds", 5, "Alternating rounds.")
flags.DEFINE_integer("calls", 10, "Calls per program per round.")
flags.DEFINE_bool("record", False, "Also write the table into benchmarks/RESULTS.md.")

# (batch, input channels, output channels, input size, stride)
LAYERS = [(64, 1, 16, 8, 1), (64, 16, 16, 8, 1), (64, 16, 32, 8, 2), (64, 32, 32, 4, 1),
          (64, 32, 64, 4, 2), (64, 64, 64, 2, 1), (64, 64, 128, 2, 2), (64, 128, 128, 1, 1),
          (32, 64, 64, 28, 1), (32, 128, 128, 14, 1), (32, 256, 512, 7, 2),
          (32, 512, 512, 4, 1)]


def _lax(x, w, stride):
  return lax.conv_general_dilated(x, w, (stride, stride), ((1, 1), (1, 1)),
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _product(x, w, stride):
  return conv.as_product(x, w, (stride, stride), ((1, 1), (1, 1)))


def _jax_runs(fn, x, w, stride):
  forward = jax.jit(lambda x, w: fn(x, w, stride))
  grads = jax.jit(jax.grad(lambda x, w: jnp.sum(fn(x, w, stride) ** 2), argnums=(0, 1)))
  return (lambda: jax.block_until_ready(forward(x, w)),
          lambda: jax.block_until_ready(grads(x, w)))


def _torch_runs(x, w, stride):
  x = sbs.nchw(x).requires_grad_()
  w = torch.from_numpy(w.transpose(3, 2, 0, 1).copy()).requires_grad_()

  def forward():
    with torch.no_grad():
      torch.nn.functional.conv2d(x, w, stride=stride, padding=1)

  def grads():
    (torch.nn.functional.conv2d(x, w, stride=stride, padding=1) ** 2).sum().backward()
  return forward, grads


def main(argv):
  del argv
  sbs.setup()
  rng = np.random.default_rng(0)
  rows = []
  for batch, cin, cout, size, stride in LAYERS:
    x = rng.normal(size=(batch, size, size, cin)).astype(np.float32)
    w = rng.normal(size=(3, 3, cin, cout)).astype(np.float32)
    runs = {}
    for name, (forward, grads) in (("xla", _jax_runs(_lax, x, w, stride)),
                                   ("product", _jax_runs(_product, x, w, stride)),
                                   ("torch", _torch_runs(x, w, stride))):
      runs[f"{name} forward"], runs[f"{name} grads"] = forward, grads
    times = sbs.alternate(runs, FLAGS.rounds, FLAGS.calls)
    out = (size - 1) // stride + 1
    rows.append([batch, f"{cin} -> {cout}", f"{size} -> {out}", stride,
                 *[f"{1e3 * times[f'{n} {p}']:.2f}" for p in ("forward", "grads")
                   for n in ("xla", "product", "torch")]])
    print(" | ".join(map(str, rows[-1])), flush=True)
  table = report.table(["batch", "channels", "size", "stride", "XLA fwd", "product fwd",
                        "PyTorch fwd", "XLA grads", "product grads", "PyTorch grads"], rows)
  text = (f"### Convolutions: XLA:CPU against one matrix product\n\n{sbs.header()}\n\n"
          f"`python benchmarks/conv_lowering.py`, ms, medians of {FLAGS.rounds} x "
          f"{FLAGS.calls} calls, alternating.\n\n{table}")
  sbs.publish("conv_lowering", text, FLAGS.record)


if __name__ == "__main__":
  app.run(main)
