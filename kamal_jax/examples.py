"""The images a stage learns from, as a value its factory takes: which images, how to
read them, and their labels where the stage may use them."""
import dataclasses
from typing import Callable

import numpy as np

from kamal_jax import data, parallel

__all__ = ["Examples"]


@dataclasses.dataclass(frozen=True)
class Examples:
  """indices: [N] the images' positions in the dataset.
  read: (indices, stream, step) -> images [n, S, S, C] as the networks see them,
    augmented by (seed, stream, step) where `augments`; stream None: the evaluation
    view, never augmented.
  augments: whether a training stream shows an image differently from step to step.
  labels: [N, H] each image's position in each of H heads or parts, -1 for none:
    the targets of a stage trained from labels, or what the oracle rule reads.
  """
  indices: np.ndarray
  read: Callable[[np.ndarray, str | None, int], np.ndarray]
  augments: bool
  labels: np.ndarray | None = None

  def rows(self, batch_size: int, seed: int, stream: str, step: int) -> np.ndarray:
    """This process's positions (into `indices`) of the step's global batch."""
    return parallel.local_rows(data.batch_indices(len(self.indices), batch_size, seed,
                                                  stream, step))

  def example(self) -> np.ndarray:
    """One image [1, S, S, C], to trace a network's shapes."""
    return self.read(self.indices[:1], None, 0)
