"""Images per second of an exported student, beside the report's own evaluation.

  python benchmarks/predict_throughput.py --workdir=runs/digits [--copies=5] [--rounds=3]

On a finished run (its WORKDIR/export/student), over the run's test images repeated
`copies` times, each timed warm (after one untimed pass), median of `rounds`:
  evaluate.predict     the report's path: arrays in memory, data-parallel over the
                       local devices, eval_batch_size per batch;
  Model.logits         `kamal_jax.load`'s network on the same arrays, one device;
  kamal-jax predict    the command's work: PNG files decoded, cut, predicted, CSV.
"""
import json
import statistics
import tempfile
import time
from pathlib import Path

import ml_collections
import numpy as np
from absl import app, flags, logging

import kamal_jax
from kamal_jax import evaluate, pipeline, predict
from kamal_jax.data import folder

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A finished run's workdir.")
flags.DEFINE_integer("copies", 5, "How many times the test images are repeated.")
flags.DEFINE_integer("rounds", 3, "Timed rounds per row (the median is shown).")
flags.mark_flags_as_required(["workdir"])


def _median_seconds(fn) -> float:
  fn()  # compiles, warms the caches
  times = []
  for _ in range(FLAGS.rounds):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  workdir = Path(FLAGS.workdir)
  config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
  with pipeline.prepare(config, workdir, ()) as run:
    student = pipeline.restore_networks(run).student
  indices = np.tile(run.test_indices, FLAGS.copies)
  images = run.images(indices)
  model = kamal_jax.load(workdir / "export" / "student")
  rows = {
      "evaluate.predict": _median_seconds(lambda: evaluate.predict(
          student.module, student.variables, lambda at: images[at], len(images),
          config.eval_batch_size)),
      "Model.logits": _median_seconds(lambda: model.logits(images)),
  }
  with tempfile.TemporaryDirectory() as scratch:
    folder.write(images, run.dataset.labels[indices, 0], run.dataset.heads[0].classes,
                 f"{scratch}/images")
    files = predict.image_files([f"{scratch}/images"])
    rows["kamal-jax predict"] = _median_seconds(lambda: predict.write_csv(
        model, files, Path(scratch) / "predictions.csv", batch_size=256))
  print(f"{len(images)} images of {images.shape[1:]}; median of {FLAGS.rounds} warm rounds\n")
  print("| path | seconds | images/s | vs evaluate.predict |")
  print("|---|---|---|---|")
  base = rows["evaluate.predict"]
  for name, seconds in rows.items():
    print(f"| {name} | {seconds:.3f} | {len(images) / seconds:,.0f} | {base / seconds:.2f}x |")


if __name__ == "__main__":
  app.run(main)
