"""Stage-1 and stage-2 steps of kamal_jax against the same steps in idiomatic PyTorch.

  python benchmarks/steps_vs_torch.py --sizes=digits,resnet18_112 --record

Both sides run in this process, alternating (see `side_by_side.alternate`); the
table gives median milliseconds per step and PyTorch's time over kamal_jax's (above
1: kamal_jax is faster).
"""
from absl import app, flags

import side_by_side as sbs
from kamal_jax import report

FLAGS = flags.FLAGS
flags.DEFINE_list("sizes", ["digits", "resnet18_112"], f"Of {list(sbs.SIZES)}.")
flags.DEFINE_list("ks", ["2", "4"], "Teachers per group in the stage-1 steps.")
flags.DEFINE_integer("rounds", 5, "Alternating rounds.")
flags.DEFINE_integer("calls", 5, "Steps per side per round.")
flags.DEFINE_bool("record", False, "Also write the table into benchmarks/RESULTS.md.")


def main(argv):
  del argv
  sbs.setup()
  rows = []
  for name in FLAGS.sizes:
    size = sbs.SIZES[name]
    problems = [(f"stage 1, K={k}", sbs.stage1(size, int(k))) for k in FLAGS.ks]
    problems.append((f"stage 2, G={size.groups}", sbs.stage2(size)))
    for label, problem in problems:
      times = sbs.alternate(sbs.steps(problem), FLAGS.rounds, FLAGS.calls)
      rows.append([name, label, size.batch, f"{1e3 * times['jax']:.1f}",
                   f"{1e3 * times['torch']:.1f}", f"{times['torch'] / times['jax']:.2f}"])
      print(" | ".join(map(str, rows[-1])), flush=True)
  table = report.table(["size", "step", "batch", "kamal_jax ms", "PyTorch ms",
                        "PyTorch / kamal_jax"], rows)
  text = (f"### Steps against PyTorch\n\n{sbs.header()}\n\n`python benchmarks/steps_vs_torch.py "
          f"--sizes={','.join(FLAGS.sizes)} --ks={','.join(FLAGS.ks)}`, medians of "
          f"{FLAGS.rounds} x {FLAGS.calls} steps per side, alternating.\n\n{table}")
  sbs.publish("steps_vs_torch", text, FLAGS.record)


if __name__ == "__main__":
  app.run(main)
