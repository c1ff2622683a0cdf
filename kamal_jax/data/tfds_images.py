"""Image datasets of the tfds catalogue, read without TensorFlow.

Records come through `tfds.data_source` (array_record files) with the image left
encoded, and are decoded per batch by `images.EncodedImages`. Several datasets
can be read as one (the class setup trains source nets on a main and an auxiliary
dataset): each contributes its own label heads, and an image has labels only in its
own dataset's heads (-1 elsewhere, see `tasks.label_positions`):
  a 'label' feature     one head named by the dataset, classes 'DATASET:NAME';
  an 'attributes' dict  one 2-way head per attribute, classes 'ATTR:0', 'ATTR:1'.
The datasets' own train and test splits are kept ('test' marks the test images).
"""
import os

import numpy as np
import tensorflow_datasets as tfds

from kamal_jax import tasks
from kamal_jax.data.images import EncodedImages, View

__all__ = ["builder", "heads", "load", "SPLITS"]

SPLITS = ("train", "test")


def builder(name: str, data_dir: str = ""):
  try:
    return tfds.builder(name, data_dir=os.path.expanduser(data_dir) or None,
                        file_format="array_record")
  except tfds.core.registered.DatasetNotFoundError as error:
    raise ValueError(f"Unknown tfds dataset {name!r}: use a name of the tfds catalogue, "
                     "or an image folder (configs/folder.py).") from error


def heads(name: str, features) -> tuple[tasks.Head, ...]:
  """The label heads a dataset's features give (see the module docstring)."""
  if "label" in features:
    label = features["label"]
    return (tasks.Head(name, tuple(f"{name}:{c}" for c in label.names)),)
  if "attributes" in features:
    return tuple(tasks.attribute_head(a) for a in features["attributes"].keys())
  raise ValueError(f"tfds dataset {name!r} has neither a 'label' nor an 'attributes' "
                   "feature: it cannot give class or attribute labels.")


def _labels(example, dataset_heads) -> list[int]:
  if "label" in example:
    return [int(example["label"])]
  return [int(bool(example["attributes"][h.name])) for h in dataset_heads]


def _read_labels(source, dataset_heads, chunk: int = 1024) -> np.ndarray:
  """[N, heads]: every record's labels, read a chunk of records per call."""
  rows = []
  for start in range(0, len(source), chunk):
    examples = source.__getitems__(list(range(start, min(start + chunk, len(source)))))
    rows.extend(_labels(example, dataset_heads) for example in examples)
  return np.array(rows, np.int32).reshape(len(source), len(dataset_heads))


def _image(record) -> bytes:
  source, index = record
  return source[index]["image"]


def load(names, data_dir: str, view: View, channels: int):
  """(EncodedImages, labels [N, heads], heads, test [N]) of the datasets together.
  Images stay on disk: a record is (data source, index), read when a batch needs it."""
  records, blocks, all_heads, test = [], [], [], []
  for name in names:
    dataset = builder(name, data_dir)
    dataset.download_and_prepare()
    dataset_heads = heads(name, dataset.info.features)
    for split in SPLITS:
      source = dataset.as_data_source(split=split,
                                      decoders={"image": tfds.decode.SkipDecoding()})
      blocks.append((len(all_heads), _read_labels(source, dataset_heads)))
      records.extend((source, i) for i in range(len(source)))
      test.append(np.full(len(source), split == "test"))
    all_heads.extend(dataset_heads)
  labels = np.full((len(records), len(all_heads)), -1, np.int32)
  start = 0
  for column, block in blocks:  # each dataset's labels in its own heads' columns
    labels[start:start + len(block), column:column + block.shape[1]] = block
    start += len(block)
  return (EncodedImages(records, view, channels, load=_image), labels, tuple(all_heads),
          np.concatenate(test))
