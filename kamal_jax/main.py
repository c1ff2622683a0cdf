"""kamal-jax: the command line.

  kamal-jax --config=configs/digits.py --workdir=runs/digits [--stage=stage1]
            [--config.seed=1 ...]
"""
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (get_config()).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and the report.")
flags.DEFINE_enum("stage", "all", ["all", "teachers", "stage1", "stage2", "evaluate"],
                  "Run one stage (the earlier ones must have finished) or all.")
flags.DEFINE_string("compilation_cache", "~/.cache/kamal_jax/jax",
                    "JAX persistent compilation cache directory; '' turns it off.")
flags.DEFINE_bool("debug", False, "Show the traceback of an error.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  from kamal_jax import pipeline, report, train  # after flag parsing: fast --help
  logging.set_verbosity(logging.WARNING)
  if FLAGS.compilation_cache:
    pipeline.enable_compilation_cache(FLAGS.compilation_cache)
  stages = pipeline.STAGES if FLAGS.stage == "all" else (FLAGS.stage,)
  try:
    result = pipeline.train_and_evaluate(FLAGS.config, FLAGS.workdir, stages)
  except (ValueError, pipeline.StageNotReadyError, train.NonFiniteLossError) as error:
    if FLAGS.debug:
      raise
    print(f"kamal-jax: error: {error}", file=sys.stderr)
    sys.exit(2)
  if result is not None:
    print(report.summary(result))
    print(f"\nReport: {os.path.join(FLAGS.workdir, 'report.md')}")


def run():
  app.run(main)


if __name__ == "__main__":
  run()
