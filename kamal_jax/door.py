"""The door of a run: every check that can refuse its input before anything is
written, each naming the field and the fix (`validate`: the config alone, against
its schema; `check_workdir`: the workdir and the config it was started with;
`check_teachers`: the teachers' label sets against the dataset; `check_fit`: batch
sizes against the pools and the networks' shapes against the bridges)."""
import functools
import json
import os
import tempfile
from pathlib import Path

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import traverse_util

from kamal_jax import ambiguity, files, models, parallel, schema

__all__ = ["AMALGAMATING", "available_memory", "backbone", "BRIDGED", "CADENCE", "check_fit",
           "check_memory", "check_teachers", "check_workdir", "config_drift", "lock_workdir",
           "stage1_memory", "validate", "workdir_for"]


def validate(config: ml_collections.ConfigDict):
  """Checks what the config alone shows, before any data is read: every field
  against the schema (`schema.check`), and every model it names can be built (a
  user's module imports)."""
  schema.check(config, jax.device_count())
  for arch in (config.models.teacher, config.models.student,
               *config.teacher_models.values()):
    models.create(arch, 1, dtype=config.models.dtype)


# The pipelines whose stages learn through feature bridges: one width per tap.
BRIDGED = ("two_stage", "single_stage")


def check_fit(config: ml_collections.ConfigDict, networks: dict, example: np.ndarray,
              sizes: dict[str, tuple[str, int]], test_count: int):
  """What the data and the teachers' files show, before the workdir is touched.

  networks: name -> module of every network the run builds (teachers, components,
    student); example: one input image [1, S, S, C];
  sizes: batch-size field -> (what it draws from, how many images that holds): a
    batch of a stage larger than its pool would fail only when the stage starts;
  test_count: the images held out for the report.
  """
  if not test_count:
    raise ValueError(f"data.test_fraction={config.data.test_fraction} holds out no test "
                     "image: raise it (the report scores every network on them).")
  for field, (pool, count) in sizes.items():
    size = schema.value_at(config, field)
    if count < size:
      raise ValueError(f"{field}={size} is more than the {count} images of {pool}: "
                       f"lower it to at most {count}, or give more images.")
  if config.pipeline not in BRIDGED:
    return
  widths = tuple(config.stage1.bridge_widths)
  # Each architecture once, under the first name it has: a pool of many teachers
  # holds few architectures.
  firsts = {}
  for name, module in networks.items():
    firsts.setdefault(module, name)
  for module, name in firsts.items():
    taps = models.tap_widths(module, example)
    if len(taps) != len(widths):
      raise ValueError(f"stage1.bridge_widths={widths} has {len(widths)} widths, but "
                       f"{name} ({type(module).__name__}) has {len(taps)} feature taps "
                       f"on {example.shape[1]}x{example.shape[2]} images: give one per tap.")


def _bytes(tree) -> int:
  return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(tree))


def stage1_memory(config: ml_collections.ConfigDict, groups: dict[str, list], example,
                  batch_size: int) -> dict:
  """What the largest stage-1 step holds, estimated from shapes: {'group', 'bytes'
  (on the machine), 'weights', 'taps'} (bytes) of the group that holds most.

  groups: part name -> the modules of its teachers, one per teacher. Every device
  holds the group's teachers' variables, their bridge sets with their gradients and
  Adam moments, and, for its rows of `batch_size`, feature taps and their images
  through both bridge sets, float32: under a one-hot selection rule those of the
  stage1.teacher_chunk teachers running and of the one chosen per image; under a rule
  that weighs every teacher, every teacher's (benchmarks/stage1_scaling.py). On CPU
  the devices share the host's memory."""
  devices = jax.local_device_count()
  rows = -(-batch_size // jax.device_count())  # this device's rows
  widths = tuple(config.stage1.bridge_widths)

  @functools.cache
  def per_teacher(module) -> tuple[int, int]:
    variables = jax.eval_shape(lambda: module.init(jax.random.key(0), example, train=False))
    taps = jax.eval_shape(lambda v: module.apply(v, example, train=False).feats, variables)
    bridges = sum(t.shape[-1] * c for t, c in zip(taps, widths))  # both sides, about
    pixels = [int(np.prod(t.shape[1:3])) for t in taps]
    floats = sum(p * (t.shape[-1] + 2 * c) for p, t, c in zip(pixels, taps, widths))
    return _bytes(variables) + 2 * 4 * 4 * bridges, 4 * floats

  one_hot = ambiguity.RULES[config.stage1.selection].one_hot
  largest = None
  for part, modules in groups.items():
    weights = sum(per_teacher(m)[0] for m in modules)
    each = sorted((per_teacher(m)[1] for m in modules), reverse=True)  # taps' bytes
    held = each[:config.stage1.teacher_chunk or len(each)] + each[:1] if one_hot else each
    taps = rows * sum(held)
    estimate = {"group": part, "weights": weights, "taps": taps,
                "bytes": devices * (weights + taps)}
    if largest is None or estimate["bytes"] > largest["bytes"]:
      largest = estimate
  return largest


def available_memory() -> int:
  """Bytes free for a run: the host's available memory on CPU, else one device's."""
  if jax.default_backend() == "cpu":
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("bytes_limit", 0) * jax.local_device_count() or 2**62


# The stage whose step runs a group's teachers, per pipeline (single_stage: every group's).
AMALGAMATING = {"two_stage": "stage1", "single_stage": "stage2"}


def check_memory(config: ml_collections.ConfigDict, groups: dict[str, list], example,
                 available: int, train_stages):
  """Refuses a run that would train a stage whose step does not fit in `available`
  bytes (`stage1_memory`; the single stage runs every group's teachers at once), with
  the estimate and the settings that shrink it."""
  stage = AMALGAMATING.get(config.pipeline)
  if stage not in train_stages:
    return
  if config.pipeline == "single_stage":
    groups = {"every part": [module for modules in groups.values() for module in modules]}
  batch_size = schema.value_at(config, f"{stage}.batch_size")
  need = stage1_memory(config, groups, example, batch_size)
  if need["bytes"] > available:
    gb = lambda b: f"{b / 2**30:.2f} GB"
    teachers = len(groups[need["group"]])
    shrink = " or stage1.teacher_chunk" if ambiguity.RULES[config.stage1.selection].one_hot else ""
    raise ValueError(
        f"{stage} of part {need['group']!r} ({teachers} teachers) needs about "
        f"{gb(need['bytes'])} ({gb(need['weights'])} of teachers and bridges and "
        f"{gb(need['taps'])} of their taps at {stage}.batch_size={batch_size}, per "
        f"device, on {jax.local_device_count()} devices) and {gb(available)} are free: "
        f"lower {stage}.batch_size{shrink}, or amalgamate fewer teachers per part.")


# Config fields that change how often a run logs and checkpoints, or what it exports,
# never its results.
CADENCE = ("log_every", "checkpoint_every", "export_graphs")


def config_drift(config: ml_collections.ConfigDict, workdir: Path) -> list[str]:
  """The fields (but CADENCE) whose values differ from those of the config the
  workdir was started with, as 'field: old -> new'; none for a new workdir."""
  saved = workdir / "config.json"
  if not saved.is_file():
    return []
  old = traverse_util.flatten_dict(json.loads(saved.read_text()), sep=".")
  new = traverse_util.flatten_dict(json.loads(config.to_json_best_effort()), sep=".")
  return [f"{k}: {old.get(k, '(absent)')} -> {new.get(k, '(absent)')}"
          for k in sorted(set(old) | set(new)) if k not in CADENCE and old.get(k) != new.get(k)]


def check_workdir(config: ml_collections.ConfigDict, workdir: Path):
  """Refuses a workdir that is a file, cannot be written, is in use by another run,
  or holds a run of a config that gives other results (resuming it would mix the
  two)."""
  if workdir.exists() and not workdir.is_dir():
    raise ValueError(f"--workdir {workdir} is a file: give a directory, new or of this run.")
  existing = next(p for p in (workdir, *workdir.absolute().parents) if p.exists())
  try:
    with tempfile.TemporaryFile(dir=existing):
      pass
  except OSError as error:
    raise ValueError(f"--workdir {workdir} cannot be written ({error.strerror} in "
                     f"{existing}): give a directory you can write.") from error
  holder = files.holder(workdir) if parallel.primary() else None
  if not parallel.agreed(holder is None):  # checked here, at once; locked after the door
    raise ValueError(_busy(workdir, holder))
  drift = config_drift(config, workdir)
  if drift:
    more = f" and {len(drift) - 5} more" if len(drift) > 5 else ""
    raise ValueError(
        f"{workdir} holds a run of another config ({'; '.join(drift[:5])}{more}): "
        "resume it with its config.json's values, use another --workdir, or pass "
        "--start_fresh to start anew beside it.")


def _busy(workdir: Path, holder: str | None) -> str:
  return (f"--workdir {workdir} is in use by another run ({holder or 'found by process 0'}): "
          "wait for it to end, or give another --workdir.")


def lock_workdir(workdir: Path):
  """The workdir's lock (`files.lock_workdir`), taken by process 0 for all the
  processes of the run, which write as one; ValueError while another run holds it."""
  lock = holder = None
  if parallel.primary():
    try:
      lock = files.lock_workdir(workdir)
    except files.WorkdirBusy as busy:
      holder = str(busy)
  if not parallel.agreed(holder is None):
    raise ValueError(_busy(workdir, holder))
  return lock


def workdir_for(config: ml_collections.ConfigDict, workdir: Path, start_fresh: bool) -> Path:
  """`workdir`; with start_fresh, where it holds a run of another config, the first
  WORKDIR-N (N = 2, 3, ...) that is new or holds a run of this config."""
  candidate, n = workdir, 1
  while start_fresh and candidate.exists() and config_drift(config, candidate):
    n += 1
    candidate = workdir.with_name(f"{workdir.name}-{n}")
  if candidate != workdir:
    logging.warning("%s holds a run of another config; this one runs in %s.", workdir,
                    candidate)
  return candidate


def check_teachers(config: ml_collections.ConfigDict, class_names, spaces: dict):
  """Every teacher's classes are classes of the dataset, and the config's per-teacher
  fields name only teachers."""
  unknown = sorted({c for s in spaces.values() for c in s.classes} - set(class_names))
  if unknown:
    raise ValueError(f"Teacher classes {unknown[:10]} are not classes of dataset "
                     f"{config.data.name!r} ({len(class_names)} classes, e.g. "
                     f"{list(class_names[:10])}): fix the teachers' label sets.")
  for field in ("teacher_domains", "teacher_models", "teacher_checkpoints", "teacher_steps"):
    strangers = sorted(set(config[field]) - set(spaces))
    if strangers:
      raise ValueError(f"{field} names {strangers}, which are not teachers "
                       f"{sorted(spaces)}: fix the names.")


def backbone(config: ml_collections.ConfigDict, channels: int) -> dict | None:
  """The variables of config.models.pretrained (a torchvision-named ResNet checkpoint,
  e.g. ImageNet weights), checked to be models.teacher's architecture and to read
  images of `channels` channels; None where it names none."""
  path = config.models.pretrained
  if not path:
    return None
  from kamal_jax.third_party import torch_resnet  # pylint: disable=g-import-not-at-top
  try:
    module, variables = torch_resnet.load(path, config.models.dtype)
  except ValueError as error:
    raise ValueError(f"models.pretrained: {error}") from error
  wanted = models.teacher(config.models, module.num_outputs)
  stem = variables["params"]["stem_conv"]["kernel"].shape[2]
  if module.clone(bn_axis_name=wanted.bn_axis_name) != wanted or stem != channels:
    raise ValueError(
        f"models.pretrained {path} holds a ResNet of widths {module.widths}, blocks "
        f"{module.blocks} on {stem}-channel images; models.teacher "
        f"{config.models.teacher!r} has widths {wanted.widths}, blocks {wanted.blocks} "
        f"and the data {channels} channels: give a checkpoint of that architecture.")
  return variables
