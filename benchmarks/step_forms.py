"""The data-parallel train step in its two forms: `jax.pmap` (in maintenance mode since
jax 0.8) and `jax.jit` of `jax.shard_map` (what `kamal_jax.parallel` runs).

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python benchmarks/step_forms.py --sizes=digits,resnet18_112 --record

Both forms run the same per-device step (`train.step.device_step`) on the same
state, frozen networks and batch, alternating in one process (see
`side_by_side.alternate`); the table gives the seconds to compile and run the first
step, the median milliseconds per step, the ratio, and the largest difference of the
two forms' losses after the timed steps (they start equal and should stay equal).
"""
import functools
import time

import jax
import numpy as np
from absl import app, flags

import side_by_side as sbs
from kamal_jax import amalgamate, parallel, report, train

FLAGS = flags.FLAGS
flags.DEFINE_list("sizes", ["digits", "resnet18_112"], f"Of {list(sbs.SIZES)}.")
flags.DEFINE_integer("k", 2, "Teachers in the stage-1 group.")
flags.DEFINE_integer("rounds", 5, "Alternating rounds.")
flags.DEFINE_integer("calls", 5, "Steps per form per round.")
flags.DEFINE_bool("record", False, "Also write the table into benchmarks/RESULTS.md.")


def _stacked(tree, devices):
  """The pmap layout: [devices, ...] copies (or rows split [devices, b, ...])."""
  sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(devices), ("d",)),
                                        jax.sharding.PartitionSpec("d"))
  return jax.device_put(tree, sharding)


def _forms(spec, state, frozen, batch) -> dict:
  """name -> (step callable returning the loss, seconds of compile + first step)."""
  devices = jax.local_devices()
  n = len(devices)
  body = functools.partial(train.step.device_step, amalgamate.amalgamation_loss, spec)
  pmapped = jax.pmap(body, axis_name=parallel.AXIS, donate_argnums=(0,))
  copies = lambda tree: jax.tree.map(lambda x: np.stack([np.asarray(x)] * n), tree)
  rows = jax.tree.map(lambda x: x.reshape((n, -1) + x.shape[1:]), batch)
  inputs = {
      "pmap": (pmapped, _stacked(copies(state), devices), _stacked(copies(frozen), devices),
               _stacked(rows, devices), lambda m: float(m["loss"][0])),
      "jit + shard_map": (train.train_step(amalgamate.amalgamation_loss, spec),
                          parallel.replicated(state), parallel.replicated(frozen),
                          parallel.split(batch), lambda m: float(m["loss"])),
  }
  forms = {}
  for name, (step, s, f, b, loss) in inputs.items():
    holder = {"state": s, "loss": None}

    def run(step=step, f=f, b=b, loss=loss, holder=holder):
      holder["state"], metrics = step(holder["state"], f, b)
      holder["loss"] = loss(jax.block_until_ready(metrics))

    start = time.perf_counter()
    run()
    forms[name] = (run, time.perf_counter() - start, holder)
  return forms


def main(argv):
  del argv
  sbs.setup(compilation_cache="")  # the first step's time includes compiling
  rows = []
  for name in FLAGS.sizes:
    size = sbs.SIZES[name]
    for label, problem in ((f"stage 1, K={FLAGS.k}", sbs.stage1(size, FLAGS.k)),
                           (f"stage 2, G={size.groups}", sbs.stage2(size))):
      forms = _forms(*sbs.jax_inputs(problem, sbs.TorchAmalgamation(problem)))
      times = sbs.alternate({f: run for f, (run, _, _) in forms.items()}, FLAGS.rounds,
                            FLAGS.calls)
      (p_run, p_first, p_out), (s_run, s_first, s_out) = forms.values()
      rows.append([name, label, size.batch, f"{p_first:.1f}", f"{s_first:.1f}",
                   f"{1e3 * times['pmap']:.1f}", f"{1e3 * times['jit + shard_map']:.1f}",
                   f"{times['pmap'] / times['jit + shard_map']:.2f}",
                   f"{abs(p_out['loss'] - s_out['loss']):.1e}"])
      print(" | ".join(map(str, rows[-1])), flush=True)
  table = report.table(["size", "step", "batch", "pmap first (s)", "shard_map first (s)",
                        "pmap ms", "shard_map ms", "pmap / shard_map", "loss difference"],
                       rows)
  text = (f"### pmap against jit + shard_map\n\n{sbs.header()}, {jax.device_count()} "
          f"devices\n\n`python benchmarks/step_forms.py --sizes={','.join(FLAGS.sizes)} "
          f"--k={FLAGS.k}`, medians of {FLAGS.rounds} x {FLAGS.calls} steps per form, "
          f"alternating; first: compile + first step, no compilation cache.\n\n{table}")
  sbs.publish("step_forms", text, FLAGS.record)


if __name__ == "__main__":
  app.run(main)
