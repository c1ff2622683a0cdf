"""Seeded table of the method beside its baselines: one command per table.

  python benchmarks/variants.py --config=configs/digits.py:domains \
      --workdir=runs/bench_domains --out=benchmarks/results/domains.md

runs every variant of `kamal_jax.bench.VARIANTS` (or --variants=a,b) for each seed
(--seeds, default 0-4) through the normal pipeline, one workdir per run
(<workdir>/seed<S>/<variant>, each with its report.json), and writes the table
(<out>), its plot (<out>.png) and the per-seed numbers behind each cell (<out>.json).
A cell is reproduced alone by the plain command with the variant's overrides, e.g.
  kamal-jax --config=configs/digits.py:domains --config.seed=3 \
      --config.stage1.selection=none --workdir=W
Finished runs in the workdir are reused, so an interrupted table resumes. With
--update, only --variants run and the table's other rows stay as its JSON holds them
(the header names both commands).
"""
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import flax
import jax
import optax
from absl import app, flags, logging
from ml_collections import config_flags

from kamal_jax import bench, pipeline

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (get_config()).")
flags.DEFINE_string("workdir", None, "Where each run's workdir goes.")
flags.DEFINE_string("out", None, "Markdown table to write (plot and JSON beside it).")
flags.DEFINE_list("variants", list(bench.VARIANTS), "Variants to run.")
flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "Seeds.")
flags.DEFINE_bool("update", False, "Run only --variants; keep the other rows of --out.")
flags.DEFINE_string("why", "", "With --update: why these rows were rerun, for the header "
                    "(e.g. which rows a new default leaves as they were measured).")
flags.DEFINE_string("compilation_cache", "~/.cache/kamal_jax/jax",
                    "JAX persistent compilation cache directory; '' turns it off.")
flags.mark_flags_as_required(["config", "workdir", "out"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  if FLAGS.compilation_cache:
    pipeline.enable_compilation_cache(FLAGS.compilation_cache)
  seeds = [int(s) for s in FLAGS.seeds]
  start = time.perf_counter()
  out = Path(FLAGS.out)
  values = bench.per_seed(bench.run(FLAGS.config, FLAGS.variants, seeds, Path(FLAGS.workdir)))
  minutes = (time.perf_counter() - start) / 60
  provenance = [f"Command: `python {' '.join(sys.argv)}`  ",
                f"Date: {datetime.date.today()}; wall time {minutes:.1f} min for the whole table.  "]
  if FLAGS.update:
    old = json.loads(out.with_suffix(".json").read_text())
    if any(set(by_seed) != {str(s) for s in seeds} for by_seed in old.values()):
      raise ValueError(f"{out.with_suffix('.json')} holds other seeds than {seeds}: "
                       "rerun the whole table.")
    previous = [line for line in out.read_text().splitlines()
                if line.startswith(("Command:", "Date:", "Updated:"))]
    provenance = previous + [
        f"Updated: rows {', '.join(FLAGS.variants)} by `python {' '.join(sys.argv)}` on "
        f"{datetime.date.today()} ({minutes:.1f} min); the other rows as before"
        + (f": {FLAGS.why}" if FLAGS.why else "") + ".  "]
    values = bench.merged(old, values)
  header = "\n".join([
      f"# {out.stem}: variants over seeds",
      "",
      *provenance,
      f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
      f"{jax.devices()[0].device_kind}; Python {sys.version.split()[0]}, jax "
      f"{jax.__version__}, flax {flax.__version__}, optax {optax.__version__}.  ",
      "Columns: mean teacher accuracy on its parts; mean component accuracy; the "
      "student's (or ensemble's) mean per-part and joint accuracy; the components' "
      "joint accuracy (`joint.decide`); the accuracy of "
      "the selection-weighted teacher logits (the stage-1 target) and the weight on "
      "each image's own-domain teacher, on the parts' test images; student "
      "parameters; seconds of the run after the (shared) teachers."])
  bench.write(values, seeds, out, header)
  print(out.read_text())


if __name__ == "__main__":
  app.run(main)
