"""The digits default in PyTorch, structured as the reference code (KamalEngine) is.

  python benchmarks/reference_pipeline.py --out=result.json

Same images, split, grouping, nets, steps, batch sizes and learning rates as
`kamal-jax --config=configs/digits.py` (kamal_jax only supplies the data and the plan;
training and evaluation are PyTorch). The structure is the reference's:
  teachers  trained one after the other, each by its own loop and DataLoader;
  stage 1   per group, an offline pass runs every teacher over every pool image and
            writes, per teacher, a text file of the images it is least ambiguous on
            (entropy); then one DataLoader per teacher over its list, and a step that
            loops over the teachers in Python, each on a batch of its own images
            (batch / K), calling `.item()` on every loss term for the log;
  stage 2   the student from the components, a loop over components, `.item()` per
            term, no selection;
  evaluate  the accuracies of kamal_jax's report (`evaluate.score`) on the test split.
Writes {'seconds': {stage: s}, 'student_joint': ..., 'report': ...} to --out.
"""
import json
import os
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from absl import app, flags
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import side_by_side as sbs
from kamal_jax import data, evaluate, tasks
from kamal_jax.configs import digits

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Where to write the result (JSON).")
flags.mark_flag_as_required("out")


def _batches(images: np.ndarray, labels: np.ndarray | None, batch: int, seed: int):
  """An endless stream of shuffled batches (reshuffled every epoch, last partial
  batch dropped), as a DataLoader gives them."""
  tensors = [sbs.nchw(images)]
  if labels is not None:
    tensors.append(torch.from_numpy(labels).long())
  loader = DataLoader(TensorDataset(*tensors), batch_size=batch, shuffle=True,
                      drop_last=True, generator=torch.Generator().manual_seed(seed))
  while True:
    yield from loader


def _optimizer(params, cfg, steps: int):
  """Adam at cfg.learning_rate (param groups may set their own), halved at the
  cfg.decay_at fractions of training (MultiStepLR)."""
  optimizer = torch.optim.Adam(params, lr=cfg.learning_rate)
  schedule = torch.optim.lr_scheduler.MultiStepLR(
      optimizer, [int(f * steps) for f in cfg.decay_at], cfg.decay_factor)
  return optimizer, schedule


def _logits(net: nn.Module, images: np.ndarray, batch: int = 512) -> np.ndarray:
  net.eval()
  with torch.no_grad():
    return np.concatenate([net(sbs.nchw(images[i:i + batch]))[0].numpy()
                           for i in range(0, len(images), batch)])


def train_teacher(net, images, labels, cfg, seed: int, log: list):
  optimizer, schedule = _optimizer(net.parameters(), cfg.optimizer, cfg.steps)
  net.train()
  for _, (x, y) in zip(range(cfg.steps), _batches(images, labels, cfg.batch_size, seed)):
    loss = F.cross_entropy(net(x)[0], y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    schedule.step()
    log.append(loss.item())


def select_offline(teachers_, index, images, directory: str, part: str) -> list[np.ndarray]:
  """The reference's selection pass: each pool image goes to the teacher whose
  restricted softmax has the least entropy; one file of image ids per teacher, read
  back by the loaders."""
  restricted = torch.from_numpy(np.stack([_logits(t, images)[:, i] for t, i in zip(teachers_, index)]))
  chosen = sbs.entropy(restricted).argmin(0).numpy()
  lists = []
  for k in range(len(teachers_)):
    path = os.path.join(directory, f"{part}_teacher{k}.txt")
    with open(path, "w") as f:
      f.write("\n".join(str(i) for i in np.flatnonzero(chosen == k)))
    with open(path) as f:
      lists.append(np.array([int(line) for line in f.read().split()], dtype=np.int64))
  return lists


def amalgamate(net, frozen, index, groups: nn.ModuleList, streams, cfg, head_sizes, log: list):
  """The reference's amalgamation loop. frozen[g]: the group's networks; streams[g][k]:
  the batches network k of group g teaches on (stage 1: its selected images; stage 2:
  all images, one stream per group)."""
  optimizer, schedule = _optimizer(
      [{"params": net.parameters()},
       {"params": groups.parameters(), "lr": cfg.optimizer.bridge_learning_rate}],
      cfg.optimizer, cfg.steps)
  bounds = np.cumsum((0,) + tuple(head_sizes))
  for _ in range(cfg.steps):
    net.train()
    total = 0
    for g, (group, nets) in enumerate(zip(groups, frozen)):
      for k, (teacher, positions) in enumerate(zip(nets, index[g])):
        x = next(streams[g][k])[0]
        logits, feats = net(x)
        with torch.no_grad():
          z, taps = teacher(x)
        feature, logit = sbs.teacher_terms(group, k, logits[:, bounds[g]:bounds[g + 1]],
                                           feats, z[:, positions], taps)
        share = len(x) / cfg.batch_size  # each sample counts once in the batch mean
        feature, logit = share * feature.mean(), share * logit.mean()
        log.extend([feature.item(), logit.item()])
        total = total + feature + logit
      if group.frozen_bridges is not None:
        penalty = sbs.weight_norm_penalty(group.frozen_bridges)
        log.append(penalty.item())
        total = total + penalty
    optimizer.zero_grad()
    total.backward()
    optimizer.step()
    schedule.step()
    log.append(total.item())


def main(argv):
  del argv
  start = time.perf_counter()
  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  config = digits.get_config()
  dataset = data.load(config.data)
  images = dataset.images.read(np.arange(len(dataset.labels)))
  train, test = data.stratified_split(dataset.labels, config.data.test_fraction, config.seed)
  spaces = {n: tasks.label_space(s, n) for n, s in config.teachers.items()}
  plan = tasks.make_plan(config.target.parts, spaces)
  size = sbs.SIZES["digits"]
  seconds, log = {}, []
  lap = time.perf_counter()

  def done(stage):
    nonlocal lap
    seconds[stage] = round(time.perf_counter() - lap, 2)
    lap = time.perf_counter()

  teachers_ = {}
  for i, (name, space) in enumerate(spaces.items()):
    labels = tasks.label_positions(dataset.labels[train], dataset.heads, space.classes)
    mine = labels >= 0
    teachers_[name] = sbs.torch_net(size, space.num_outputs, seed=1 + i)
    train_teacher(teachers_[name], images[train][mine], labels[mine], config.teacher_training,
                  seed=i, log=log)
    teachers_[name].eval()
  done("teachers")

  cfg, components = config.stage1, []
  with tempfile.TemporaryDirectory() as lists:
    for g, group in enumerate(plan.groups):
      nets = [teachers_[t] for t in group.teachers]
      index = [torch.from_numpy(i).long() for i in group.index]
      chosen = select_offline(nets, index, images[train], lists, group.part.name)
      per_teacher = max(1, cfg.batch_size // len(nets))
      streams = [[_batches(images[train][c], None, per_teacher, seed=10 * g + k)
                  for k, c in enumerate(chosen)]]
      component = sbs.torch_net(size, len(group.part.classes), seed=100 + g)
      bridges = nn.ModuleList([sbs.Group(sbs.tap_widths(component), [sbs.tap_widths(n) for n in nets],
                                         tuple(cfg.bridge_widths), True)])
      amalgamate(component, [nets], [index], bridges, streams, cfg, (len(group.part.classes),), log)
      components.append(component.eval())
  done("stage1")

  cfg = config.stage2
  student = sbs.torch_net(size, sum(plan.head_sizes), config.models.student_width_scale,
                          seed=200)
  widths = sbs.tap_widths(components[0])
  bridges = nn.ModuleList(sbs.Group(sbs.tap_widths(student), [widths], widths, False)
                          for _ in components)
  index = [[torch.arange(len(group.part.classes))] for group in plan.groups]
  streams = [[_batches(images[train], None, cfg.batch_size, seed=300 + g)]
             for g in range(len(components))]
  amalgamate(student, [[c] for c in components], index, bridges, streams, cfg, plan.head_sizes, log)
  done("stage2")

  x = images[test]
  report = evaluate.score(plan, dataset.heads, dataset.labels[test],
                          {n: _logits(t, x) for n, t in teachers_.items()},
                          [_logits(c, x) for c in components],
                          np.split(_logits(student, x), np.cumsum(plan.head_sizes)[:-1], -1))
  done("evaluate")
  seconds["total"] = round(time.perf_counter() - start, 2)
  with open(FLAGS.out, "w") as f:
    json.dump({"seconds": seconds, "student_joint": report["student"]["accuracy_joint"],
               "report": report, "log_entries": len(log)}, f, indent=1, default=float)
  print(json.dumps({"seconds": seconds, "student_joint": report["student"]["accuracy_joint"]}))


if __name__ == "__main__":
  app.run(main)
