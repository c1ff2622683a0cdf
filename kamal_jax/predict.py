"""An exported network (`kamal_jax.export`) loaded by itself, and its predictions.

  model = kamal_jax.load("runs/digits/export/student")
  result = model.predict(["a.png", "b.jpg"])   # files, PIL images, or an array
  result.classes, result.probability, result.parts, result.head_classes

`load` reads model.json and model.safetensors only (no workdir, no config, no
PyTorch); `Model.module` and `Model.variables` are the Flax network for library
users. Images are preprocessed as model.json says, which is how the network saw
images in training (`data.images.eval_view`), and the joint class is decided by the
one joint rule (`joint.decide`) over the heads.
"""
import csv
import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from kamal_jax import export, joint, models
from kamal_jax.data import folder
from kamal_jax.data import images as image_io

__all__ = ["decide", "image_files", "load", "Model", "Predictions", "write_csv"]


@dataclasses.dataclass(frozen=True)
class Predictions:
  """Per image: the joint class and its probability over the target's classes, the
  part (head) it belongs to, and each head's own top class; logits as the network
  gave them [N, sum of head widths]."""
  classes: list[str]
  probability: np.ndarray  # [N]
  parts: list[str]
  head_classes: list[dict[str, str]]
  logits: np.ndarray


@dataclasses.dataclass(frozen=True)
class Model:
  module: models.ResNet
  variables: dict
  description: dict  # model.json
  batch_size: int = 256

  @property
  def heads(self) -> tuple[export.Head, ...]:
    return tuple(export.Head(h["name"], tuple(h["classes"]), h["rest"])
                 for h in self.description["heads"])

  @property
  def preprocessing(self) -> export.Preprocessing:
    spec = self.description["preprocessing"]
    return export.Preprocessing(spec["size"], spec["channels"], spec["crop_fraction"],
                                tuple(spec["mean"]), tuple(spec["std"]))

  def inputs(self, images) -> np.ndarray:
    """Files or PIL images -> the network's input [N, S, S, C], as training's
    evaluation view cut them; an array [N, S, S, C] in [0, 1] is taken as already
    cut (checked against the input shape). Then normalised by mean and std."""
    spec = self.preprocessing
    if isinstance(images, np.ndarray) or hasattr(images, "__array__"):
      x = np.asarray(images, np.float32)
      wanted = (spec.size, spec.size, spec.channels)
      if x.ndim != 4 or x.shape[1:] != wanted:
        raise ValueError(f"images of shape {x.shape}: this model takes [N, "
                         f"{', '.join(map(str, wanted))}] (NHWC, pixels in [0, 1]).")
    else:
      x = np.stack([self.cut(image) for image in images])
    if spec.mean:
      x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return x

  def cut(self, image) -> np.ndarray:
    """A file (path) or PIL image -> [S, S, C] in [0, 1], before mean and std."""
    spec = self.preprocessing
    if isinstance(image, Image.Image):
      image = image_io.convert(image, spec.channels)
    else:
      image = image_io.decode(str(image), spec.channels)
    return image_io.eval_view(image, image_io.View(spec.size, spec.crop_fraction),
                              spec.channels)

  def logits(self, images) -> np.ndarray:
    """[N, sum of head widths], in batches of batch_size (the last one padded, so
    that one compiled program serves every batch)."""
    x = self.inputs(images)
    apply = _apply(self.module)
    chunks = []
    for start in range(0, len(x), self.batch_size):
      chunk = x[start:start + self.batch_size]
      padded = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch_size - len(chunk), 0)])
      chunks.append(np.asarray(apply(self.variables, padded))[:len(chunk)])
    return np.concatenate(chunks) if chunks else np.zeros((0, self.module.num_outputs))

  def predict(self, images) -> Predictions:
    logits = self.logits(images)
    return decide(self.heads, logits)


def decide(heads: Sequence[export.Head], logits: np.ndarray) -> Predictions:
  """The joint rule's answer for logits [N, sum of head widths] of the given heads."""
  widths = [h.width for h in heads]
  rest = any(h.rest for h in heads)
  scores = np.asarray(joint.scores(logits, widths, rest))  # [N, T]
  probabilities = np.asarray(jax.nn.softmax(scores, axis=-1))
  decided = np.argmax(scores, axis=-1)
  names = [c for h in heads for c in h.classes]
  part_of = [h.name for h in heads for _ in h.classes]
  per_head = joint.split_heads(scores, [len(h.classes) for h in heads])  # [N, P_h] each
  head_classes = [{h.name: h.classes[int(np.argmax(s[n]))] for h, s in zip(heads, per_head)}
                  for n in range(len(scores))]
  return Predictions([names[i] for i in decided],
                     probabilities[np.arange(len(decided)), decided],
                     [part_of[i] for i in decided], head_classes, logits)


@functools.cache
def _apply(module: models.ResNet):
  """One jitted eval-mode forward per module."""
  return jax.jit(lambda v, x: module.apply(v, x, train=False).logits)


def load(directory) -> Model:
  """The exported network in `directory` (model.json and model.safetensors)."""
  from kamal_jax.third_party import torch_resnet  # pylint: disable=g-import-not-at-top
  directory = Path(directory)
  described = directory / export.DESCRIPTION
  if not described.is_file():
    raise ValueError(f"--model {directory}: no {export.DESCRIPTION} there: give a folder "
                     "written by `kamal-jax export` (e.g. WORKDIR/export/student).")
  try:
    description = json.loads(described.read_text())
    if description.get("format") != export.FORMAT:
      raise ValueError(f"its format is {description.get('format')!r}, not {export.FORMAT!r}")
    module = export.module_of(description)
    loaded, variables = torch_resnet.load(str(directory / export.WEIGHTS))
  except (ValueError, KeyError, TypeError) as error:
    raise ValueError(f"--model {directory}: damaged model folder ({error}): export it "
                     "again with `kamal-jax export`.") from error
  if loaded.clone(dtype=module.dtype) != module:
    raise ValueError(f"--model {directory}: {export.WEIGHTS} holds a network of widths "
                     f"{loaded.widths} and {loaded.num_outputs} outputs, not the one "
                     f"{export.DESCRIPTION} describes: export it again.")
  return Model(module, jax.tree.map(jnp.asarray, variables), description)


def image_files(paths: Iterable[str]) -> list[Path]:
  """Files as given, and every visible file under each folder, sorted."""
  found = []
  for path in map(Path, paths):
    if path.is_dir():
      found.extend(sorted(f for f in path.rglob("*") if f.is_file() and not any(
          part.startswith(".") for part in f.relative_to(path).parts)))
    elif path.is_file():
      found.append(path)
    else:
      raise ValueError(f"{path}: no such file or folder: give image files or folders.")
  return found


def _cut_or_reason(model: Model, path: Path, skip_unreadable: bool):
  try:
    return model.cut(path), ""
  except ValueError as error:
    if not skip_unreadable:
      raise
    return None, " ".join(str(error).split())


def _rows(model: Model, files: Sequence[Path], skip_unreadable: bool):
  """One CSV row per file (see `write_csv`), predicted batch by batch."""
  heads = [h.name for h in model.heads]
  for begin in range(0, len(files), model.batch_size):
    batch = files[begin:begin + model.batch_size]
    cut = list(image_io.THREADS.map(
        lambda f: _cut_or_reason(model, f, skip_unreadable), batch))
    readable = [image for image, _ in cut if image is not None]
    result = model.predict(np.stack(readable)) if readable else None
    row = 0
    for path, (image, reason) in zip(batch, cut):
      if image is None:
        yield [path, "", "", "", *([""] * len(heads)), reason]
        continue
      yield [path, result.classes[row], f"{result.probability[row]:.6f}", result.parts[row],
             *(result.head_classes[row][h] for h in heads), ""]
      row += 1


def write_csv(model: Model, files: Sequence[Path], out: Path, batch_size: int,
              skip_unreadable: bool = False) -> tuple[int, float]:
  """Predicts every file and writes one CSV row per file: path, the joint class, its
  probability, its part, each head's top class, and why it was skipped (with
  skip_unreadable; else an unreadable file stops it, naming the file). The CSV is
  written beside `out` and renamed over it once complete. Returns (images predicted,
  seconds)."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  if not skip_unreadable:  # at the door: the headers of all, before any prediction
    for path in files:
      folder.check_readable(path)
  model = dataclasses.replace(model, batch_size=batch_size)
  out.parent.mkdir(parents=True, exist_ok=True)
  partial = out.with_name(f".{out.name}.partial")
  start, count = time.perf_counter(), 0
  try:
    with open(partial, "w", newline="") as handle, tqdm(total=len(files), unit="image") as bar:
      writer = csv.writer(handle)
      writer.writerow(["path", "class", "probability", "part",
                       *(f"top_{h.name}" for h in model.heads), "skipped"])
      for row in _rows(model, files, skip_unreadable):
        writer.writerow(row)
        count += not row[-1]
        bar.update(1)
  except BaseException:
    partial.unlink(missing_ok=True)
    raise
  partial.replace(out)
  return count, time.perf_counter() - start
