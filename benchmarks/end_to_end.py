"""The digits default end to end: kamal-jax (cold and warm compilation cache) against
the PyTorch pipeline with the reference code's structure (reference_pipeline.py).

  python benchmarks/end_to_end.py --rounds=2 --record

Each round runs, one after the other in fresh processes: PyTorch, kamal-jax with an
empty compilation cache, kamal-jax again from the cache the cold run filled. Tables:
median seconds per stage and for the whole command, student joint accuracy and peak
resident memory of each process; what kamal-jax compiled per stage, cold and warm
(its compilation.json).
"""
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from absl import app, flags

import side_by_side as sbs
from kamal_jax import report

FLAGS = flags.FLAGS
flags.DEFINE_integer("rounds", 2, "Rounds of the three runs.")
flags.DEFINE_bool("record", False, "Also write the tables into benchmarks/RESULTS.md.")

HERE = Path(__file__).resolve().parent
STAGES = ("teachers", "stage1", "stage2", "evaluate")


def _torch(out: Path) -> dict:
  seconds, memory, _ = sbs.run_command([sys.executable, str(HERE / "reference_pipeline.py"),
                                        f"--out={out}"])
  result = json.loads(out.read_text())
  return {"seconds": dict(result["seconds"], command=seconds), "memory": memory,
          "joint": result["student_joint"]}


def main(argv):
  del argv
  runs = {"PyTorch, reference structure": [], "kamal-jax, cold cache": [],
          "kamal-jax, warm cache": []}
  with tempfile.TemporaryDirectory() as scratch:
    scratch = Path(scratch)
    for r in range(FLAGS.rounds):
      cache = scratch / f"cache{r}"
      for name, run in zip(runs, (lambda: _torch(scratch / f"torch{r}.json"),
                                  lambda: sbs.run_kamal_jax(scratch / f"cold{r}", cache),
                                  lambda: sbs.run_kamal_jax(scratch / f"warm{r}", cache))):
        runs[name].append(run())
        print(name, json.dumps(runs[name][-1]["seconds"]), flush=True)

  median = lambda results, read: float(np.median([read(x) for x in results]))
  reference = median(runs["PyTorch, reference structure"], lambda x: x["seconds"]["command"])
  rows = []
  for name, results in runs.items():
    command = median(results, lambda x: x["seconds"]["command"])
    rows.append([name, *[f"{median(results, lambda x: x['seconds'][s]):.1f}" for s in STAGES],
                 f"{command:.1f}", f"{reference / command:.2f}",
                 f"{median(results, lambda x: x['joint']):.4f}",
                 f"{median(results, lambda x: x['memory']):.2f}"])
  speed = report.table(["run", *STAGES, "whole command", "speed-up over PyTorch",
                        "student joint", "peak RSS GB"], rows)
  compile_rows = []
  for name in list(runs)[1:]:
    for stage in STAGES:
      stats = [x["compilation"][stage] for x in runs[name]]
      compile_rows.append([name, stage, *[f"{np.median([s[k] for s in stats]):g}" for k in
                                          ("compiled", "from_cache", "compile_seconds",
                                           "trace_and_lower_seconds")]])
  compiles = report.table(["run", "stage", "programs compiled", "loaded from cache",
                           "compile s", "trace + lower s"], compile_rows)
  text = (f"### The digits default end to end\n\n{sbs.header()}\n\n`python benchmarks/end_to_end.py "
          f"--rounds={FLAGS.rounds}`: medians over {FLAGS.rounds} rounds, seconds per stage "
          f"(kamal-jax: timings.json; PyTorch: its own clock) and of the whole command "
          f"(process start to exit, imports and data included).\n\n{speed}\n\n"
          f"What kamal-jax compiled (compilation.json):\n\n{compiles}")
  sbs.publish("end_to_end", text, FLAGS.record)


if __name__ == "__main__":
  app.run(main)
