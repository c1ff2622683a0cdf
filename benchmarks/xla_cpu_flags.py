"""XLA:CPU options that are off by default, against the default, on both sizes.

  python benchmarks/xla_cpu_flags.py --record

XLA reads its flags once per process, so each setting runs in processes of its own:
`steps_vs_torch.py` (whose ratio to PyTorch, measured in that same process, is the
figure to compare: it cancels this noisy machine's slow phases) and `kamal-jax` on
the digits default, cold and warm compilation cache, one setting after the other in
each round. kamal-jax sets none of these options: a user who trains large networks
on a CPU can (`XLA_FLAGS=...`), at the cost the digits rows show.
"""
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
from absl import app, flags

import side_by_side as sbs
from kamal_jax import report

FLAGS = flags.FLAGS
flags.DEFINE_list("settings", ["", "--xla_cpu_experimental_ynn_fusion_type=individual_dot"],
                  "XLA_FLAGS values to compare ('' is the default).")
flags.DEFINE_list("sizes", ["digits", "resnet18_112"], "steps_vs_torch.py sizes.")
flags.DEFINE_integer("rounds", 3, "Rounds of steps_vs_torch.py (alternating inside) and "
                     "of the end-to-end runs.")
flags.DEFINE_bool("record", False, "Also write the tables into benchmarks/RESULTS.md.")

HERE = Path(__file__).resolve().parent
ROW = re.compile(r"^(\S+) \| (stage [^|]+) \| \d+ \| ([\d.]+) \| ([\d.]+) \| ([\d.]+)$")


def _steps(setting: str) -> dict:
  """{(size, step): (kamal_jax ms, PyTorch / kamal_jax)} from steps_vs_torch.py."""
  *_, output = sbs.run_command(
      [sys.executable, str(HERE / "steps_vs_torch.py"), f"--sizes={','.join(FLAGS.sizes)}",
       "--ks=2", f"--rounds={FLAGS.rounds}"], {"XLA_FLAGS": setting})
  rows = [ROW.match(line) for line in output.splitlines()]
  return {(m[1], m[2]): (float(m[3]), float(m[5])) for m in rows if m}


def main(argv):
  del argv
  sbs.setup()
  steps, commands = {}, {s: {"cold": [], "warm": []} for s in FLAGS.settings}
  with tempfile.TemporaryDirectory() as scratch:
    scratch = Path(scratch)
    for setting in FLAGS.settings:
      steps[setting] = _steps(setting)
      print(setting or "default", steps[setting], flush=True)
    for r in range(FLAGS.rounds):
      for i, setting in enumerate(FLAGS.settings):
        cache = scratch / f"cache{r}_{i}"
        for run in ("cold", "warm"):
          result = sbs.run_kamal_jax(scratch / f"{run}{r}_{i}", cache, {"XLA_FLAGS": setting})
          commands[setting][run].append(result["seconds"]["command"])
        print(setting or "default", commands[setting], flush=True)

  names = [s or "default" for s in FLAGS.settings]
  step_rows = [[size, step, *[f"{steps[s][size, step][0]:.1f} ({steps[s][size, step][1]:.2f})"
                              for s in FLAGS.settings]]
               for size, step in steps[FLAGS.settings[0]]]
  base = {run: np.median(commands[FLAGS.settings[0]][run]) for run in ("cold", "warm")}
  command_rows = [[name, *[f"{np.median(commands[s][run]):.1f} "
                           f"({np.median(commands[s][run]) / base[run]:.2f})"
                           for run in ("cold", "warm")]]
                  for name, s in zip(names, FLAGS.settings)]
  text = (f"### XLA:CPU options\n\n{sbs.header()}\n\n`python benchmarks/xla_cpu_flags.py "
          f"--settings={','.join(FLAGS.settings)} --rounds={FLAGS.rounds}`. Steps: kamal_jax "
          f"ms (PyTorch / kamal_jax in the same process), medians of {FLAGS.rounds} x 5 "
          f"steps.\n\n{report.table(['size', 'step', *names], step_rows)}\n\n"
          f"`kamal-jax --config=configs/digits.py`, whole command, median seconds over "
          f"{FLAGS.rounds} rounds (over the default's):\n\n"
          f"{report.table(['XLA_FLAGS', 'cold cache', 'warm cache'], command_rows)}")
  sbs.publish("xla_cpu_flags", text, FLAGS.record)


if __name__ == "__main__":
  app.run(main)
