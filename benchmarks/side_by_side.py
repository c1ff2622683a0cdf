"""The amalgamation steps built twice, in kamal_jax and in idiomatic PyTorch, and a
timer that runs them side by side.

Both sides compute what `kamal_jax.amalgamate.amalgamation_loss` does: the network
being trained (train mode) on a batch; per group, its K frozen networks (eval mode,
no gradients) give restricted logits and feature taps; each sample learns from its
least ambiguous (entropy) network ('least') or from all of them equally ('none')
through one bridge set per frozen network on each side; logit MSE with a learnable
scale; the weight-norm penalty of the frozen-side bridges; one Adam update. Stage 1
is one group of K teachers with bridges on both sides; stage 2 is G groups of one
component each, whose features are compared as they are.

Both sides start from the same values: every network and bridge is built in
PyTorch and converted (`torch_resnet.convert`), so they select the same teachers and
their losses agree (tests/test_against_torch.py checks two steps).

PyTorch runs as its users write it: NCHW, a Python loop over the frozen networks,
`torch.no_grad()` around them, `torch.set_num_threads(cores)`.
"""
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kamal_jax import amalgamate, models, parallel, pipeline, teachers, train
from kamal_jax.configs import digits
from kamal_jax.third_party import torch_resnet
from kamal_jax.third_party.torch_nets import TorchResNet


@dataclasses.dataclass(frozen=True)
class Size:
  arch: str  # kamal_jax.models.ARCHS name of the teachers and components
  image: int
  channels: int
  batch: int
  bridge_widths: tuple[int, ...]
  part: int  # classes in one part (a component's head)
  teacher_outputs: int  # logits of one teacher (its part plus its other classes)
  student_scale: float = 1.125
  groups: int = 2  # heads of the student (stage 2)


SIZES = {
    # The digits default's nets and batch.
    "digits": Size("resnet10_digits", 8, 1, 64, (8, 8, 16, 32, 64), part=3,
                   teacher_outputs=4),
    # The class setup's nets at half its resolution (a Stanford Dogs part has 60
    # classes; a teacher adds a quarter of Cars196's 196).
    "resnet18_112": Size("resnet18", 112, 3, 32, (32, 32, 64, 128, 256), part=60,
                         teacher_outputs=109),
    "resnet18_224": Size("resnet18", 224, 3, 64, (32, 32, 64, 128, 256), part=60,
                         teacher_outputs=109),
}
LEARNING_RATE, BRIDGE_LEARNING_RATE = 1e-3, 2e-3


def torch_net(size: Size, num_outputs: int, scale: float = 1.0, seed: int = 0) -> TorchResNet:
  arch = models.ARCHS[size.arch]
  torch.manual_seed(seed)
  return TorchResNet(tuple(int(round(w * scale)) for w in arch.widths), arch.blocks,
                     num_outputs, small_input=arch.small_input, channels=size.channels)


@dataclasses.dataclass
class Problem:
  """One step's networks, shared by both sides: the trained network (torch, for its
  architecture), per group the frozen networks (torch, eval mode) and the positions of
  the group's part in each one's logits, and the batch (NHWC)."""
  net: TorchResNet
  frozen: list[list[TorchResNet]]
  index: list[np.ndarray]  # per group [K, P]
  head_sizes: tuple[int, ...]
  bridge_widths: tuple[int, ...]
  frozen_bridges: bool
  images: np.ndarray  # [B, H, W, C]


def stage1(size: Size, k: int, seed: int = 0) -> Problem:
  """A component learning one part from k teachers that each know the part and more."""
  teachers_ = [torch_net(size, size.teacher_outputs, seed=seed + 1 + i).eval() for i in range(k)]
  index = np.stack([np.arange(size.part, dtype=np.int32)] * k)
  return Problem(torch_net(size, size.part, seed=seed), [teachers_], [index], (size.part,),
                 size.bridge_widths, True, _images(size, seed))


def stage2(size: Size, seed: int = 0) -> Problem:
  """The student learning `size.groups` parts, one from each component."""
  components = [[torch_net(size, size.part, seed=seed + 1 + g).eval()] for g in range(size.groups)]
  index = [np.arange(size.part, dtype=np.int32)[None]] * size.groups
  widths = tuple(int(w) for w in models.ARCHS[size.arch].widths)
  return Problem(torch_net(size, size.part * size.groups, size.student_scale, seed),
                 components, index, (size.part,) * size.groups, widths, False,
                 _images(size, seed))


def _images(size: Size, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).normal(
      size=(size.batch, size.image, size.image, size.channels)).astype(np.float32)


# --- kamal_jax ---------------------------------------------------------------------

def _flax(net: TorchResNet, dtype: str = "float32") -> tuple:
  state = {name: value.detach().numpy() for name, value in net.state_dict().items()
           if not name.endswith("num_batches_tracked")}
  return torch_resnet.convert(state, dtype)


def _stacked_bridges(bridge_sets) -> dict:
  """K PyTorch bridge sets -> the Flax Bridges tree with leaves [K, 1, 1, D, c]."""
  return {f"tap{l}": {"kernel": np.stack([
      b.taps[l].weight.detach().numpy().transpose(2, 3, 1, 0) for b in bridge_sets])}
          for l in range(len(bridge_sets[0].taps))}


def jax_inputs(problem: Problem, start: "TorchAmalgamation", dtype: str = "float32",
               teacher_chunk: int = 0):
  """A kamal_jax stage-1 or stage-2 step's spec and host inputs (state, frozen,
  batch), compute in `dtype`, its frozen networks run `teacher_chunk` at a time
  (`Amalgamation.teacher_chunk`); every trainable starts from `start`'s values (take
  them before its first step), so both sides compute the same numbers."""
  module, variables = _flax(problem.net, dtype)
  module = module.clone(bn_axis_name=train.AXIS)  # trained by the project's step
  frozen, groups = [], {}
  for g, (nets, index, group) in enumerate(zip(problem.frozen, problem.index, start.groups)):
    converted = [_flax(n, dtype) for n in nets]
    frozen.append((amalgamate.FrozenStack(
        converted[0][0], teachers.stack_variables([v for _, v in converted]), index),))
    groups[str(g)] = {"net_bridges": _stacked_bridges(group.net_bridges),
                      "logit_scale": group.logit_scale.detach().numpy()}
    if problem.frozen_bridges:
      groups[str(g)]["frozen_bridges"] = [_stacked_bridges(group.frozen_bridges)]
  spec = amalgamate.Amalgamation(
      net=module, head_sizes=problem.head_sizes,
      bridge_widths=problem.bridge_widths, frozen_bridges=problem.frozen_bridges,
      selection=start.selection, teacher_chunk=teacher_chunk)
  state = train.create_state(
      {"params": {"net": variables["params"], "groups": groups},
       "batch_stats": variables["batch_stats"]},
      digits.optimizer(LEARNING_RATE, BRIDGE_LEARNING_RATE), 10**6)
  return spec, state, tuple(frozen), {"image": problem.images}


def jax_step(problem: Problem, start: "TorchAmalgamation", dtype: str = "float32",
             teacher_chunk: int = 0):
  """A callable running one kamal_jax train step (on every device, state donated;
  see `jax_inputs`) and returning its metrics, and one compiling the step anew
  (XLA's `Compiled`: see `flops` and `memory`)."""
  spec, state, frozen, batch = jax_inputs(problem, start, dtype, teacher_chunk)
  state, frozen, batch = parallel.replicated(state), parallel.replicated(frozen), \
      parallel.split(batch)
  step = train.train_step(amalgamate.amalgamation_loss, spec)
  shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype,
                                                       sharding=a.sharding),
                        (state, frozen, batch))

  def run():
    nonlocal state
    state, metrics = step(state, frozen, batch)
    return jax.block_until_ready(metrics)

  return run, lambda: step.lower(*shapes).compile()


def flops(compiled) -> float:
  """FLOPs of a compiled program by XLA's cost analysis."""
  cost = compiled.cost_analysis()
  return (cost[0] if isinstance(cost, list) else cost).get("flops", float("nan"))


def memory(compiled) -> float:
  """Bytes a compiled program holds on its device while it runs, by XLA's memory
  analysis: its arguments, outputs and temporaries (donated arguments counted once)."""
  stats = compiled.memory_analysis()
  return (stats.argument_size_in_bytes + stats.output_size_in_bytes
          - stats.alias_size_in_bytes + stats.temp_size_in_bytes)


# --- PyTorch -----------------------------------------------------------------------

def nchw(images: np.ndarray) -> torch.Tensor:
  """NHWC images (kamal_jax's layout) as a PyTorch NCHW tensor."""
  return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


class Bridges(nn.Module):
  """One bias-free 1x1 convolution per feature tap."""

  def __init__(self, in_widths, widths):
    super().__init__()
    self.taps = nn.ModuleList(nn.Conv2d(i, o, 1, bias=False) for i, o in zip(in_widths, widths))

  def forward(self, feats):
    return [bridge(f) for bridge, f in zip(self.taps, feats)]


def tap_widths(net: TorchResNet) -> list[int]:
  return [net.conv1.out_channels] + [getattr(net, f"layer{s}")[-1].bn1.num_features
                                     for s in range(1, net.stages + 1)]


class Group(nn.Module):
  """A head's trainables: per frozen network a bridge set on the trained network's
  taps, one on the frozen network's taps (if `frozen_bridges`), a logit scale."""

  def __init__(self, net_widths, frozen_widths, bridge_widths, frozen_bridges):
    super().__init__()
    self.net_bridges = nn.ModuleList(Bridges(net_widths, bridge_widths) for _ in frozen_widths)
    self.frozen_bridges = nn.ModuleList(
        Bridges(w, bridge_widths) for w in frozen_widths) if frozen_bridges else None
    self.logit_scale = nn.Parameter(torch.ones(len(frozen_widths)))


def entropy(logits):
  log_p = F.log_softmax(logits, dim=-1)
  return -(log_p.exp() * log_p).sum(-1)


def weight_norm_penalty(bridges: nn.ModuleList):
  return sum((((conv.weight.flatten(1) ** 2).sum(1) - 1) ** 2).mean()
             for b in bridges for conv in b.taps)


def teacher_terms(group: Group, k: int, logits, feats, z, taps) -> tuple:
  """Per-sample feature and logit losses ([B], [B]) of the trained network's logits
  [B, P] and taps against frozen network k's restricted logits z [B, P] and taps."""
  predicted = group.net_bridges[k](feats)
  target = group.frozen_bridges[k](taps) if group.frozen_bridges is not None else taps
  feature = sum(F.mse_loss(p, t, reduction="none").flatten(1).mean(1)
                for p, t in zip(predicted, target))
  logit = F.mse_loss(group.logit_scale[k] * logits, z, reduction="none").mean(1)
  return feature, logit


def group_losses(group: Group, logits, feats, frozen_outputs, selection: str) -> dict:
  """The group's loss terms (scalar tensors) for the trained network's logits [B, P]
  and taps, from the frozen networks' [(restricted logits [B, P], taps)]."""
  targets = torch.stack([z for z, _ in frozen_outputs])  # [K, B, P]
  count, batch = targets.shape[:2]
  if selection == "least":
    weights = F.one_hot(entropy(targets).argmin(0), count).T.to(logits.dtype)  # [K, B]
  else:
    weights = torch.full((count, batch), 1.0 / count)
  feature = logit = 0
  for k, (z, taps) in enumerate(frozen_outputs):
    per_sample = teacher_terms(group, k, logits, feats, z, taps)
    feature = feature + (weights[k] * per_sample[0]).mean()
    logit = logit + (weights[k] * per_sample[1]).mean()
  terms = {"feature": feature, "logit": logit}
  if group.frozen_bridges is not None:
    terms["weight_norm"] = weight_norm_penalty(group.frozen_bridges)
  return terms


class TorchAmalgamation:
  """The trained network, its groups' bridges and the Adam optimizer (network at
  LEARNING_RATE, bridges and scales at BRIDGE_LEARNING_RATE)."""

  def __init__(self, problem: Problem, selection: str = "least"):
    self.problem, self.selection = problem, selection
    self.net = problem.net.train()
    self.frozen_index = [[torch.from_numpy(i).long() for i in index] for index in problem.index]
    self.groups = nn.ModuleList(
        Group(tap_widths(self.net), [tap_widths(n) for n in nets], problem.bridge_widths,
              problem.frozen_bridges) for nets in problem.frozen)
    self.optimizer = torch.optim.Adam([
        {"params": self.net.parameters(), "lr": LEARNING_RATE},
        {"params": self.groups.parameters(), "lr": BRIDGE_LEARNING_RATE}])

  def losses(self, x) -> dict:
    """Every loss term, per group: {'g/term': scalar tensor}."""
    logits, feats = self.net(x)
    bounds = np.cumsum((0,) + self.problem.head_sizes)
    terms = {}
    for g, (group, nets) in enumerate(zip(self.groups, self.problem.frozen)):
      with torch.no_grad():
        outputs = []
        for net, index in zip(nets, self.frozen_index[g]):
          z, taps = net(x)
          outputs.append((z[:, index], taps))
      group_terms = group_losses(group, logits[:, bounds[g]:bounds[g + 1]], feats, outputs,
                                 self.selection)
      terms.update({f"{g}/{name}": value for name, value in group_terms.items()})
    return terms

  def step(self, x) -> dict:
    terms = self.losses(x)
    self.optimizer.zero_grad(set_to_none=True)
    sum(terms.values()).backward()
    self.optimizer.step()
    return terms


def steps(problem: Problem, selection: str = "least") -> dict:
  """{'jax', 'torch'}: callables running one step of each side on the problem's batch
  (returning its loss terms), from the same initial values."""
  amalgamation = TorchAmalgamation(problem, selection)
  x = nchw(problem.images)
  return {"jax": jax_step(problem, amalgamation)[0], "torch": lambda: amalgamation.step(x)}


def torch_forward(problem: Problem):
  """One eval-mode forward of the first frozen network (no gradients)."""
  net, x = problem.frozen[0][0], nchw(problem.images)

  def run():
    with torch.no_grad():
      net(x)
  return run


def jax_forward(problem: Problem):
  """A callable running one jitted eval-mode forward of the first frozen network,
  waited for, and one compiling it (as `jax_step`)."""
  module, variables = _flax(problem.frozen[0][0])
  forward = jax.jit(lambda v, x: module.apply(v, x, train=False))
  variables, x = jax.device_put((variables, problem.images))
  return (lambda: jax.block_until_ready(forward(variables, x)),
          lambda: forward.lower(variables, x).compile())


# --- timing ------------------------------------------------------------------------

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def setup(compilation_cache: str = "~/.cache/kamal_jax/jax"):
  """PyTorch on every core, as XLA:CPU uses them; JAX's persistent compilation cache
  (compiling is not what the step tables measure)."""
  torch.set_num_threads(os.cpu_count())
  if compilation_cache:
    pipeline.enable_compilation_cache(compilation_cache)


def alternate(runs: dict, rounds: int, calls: int) -> dict:
  """Median seconds per call of each callable: one warm-up call each (compiles), then
  `rounds` rounds in which every callable runs `calls` times in turn, so slow phases
  of a noisy machine hit all of them alike; every other round in reverse order, so
  no program always runs first."""
  for run in runs.values():
    run()
  times = {name: [] for name in runs}
  for r in range(rounds):
    for name in list(runs)[::1 if r % 2 == 0 else -1]:
      run = runs[name]
      for _ in range(calls):
        start = time.perf_counter()
        run()
        times[name].append(time.perf_counter() - start)
  return {name: float(np.median(t)) for name, t in times.items()}


def run_command(command: list[str], env: dict | None = None) -> tuple[float, float, str]:
  """Runs a command from the repository root to its end: (wall seconds, peak
  resident memory in GB, its output). `env`: variables added to this process's."""
  with tempfile.TemporaryFile("w+") as log:
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=Path(RESULTS).parent.parent, stdout=log,
                               stderr=log, env=dict(os.environ, **(env or {})))
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    log.seek(0)
    output = log.read()
  if os.waitstatus_to_exitcode(status):
    raise RuntimeError(f"{' '.join(command)} failed:\n{output[-3000:]}")
  return seconds, usage.ru_maxrss / 2**20, output  # Linux gives kilobytes


def run_kamal_jax(workdir: Path, cache: Path, env: dict | None = None) -> dict:
  """`kamal-jax` on the digits default: seconds per stage and of the whole command,
  peak memory, student joint accuracy and what it compiled."""
  seconds, memory, _ = run_command([str(Path(sys.executable).parent / "kamal-jax"),
                                    "--config=configs/digits.py", f"--workdir={workdir}",
                                    f"--compilation_cache={cache}"], env)
  result = json.loads((workdir / "report.json").read_text())
  return {"seconds": dict(result["timings"], command=seconds), "memory": memory,
          "joint": result["student"]["accuracy_joint"],
          "compilation": json.loads((workdir / "compilation.json").read_text())}


def header() -> str:
  """The machine, versions and date, for RESULTS.md."""
  return (f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores, "
          f"{jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads)")


def publish(section: str, text: str, record: bool):
  """Prints a benchmark's markdown; with `record`, also puts it into RESULTS.md
  between the markers of `section` (replacing what a previous run put there, else
  appending), so each benchmark keeps its own up-to-date block."""
  print("\n" + text)
  if not record:
    return
  begin, end = f"<!-- {section} -->", f"<!-- /{section} -->"
  old = open(RESULTS).read() if os.path.exists(RESULTS) else ""
  block = f"{begin}\n{text.strip()}\n{end}"
  if begin in old and end in old:
    new = old[:old.index(begin)] + block + old[old.index(end) + len(end):]
  else:
    new = old.rstrip() + "\n\n" + block + "\n"
  with open(RESULTS, "w") as f:
    f.write(new)
