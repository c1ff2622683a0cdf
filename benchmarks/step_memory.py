"""Peak resident memory of stage-1 steps, kamal_jax and PyTorch, each side in a fresh
process.

  python benchmarks/step_memory.py --size=resnet18_224 --k=2 --record

Each process builds the step (the networks are made in PyTorch for both sides, see
side_by_side.py), then resets the kernel's peak counter (/proc/self/clear_refs) and
runs --steps steps of one side only; the table gives the memory after building, the
peak while stepping, and the difference: what the steps themselves hold (compiled
program, activations, gradients, optimizer state). Linux only.
"""
import json
import subprocess
import sys

from absl import app, flags

import side_by_side as sbs
from kamal_jax import report

FLAGS = flags.FLAGS
flags.DEFINE_enum("size", "resnet18_224", list(sbs.SIZES), "Nets and batch.")
flags.DEFINE_integer("k", 2, "Teachers in the group.")
flags.DEFINE_integer("steps", 3, "Steps to run.")
flags.DEFINE_enum("side", None, ["jax", "torch"], "Run one side here (internal).")
flags.DEFINE_bool("record", False, "Also write the table into benchmarks/RESULTS.md.")


def _status_gb(field: str) -> float:
  with open("/proc/self/status") as f:
    line = next(l for l in f if l.startswith(field + ":"))
  return int(line.split()[1]) / 2**20  # kB


def _one_side(side: str) -> dict:
  sbs.setup()
  step = sbs.steps(sbs.stage1(sbs.SIZES[FLAGS.size], FLAGS.k))[side]
  built = _status_gb("VmRSS")
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak (VmHWM) starts again from the current size
  for _ in range(FLAGS.steps):
    step()
  return {"built": built, "peak": _status_gb("VmHWM")}


def main(argv):
  del argv
  if FLAGS.side:
    print(json.dumps(_one_side(FLAGS.side)))
    return
  rows = []
  for side, label in (("jax", "kamal_jax"), ("torch", "PyTorch")):
    output = subprocess.run(
        [sys.executable, __file__, f"--side={side}", f"--size={FLAGS.size}", f"--k={FLAGS.k}",
         f"--steps={FLAGS.steps}"], check=True, capture_output=True, text=True).stdout
    memory = json.loads(output.strip().splitlines()[-1])
    rows.append([label, f"{memory['built']:.2f}", f"{memory['peak']:.2f}",
                 f"{memory['peak'] - memory['built']:.2f}"])
    print(" | ".join(rows[-1]), flush=True)
  size = sbs.SIZES[FLAGS.size]
  text = (f"### Memory of a stage-1 step ({FLAGS.size}, K={FLAGS.k}, batch {size.batch})\n\n"
          f"{sbs.header()}\n\n`python benchmarks/step_memory.py --size={FLAGS.size} "
          f"--k={FLAGS.k}`, {FLAGS.steps} steps.\n\n"
          + report.table(["side", "after building GB", "peak while stepping GB",
                          "the steps' share GB"], rows))
  sbs.publish(f"step_memory_{FLAGS.size}", text, FLAGS.record)


if __name__ == "__main__":
  app.run(main)
