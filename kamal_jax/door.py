"""The door of a run: every check that can refuse its input before anything is
written, each naming the field and the fix (`validate`: the config alone;
`check_workdir`: the workdir and the config it was started with;
`check_teachers`: the teachers' label sets against the dataset)."""
import json
import tempfile
from pathlib import Path

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import traverse_util

from kamal_jax import ambiguity, amalgamate, data, export, joint, models

__all__ = ["backbone", "CADENCE", "check_teachers", "check_workdir", "config_drift", "validate",
           "workdir_for"]


def validate(config: ml_collections.ConfigDict, pipelines):
  """Checks what can be checked before any data is read, naming the fix; `pipelines`:
  the kinds config.pipeline may name."""
  devices = jax.device_count()
  widths = tuple(config.stage1.bridge_widths)
  if not widths or not all(isinstance(w, int) and w > 0 for w in widths):
    raise ValueError(f"stage1.bridge_widths={widths}: give one positive integer per "
                     "feature tap.")
  batch_sizes = {"eval_batch_size": config.eval_batch_size}
  counts = {"log_every": config.log_every}
  for stage in ("teacher_training", "stage1", "stage2"):
    batch_sizes[f"{stage}.batch_size"] = config[stage].batch_size
    counts[f"{stage}.steps"] = config[stage].steps
    rates = config[stage].optimizer.get("tap_learning_rates", ())
    if len(rates) not in (0, len(widths)):
      raise ValueError(f"{stage}.optimizer.tap_learning_rates has {len(rates)} rates for "
                       f"{len(widths)} feature taps: give one per tap, or none.")
  for name, size in batch_sizes.items():
    if size <= 0 or size % devices:
      raise ValueError(f"{name}={size} does not split over {devices} devices: use a "
                       f"positive multiple of {devices}.")
  for name, count in counts.items():
    if count <= 0:
      raise ValueError(f"{name}={count}: give a positive number.")
  if config.frozen_output_cache_mb < 0:
    raise ValueError(f"frozen_output_cache_mb={config.frozen_output_cache_mb}: give a "
                     "size in MB, or 0 to run the frozen networks in every step.")
  choices = {"pipeline": (config.pipeline, tuple(pipelines)),
             "data.pool": (config.data.pool, ("all", "reference")),
             "stage1.selection": (config.stage1.selection, tuple(ambiguity.RULES)),
             "stage1.logit_loss": (config.stage1.logit_loss, tuple(amalgamate.LOGIT_LOSSES)),
             "stage1.rest": (config.stage1.rest, ("none",) + tuple(joint.RESTS))}
  for name, (value, allowed) in choices.items():
    if value not in allowed:
      raise ValueError(f"{name}={value!r}: use one of {list(allowed)}.")
  ambiguity.get(config.stage1.ambiguity)
  unknown = sorted(set(config.export_graphs) - set(export.GRAPHS))
  if unknown:
    raise ValueError(f"export_graphs names {unknown}: use some of {list(export.GRAPHS)}.")
  if len(config.data.mean) != len(config.data.std) or min(config.data.std, default=1) <= 0:
    raise ValueError(f"data.mean {tuple(config.data.mean)} and data.std "
                     f"{tuple(config.data.std)}: give one of each per channel, std > 0.")
  if config.data.name == "folder" and not config.data.get("path"):
    raise ValueError("data.path is empty: set --config.data.path to a folder with one "
                     "sub-folder of images per class.")
  for domain in list(config.data.domains) + list(config.teacher_domains.values()):
    data.in_domain(np.zeros((1, 1, 1, 1)), domain)
  for arch in (config.models.teacher, config.models.student,
               *config.teacher_models.values()):
    models.create(arch, 1, dtype=config.models.dtype)


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
  """Refuses a workdir that is a file, cannot be written, or holds a run of a config
  that gives other results (resuming it would mix the two)."""
  if workdir.exists() and not workdir.is_dir():
    raise ValueError(f"--workdir {workdir} is a file: give a directory, new or of this run.")
  existing = next(p for p in (workdir, *workdir.absolute().parents) if p.exists())
  try:
    with tempfile.TemporaryFile(dir=existing):
      pass
  except OSError as error:
    raise ValueError(f"--workdir {workdir} cannot be written ({error.strerror} in "
                     f"{existing}): give a directory you can write.") from error
  drift = config_drift(config, workdir)
  if drift:
    more = f" and {len(drift) - 5} more" if len(drift) > 5 else ""
    raise ValueError(
        f"{workdir} holds a run of another config ({'; '.join(drift[:5])}{more}): "
        "resume it with its config.json's values, use another --workdir, or pass "
        "--start_fresh to start anew beside it.")


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
  for field in ("teacher_domains", "teacher_models", "teacher_checkpoints"):
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
