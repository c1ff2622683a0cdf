"""How to run K stacked networks: vmapped, unrolled, or looped by lax.map.

Times, side by side in one process and alternating, the two programs a stack runs:
K teachers' eval forward on one shared batch (stage 1), and K networks' training
step on K batches (the teacher stage). Prints a markdown table of medians and the
ratio to the unrolled program (`--record`: also into RESULTS.md, one block per
backend and architecture). `kamal_jax.teachers.stack_way` picks from these numbers.

  python benchmarks/stack_strategy.py                      # digits nets
  python benchmarks/stack_strategy.py --arch=resnet18 --image=112 --channels=3 --batch=32
"""
import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import side_by_side as sbs
from kamal_jax import models
from kamal_jax.teachers import WAYS, map_stacked


def programs(module, way):
  run = lambda fn, *stacked: map_stacked(fn, *stacked, in_step=True, way=way)

  def forward(variables, x):  # [K] variables, shared x [B, ...] -> logits [K, B, C]
    return run(lambda v: module.apply(v, x).logits, variables)

  def loss(params, stats, x, y):  # [K] nets on [K, B, ...]
    def one(p, s, xk, yk):
      out, _ = module.apply({"params": p, "batch_stats": s}, xk, train=True,
                            mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(out.logits, yk).mean()
    return jnp.sum(run(one, params, stats, x, y))

  def train(params, stats, x, y):
    grads = jax.grad(loss)(params, stats, x, y)
    return jax.tree.map(lambda p, g: p - 1e-3 * g, params, grads)

  return jax.jit(forward), jax.jit(train)


def median_ms(fn, args, repeats):
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1000 * float(np.median(times))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--arch", default="resnet10_digits")
  parser.add_argument("--image", type=int, default=8)
  parser.add_argument("--channels", type=int, default=1)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--ks", default="1,2,4")
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--record", action="store_true")
  args = parser.parse_args()
  # bn_axis_name=None: these programs run outside the data-parallel step.
  module = models.create(args.arch, 10)
  rng = np.random.default_rng(0)
  command = " ".join(["python benchmarks/stack_strategy.py", *sys.argv[1:]]).replace(
      " --record", "")
  lines = [f"### Stacked networks: {args.arch} at {args.image} px, batch {args.batch}, "
           f"{jax.default_backend()}", "", sbs.header(), "",
           f"`{command}`: medians of {args.rounds} rounds x {args.repeats} calls, the ways "
           "alternating; compile s: the first call (compile included, no cache); "
           "'/ unroll': the ratio to K calls unrolled in one program (lower is faster).", "",
           "| K | program | way | compile s | median ms | / unroll |",
           "|---|---|---|---|---|---|"]
  for k in map(int, args.ks.split(",")):
    x = jnp.asarray(rng.uniform(size=(args.batch, args.image, args.image, args.channels)),
                    jnp.float32)
    xs = jnp.stack([x] * k)
    ys = jnp.asarray(rng.integers(0, 10, size=(k, args.batch)), jnp.int32)
    keys = jax.random.split(jax.random.key(0), k)
    variables = jax.jit(jax.vmap(lambda key: module.init(key, x[:1])))(keys)
    compiled, inputs = {}, {}
    for way in WAYS:
      forward, train = programs(module, way)
      inputs[way] = {"forward": (forward, (variables, x)),
                     "train step": (train, (variables["params"], variables["batch_stats"],
                                            xs, ys))}
      for name, (fn, fn_args) in inputs[way].items():
        start = time.perf_counter()
        jax.block_until_ready(fn(*fn_args))
        compiled[way, name] = time.perf_counter() - start
    timings = {key: [] for key in compiled}
    for _ in range(args.rounds):  # alternate the ways so drift hits all alike
      for way in WAYS:
        for name, (fn, fn_args) in inputs[way].items():
          timings[way, name].append(median_ms(fn, fn_args, args.repeats))
    for name in ("forward", "train step"):
      base = np.median(timings["unroll", name])
      for way in WAYS:
        ms = np.median(timings[way, name])
        lines.append(f"| {k} | {name} | {way} | {compiled[way, name]:.1f} | {ms:.2f} | "
                     f"{ms / base:.2f} |")
  sbs.publish(f"stack_strategy_{jax.default_backend()}_{args.arch}", "\n".join(lines),
              args.record)


if __name__ == "__main__":
  main()
