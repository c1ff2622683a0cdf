"""The embedded default: scikit-learn's bundled 8x8 digits as a tfds dataset.

No download: the 1,797 images ship with scikit-learn. They are written once as
array_record files (no TensorFlow needed; `features.Tensor` encodes with NumPy) and
read back through `tfds.data_source` like any other tfds dataset.
"""
import numpy as np
import tensorflow_datasets as tfds

__all__ = ["CLASS_NAMES", "Digits"]

CLASS_NAMES = tuple(str(d) for d in range(10))


class Digits(tfds.core.GeneratorBasedBuilder):
  """sklearn.datasets.load_digits: 8x8 grey images in [0, 1], labels 0-9."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "scikit-learn's load_digits, pixel values / 16."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="scikit-learn's bundled UCI handwritten digits (8x8).",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.float32),
            "label": tfds.features.ClassLabel(names=CLASS_NAMES),
            "id": tfds.features.Scalar(dtype=np.int64),
        }),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    from sklearn.datasets import load_digits  # only needed to build the files
    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
      yield i, {"image": (image[..., None] / 16.0).astype(np.float32),
                "label": int(label), "id": i}
