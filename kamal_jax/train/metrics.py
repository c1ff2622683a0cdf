"""The metric log: every stage's metric means per logged step, to TensorBoard event
files and to metrics.jsonl (which the report's plots read)."""
import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from kamal_jax import files, parallel
from kamal_jax.train.tensorboard import EventFile

__all__ = ["MetricLog"]


def _kept(line: str, stage: str, step: int) -> bool:
  """Whether a metrics.jsonl line stays when `stage` resumes at `step` (a line cut
  short by a kill never does)."""
  try:
    record = json.loads(line)
  except json.JSONDecodeError:
    return False
  return record["stage"] != stage or record["step"] <= step


class MetricLog:
  """Metric means per stage and step, to TensorBoard event files and to
  metrics.jsonl, which the report's plots read.

  A vector metric ([K], one entry per teacher or component) is written per entry,
  under the names `labels[its name]`.
  """

  def __init__(self, workdir: Path):
    self.primary = parallel.primary()  # the only process that writes
    self.path = workdir / "metrics.jsonl"
    with files.writing(workdir / "tensorboard"):
      self.tensorboard = EventFile(workdir / "tensorboard") if self.primary else None

  def resume(self, stage: str, step: int):
    """Drops the stage's records after `step` (logged by a run killed before its next
    checkpoint), which the resumed run logs again."""
    if not self.primary or not self.path.exists():
      return
    lines = self.path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if _kept(line, stage, step)]
    if len(kept) < len(lines):
      files.write_atomic(self.path, "".join(kept))

  def write(self, stage: str, step: int, means: dict, labels: Mapping[str, Sequence[str]]):
    if not self.primary:
      return
    record = {"stage": stage, "step": step}
    with files.writing(self.path.parent / "tensorboard"):
      for key, value in means.items():
        if np.ndim(value) == 0:
          record[key] = float(value)
          self.tensorboard.add_scalar(f"{stage}/{key}", record[key], step)
        else:
          record[key] = dict(zip(labels[key], map(float, value)))
          for label, v in record[key].items():
            self.tensorboard.add_scalar(f"{stage}/{key}/{label}", v, step)
      self.tensorboard.flush()
    with files.writing(self.path), self.path.open("a") as f:
      f.write(json.dumps(record) + "\n")

  def close(self):
    if self.primary:
      with files.writing(self.path.parent / "tensorboard"):
        self.tensorboard.close()
