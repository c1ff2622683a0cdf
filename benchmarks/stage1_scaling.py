"""What a stage-1 step costs per teacher, to compile and to run, and what selecting costs.

  python benchmarks/stage1_scaling.py --size=digits --record

Table 1: the kamal_jax stage-1 step for K = 1 to 64 teachers in the group (its frozen
networks run stage1.teacher_chunk at a time, `--chunk`), beside one teacher's
eval-mode forward: per K the programs XLA compiled for the step and their seconds
(no persistent cache: this table measures compiling; the median of --compiles), the
step's time, its work (XLA's FLOP count) and its memory (XLA's memory analysis of the
compiled step: the arguments, the teachers' weights among them, and the
temporaries); then the slope
(least-squares seconds per added teacher, over K >= 8) in units of that forward.
Each added teacher costs its forward and, under the method's one-hot selection, the
merge of its features into each image's choice; the bridges run once, on the chosen
teacher's features (amalgamate._stack_pass).
Table 2: the step with the method's selection ('least') and with a plain average
over the teachers ('none'), alternating; the difference in percent of the step. A
third step is the control: the plain average's weights made to depend on the
ambiguity (plus zero times its sum), so its step waits for every teacher's logits
before the weighted loss, as a selecting step must; what selection costs beyond that
wait is 'least' against the control.
"""
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import side_by_side as sbs
from kamal_jax import ambiguity, compilation, report
from kamal_jax.configs import digits

FLAGS = flags.FLAGS
flags.DEFINE_enum("size", "digits", list(sbs.SIZES), "Nets and batch.")
flags.DEFINE_list("ks", ["1", "2", "4", "8", "16", "32", "64"], "Teachers per group.")
flags.DEFINE_integer("chunk", digits.get_config().stage1.teacher_chunk,
                     "Frozen networks per traced body (stage1.teacher_chunk; 0: all).")
flags.DEFINE_integer("selection_k", 4, "Teachers in the selection on/off comparison.")
flags.DEFINE_integer("rounds", 5, "Alternating rounds.")
flags.DEFINE_integer("compiles", 3, "Compiles of each K's step (their median seconds).")
flags.DEFINE_integer("calls", 5, "Calls per program per round.")
flags.DEFINE_integer("selection_rounds", 15,
                     "Alternating rounds of the selection comparison: it measures a few "
                     "percent, so it needs more than the scaling table.")
flags.DEFINE_bool("record", False, "Also write the tables into benchmarks/RESULTS.md.")

CONTROL = "none, waiting for the ambiguity"


def _none_after_ambiguity(ambiguity_values, key, correct, temperature):
  """The plain average's weights [B, K], computed after the ambiguity [K, B]."""
  k, b = ambiguity_values.shape
  return jnp.full((b, k), 1.0 / k) + 0.0 * jnp.sum(ambiguity_values)


# The step looks rules up by name.
ambiguity.RULES[CONTROL] = ambiguity.Rule(weigh=_none_after_ambiguity)


def _compiled(run) -> dict:
  """What the first call of a step compiles (`compilation.since`), `--compiles` times
  from emptied caches: the programs of one first call and their median seconds (one
  compile's seconds vary by a third from run to run)."""
  first_calls = []
  for _ in range(FLAGS.compiles):
    jax.clear_caches()
    before = compilation.totals()
    run()
    first_calls.append(compilation.since(before))
  return {"compiled": first_calls[0]["compiled"],
          "compile_seconds": float(np.median([c["compile_seconds"] for c in first_calls]))}


def main(argv):
  del argv
  sbs.setup(compilation_cache="")
  size = sbs.SIZES[FLAGS.size]
  ks = [int(k) for k in FLAGS.ks]
  steps = {}
  for k in ks:
    problem = sbs.stage1(size, k)
    steps[k] = sbs.jax_step(problem, sbs.TorchAmalgamation(problem), teacher_chunk=FLAGS.chunk)
  compiled = {k: _compiled(run) for k, (run, _) in steps.items()}
  runs = {f"K={k}": run for k, (run, _) in steps.items()}
  runs["forward"], forward_program = sbs.jax_forward(sbs.stage1(size, 1))
  runs["torch forward"] = sbs.torch_forward(sbs.stage1(size, 1))
  times = sbs.alternate(runs, FLAGS.rounds, FLAGS.calls)
  step_times = [times[f"K={k}"] for k in ks]
  forward = times["forward"]
  large = [i for i, k in enumerate(ks) if k >= 8] or list(range(len(ks)))
  slope = np.polyfit(np.take(ks, large), np.take(step_times, large), 1)[0]
  # Work, as XLA counts it: an added teacher brings its forward and its bridges' and
  # losses' share, so the time slope is read against this one.
  programs = {k: compile_step() for k, (_, compile_step) in steps.items()}
  step_flops = [sbs.flops(programs[k]) for k in ks]
  forward_flops = sbs.flops(forward_program())
  # XLA's cost analysis counts a loop's body once, so past the chunk the FLOP column
  # counts one chunk and the tail: the work per teacher is read where K is unrolled.
  unrolled = [i for i, k in enumerate(ks) if not FLAGS.chunk or k <= FLAGS.chunk]
  flop_slope = (np.polyfit(np.take(ks, unrolled), np.take(step_flops, unrolled), 1)[0]
                if len(unrolled) > 1 else float("nan"))
  rows = [[k, compiled[k]["compiled"], f"{compiled[k]['compile_seconds']:.1f}",
           f"{1e3 * t:.1f}", f"{t / forward:.1f}", f"{f / 1e9:.2f}",
           f"{sbs.memory(programs[k]) / 2**20:.1f}",
           f"{programs[k].memory_analysis().temp_size_in_bytes / 2**20:.1f}"]
          for k, t, f in zip(ks, step_times, step_flops)]
  scaling = report.table(["K", "programs compiled", "compile s", "step ms", "step / forward",
                          "step GFLOP", "step memory MiB", "of it temporaries MiB"], rows)

  k = FLAGS.selection_k
  problem = sbs.stage1(size, k)
  selection = sbs.alternate({rule: sbs.steps(problem, rule)["jax"]
                             for rule in ("least", "none", CONTROL)},
                            FLAGS.selection_rounds, FLAGS.calls)
  percent = lambda a, b: f"{100 * (selection[a] - selection[b]) / selection[a]:+.1f}%"
  text = (f"### Stage-1 step: scaling in K, selection overhead ({FLAGS.size})\n\n{sbs.header()}\n\n"
          f"`python benchmarks/stage1_scaling.py --size={FLAGS.size} --ks={','.join(FLAGS.ks)} "
          f"--chunk={FLAGS.chunk}`, batch {size.batch}, "
          f"medians of {FLAGS.rounds} x {FLAGS.calls} calls, alternating.\n\n{scaling}\n\n"
          f"One teacher forward: {1e3 * forward:.2f} ms (PyTorch: {1e3 * times['torch forward']:.2f} ms). "
          f"Slope over K >= {ks[large[0]]}: **{1e3 * slope:.2f} ms per added teacher = "
          f"{slope / forward:.2f} teacher forwards** of time; of work (XLA's FLOP count, forward {forward_flops / 1e9:.2f} "
          f"GFLOP, read over K <= {ks[unrolled[-1]]}: XLA counts a loop's body once, so for "
          f"K > {FLAGS.chunk} the GFLOP column counts one chunk of teachers and the rest "
          f"after the loop), an added teacher is {flop_slope / forward_flops:.2f} forwards.\n\n"
          f"Selection, K={k}: medians of {FLAGS.selection_rounds} x {FLAGS.calls} calls, "
          f"alternating.\n\n"
          + report.table(["K", "selection ('least') ms", "plain average ('none') ms",
                          "overhead", "control ms", "waiting for the ambiguity",
                          "selection beyond the wait"],
                         [[k, f"{1e3 * selection['least']:.2f}", f"{1e3 * selection['none']:.2f}",
                           percent("least", "none"), f"{1e3 * selection[CONTROL]:.2f}",
                           percent(CONTROL, "none"), percent("least", CONTROL)]]))
  sbs.publish(f"stage1_scaling_{FLAGS.size}", text, FLAGS.record)


if __name__ == "__main__":
  app.run(main)
