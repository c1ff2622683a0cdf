"""Images/s and model FLOP utilisation of the stage-1 and stage-2 steps, with the
input pipeline's images/s beside them: which one bounds a run on this device.

  python benchmarks/accelerator.py --size=resnet18_224 --dtypes=float32,bfloat16 --record

Made for a GPU or TPU (install the matching jax); it runs anywhere. FLOPs per step
are XLA's cost analysis of the compiled step; utilisation is FLOPs / step time /
the device's peak for the dtype (PEAK; '-' for devices not listed). The input
pipeline decodes, randomly crops, resizes and flips --pipeline_images generated
JPEGs (256 px, as the class setup's training view reads them) on the host.
"""
import os
import tempfile
import time

import jax
import numpy as np
from absl import app, flags
from PIL import Image

import side_by_side as sbs
from kamal_jax import report
from kamal_jax.data.images import EncodedImages, View

FLAGS = flags.FLAGS
flags.DEFINE_enum("size", "resnet18_224", list(sbs.SIZES), "Nets and batch.")
flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes.")
flags.DEFINE_integer("k", 2, "Teachers in the stage-1 group.")
flags.DEFINE_integer("calls", 20, "Timed steps per program (after one to compile).")
flags.DEFINE_integer("pipeline_images", 512, "Images the input pipeline reads.")
flags.DEFINE_bool("record", False, "Also write the table into benchmarks/RESULTS.md.")

# Dense peak FLOP/s by device kind and compute dtype (float32 matrix work runs on
# TF32 tensor cores under XLA's default precision on these GPUs).
PEAK = {
    "NVIDIA H200": {"float32": 494e12, "bfloat16": 989e12},
    "NVIDIA H100 80GB HBM3": {"float32": 494e12, "bfloat16": 989e12},
    "NVIDIA A100-SXM4-80GB": {"float32": 156e12, "bfloat16": 312e12},
}


def _median_seconds(run, calls: int) -> float:
  run()  # compiles
  times = []
  for _ in range(calls):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def _pipeline_images_per_second(size: sbs.Size, count: int) -> float:
  """The training view's reads: JPEG decode, random resized crop, flip, on the
  package's thread pool, a batch at a time."""
  rng = np.random.default_rng(0)
  with tempfile.TemporaryDirectory() as folder:
    files = []
    for i in range(min(count, 64)):  # 64 distinct files, read round-robin
      path = os.path.join(folder, f"{i}.jpg")
      Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(path)
      files.append(path)
    images = EncodedImages(files, View(size.image, 0.875, 0.81, True), size.channels)
    batches = [np.arange(i, i + size.batch) % len(files) for i in range(0, count, size.batch)]
    images.read(batches[0], rng)  # warm the thread pool
    start = time.perf_counter()
    for indices in batches:
      images.read(indices, rng)
    return len(batches) * size.batch / (time.perf_counter() - start)


def main(argv):
  del argv
  sbs.setup()
  size = sbs.SIZES[FLAGS.size]
  kind = jax.devices()[0].device_kind
  rows = []
  for dtype in FLAGS.dtypes:
    for label, problem in ((f"stage 1, K={FLAGS.k}", sbs.stage1(size, FLAGS.k)),
                           (f"stage 2, G={size.groups}", sbs.stage2(size))):
      run, compiled = sbs.jax_step(problem, sbs.TorchAmalgamation(problem), dtype)
      flops = sbs.flops(compiled())
      seconds = _median_seconds(run, FLAGS.calls)
      peak = PEAK.get(kind, {}).get(dtype)
      utilisation = f"{flops / seconds / peak:.1%}" if peak else "-"
      rows.append([label, dtype, f"{1e3 * seconds:.1f}", f"{size.batch / seconds:.0f}",
                   f"{flops / 1e12:.4f}", utilisation])
      print(" | ".join(rows[-1]), flush=True)
  pipeline = _pipeline_images_per_second(size, FLAGS.pipeline_images)
  text = (f"### Steps and input pipeline on {kind} ({FLAGS.size})\n\n{sbs.header()}\n\n"
          f"`python benchmarks/accelerator.py --size={FLAGS.size} --dtypes={','.join(FLAGS.dtypes)}"
          f"`, batch {size.batch}, medians of {FLAGS.calls} steps.\n\n"
          + report.table(["step", "compute", "ms", "images / s", "TFLOP / step",
                          "FLOP utilisation"], rows)
          + f"\n\nInput pipeline (training view, {os.cpu_count()} host threads): "
            f"**{pipeline:.0f} images/s**.")
  sbs.publish(f"accelerator_{FLAGS.size}", text, FLAGS.record)


if __name__ == "__main__":
  app.run(main)
