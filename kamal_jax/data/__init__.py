"""Datasets by name, the held-out split, and the deterministic batch streams.

Everything random here is a pure function of (seed, stream name, step), so a resumed
run replays exactly the batches it would have seen.
"""
import os
import zlib
from typing import NamedTuple

import jax
import numpy as np

from kamal_jax import tasks
from kamal_jax.data import folder, tfds_images
from kamal_jax.data.digits import Digits
from kamal_jax.data.images import MODES, ArrayImages, EncodedImages, View

__all__ = ["assign_domains", "batch_indices", "BUILDERS", "DOMAINS", "in_domain",
           "in_domains", "LabeledImages", "load", "NAMES", "stratified_split",
           "stream_key", "stream_rng", "view"]


class LabeledImages(NamedTuple):
  """Images behind a reader (`images.read(indices, rng)`, see `images`) and their
  labels as heads (see `tasks.label_positions`): a class dataset has one head; an
  attribute dataset one 2-way head per attribute."""
  images: ArrayImages | EncodedImages
  labels: np.ndarray  # [N, heads] int32: the class index in each head, -1 for none
  heads: tuple[tasks.Head, ...]
  test: np.ndarray | None = None  # [N] bool: the dataset's own test split, if it has one

  @property
  def class_names(self) -> tuple[str, ...]:
    return tuple(c for head in self.heads for c in head.classes)


BUILDERS = {"digits": Digits}  # embedded builders, held in memory
NAMES = (*BUILDERS, "folder", "tfds")


def view(cfg) -> View:
  """How config.data cuts images to the networks' input (see `images.View`)."""
  if cfg.channels not in MODES:
    raise ValueError(f"data.channels={cfg.channels}: use 1 (grey) or 3 (RGB).")
  return View(cfg.image_size, cfg.crop_fraction, cfg.min_scale, cfg.flip)


def load(cfg) -> LabeledImages:
  """config.data's dataset, in a fixed order:
    an embedded builder's (cfg.name in BUILDERS, files in cfg.data_dir), held in
      memory in 'id' order;
    catalogue datasets' (cfg.name 'tfds': cfg.datasets, see `tfds_images`), or a user's
      image folder's (cfg.name 'folder': cfg.path, see `folder`), decoded per batch,
      cut to cfg.image_size by `view(cfg)` and converted to cfg.channels."""
  if cfg.name == "tfds":
    return LabeledImages(*tfds_images.load(cfg.datasets, cfg.data_dir, view(cfg), cfg.channels))
  if cfg.name == "folder":
    files, labels, class_names = folder.load(cfg.path)
    return LabeledImages(EncodedImages(files, view(cfg), cfg.channels), labels[:, None],
                         (tasks.Head("class", class_names),))
  if cfg.name not in BUILDERS:
    raise ValueError(f"Unknown dataset {cfg.name!r}: use one of {list(NAMES)}.")
  name, data_dir = cfg.name, cfg.data_dir
  builder = BUILDERS[name](data_dir=os.path.expanduser(data_dir) or None,
                           file_format="array_record")
  builder.download_and_prepare()
  source = builder.as_data_source(split="train")
  examples = source.__getitems__(list(range(len(source))))
  order = np.argsort([e["id"] for e in examples])
  images = np.stack([examples[i]["image"] for i in order]).astype(np.float32)
  labels = np.array([examples[i]["label"] for i in order], np.int32)
  return LabeledImages(ArrayImages(images), labels[:, None],
                       (tasks.Head("class", tuple(builder.info.features["label"].names)),))


# Image domains for teachers "optimized for different datasets": each maps a batch
# [N, H, W, C] of images in [0, 1] to its copy in that domain.
def _shuffled(images: np.ndarray) -> np.ndarray:
  """Pixels moved by one fixed permutation: every image keeps its intensities."""
  n, h, w, c = images.shape
  order = np.random.default_rng(0).permutation(h * w)
  return images.reshape(n, h * w, c)[:, order].reshape(n, h, w, c)


DOMAINS = {
    "original": lambda x: x,
    "inverted": lambda x: 1.0 - x,
    "rotated": lambda x: np.rot90(x, 1, axes=(1, 2)),
    "flipped": lambda x: x[:, :, ::-1],
    "shuffled": _shuffled,
}


def in_domain(images: np.ndarray, domain: str) -> np.ndarray:
  if domain not in DOMAINS:
    raise ValueError(f"Unknown image domain {domain!r}: use one of {sorted(DOMAINS)}.")
  return np.ascontiguousarray(DOMAINS[domain](images))


def assign_domains(count: int, domains, seed: int) -> np.ndarray:
  """Each of `count` images' domain (an index into `domains`), drawn uniformly with
  the seed: [N]."""
  return stream_rng(seed, "domains").integers(len(domains), size=count)


def in_domains(images: np.ndarray, assigned: np.ndarray, domains) -> np.ndarray:
  """Each image of a batch [B, ...] in its own domain (`assigned` [B] indices); the
  batch itself when every image is in the 'original' domain."""
  moved = [(d, domain) for d, domain in enumerate(domains)
           if domain != "original" and np.any(assigned == d)]
  mixed = images.copy() if moved else images
  for d, domain in moved:
    mixed[assigned == d] = in_domain(images[assigned == d], domain)
  return mixed


def stream_rng(seed: int, stream: str, *counters: int) -> np.random.Generator:
  """A NumPy generator determined by the seed, a stream name and counters."""
  return np.random.default_rng([seed, zlib.crc32(stream.encode()), *counters])


def stream_key(seed: int, impl: str, stream: str):
  """The JAX PRNG key of a named stream (a stage's initial weights), from the seed."""
  return jax.random.fold_in(jax.random.key(seed, impl=impl), zlib.crc32(stream.encode()))


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int):
  """Seeded split keeping each class's share: (train indices, test indices), sorted.
  labels [N], or [N, heads] (stratified by the first head)."""
  labels = np.asarray(labels).reshape(len(labels), -1)[:, 0]
  rng = stream_rng(seed, "split")
  test = []
  for label in np.unique(labels):
    members = rng.permutation(np.flatnonzero(labels == label))
    test.append(members[:int(round(test_fraction * len(members)))])
  test = np.sort(np.concatenate(test))
  return np.setdiff1d(np.arange(len(labels)), test), test


def batch_indices(num_items: int, batch_size: int, seed: int, stream: str,
                  step: int) -> np.ndarray:
  """Indices [batch_size] of batch `step` of a stream of reshuffled epochs.

  Each epoch is a fresh permutation; its last partial batch is dropped, so every
  batch has the same shape (one compiled program) and every item is seen about
  equally often over training.
  """
  if num_items < batch_size:
    raise ValueError(f"Stream {stream!r} has {num_items} items, fewer than one batch "
                     f"of {batch_size}: lower the batch size.")
  per_epoch = num_items // batch_size
  epoch, position = divmod(step, per_epoch)
  order = stream_rng(seed, stream, epoch).permutation(num_items)
  return order[position * batch_size:(position + 1) * batch_size]

