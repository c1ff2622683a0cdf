"""kamal-jax: the command line.

  kamal-jax --config=configs/digits.py --workdir=runs/digits [--stage=stage1]
            [--config.seed=1 ...] [--start_fresh] [--debug] [--distributed ...]

Exit status: 0 when the stages ran; 2 on bad input (config, data, teachers,
workdir) or a stage that cannot go on (non-finite loss, earlier stage missing), with
one line on stderr that names the problem and the fix; `--debug` shows the
traceback instead. Nothing in the workdir is touched before the input has passed
its checks.
"""
import os
import sys
from pathlib import Path

from absl import flags, logging
from ml_collections import config_flags

HELP = ("-h", "--help", "--helpshort", "--helpfull")


def _flags(argv: list[str]) -> flags.FlagValues:
  """The command's flags, on their own FlagValues: `cli` can run many times in one
  process (the tests do), each time parsing its own argv."""
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "Config file (get_config()).",
                                  flag_values=values, lock_config=True, sys_argv=argv)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and the report.",
                      flag_values=values)
  flags.DEFINE_enum("stage", "all", ["all", "teachers", "stage1", "stage2", "evaluate"],
                    "Run one stage (the earlier ones must have finished) or all.",
                    flag_values=values)
  flags.DEFINE_string("compilation_cache", "~/.cache/kamal_jax/jax",
                      "JAX persistent compilation cache directory; '' turns it off.",
                      flag_values=values)
  flags.DEFINE_bool("start_fresh", False,
                    "If --workdir was started with a config that gives other results, "
                    "start anew in the first free WORKDIR-N beside it (WORKDIR stays "
                    "as it is) instead of refusing.", flag_values=values)
  flags.DEFINE_bool("debug", False, "Show the traceback of an error.", flag_values=values)
  flags.DEFINE_bool("distributed", False,
                    "Join a multi-process run (jax.distributed.initialize): found by "
                    "itself on SLURM, Open MPI and Cloud TPU; elsewhere give the three "
                    "flags below. Each process reads its own rows of every batch; "
                    "process 0 writes the report and logs.", flag_values=values)
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0.",
                      flag_values=values)
  flags.DEFINE_integer("num_processes", None, "Number of processes.", flag_values=values)
  flags.DEFINE_integer("process_id", None, "This process's index, 0 to num_processes-1.",
                       flag_values=values)
  return values


class BadInput(Exception):
  """An error to report in one line, with exit status 2."""


def _override_error(argv: list[str], error: Exception) -> str:
  """A one-line message for an override of a field the config does not have."""
  field = str(error).strip("\"'")
  named = [a.split("=")[0] for a in argv
           if a.startswith("--config.") and a.split("=")[0].split(".")[-1] == field]
  where = named[0] if named else f"--config...{field}"
  return f"{where}: the config has no field {field!r}: check the name against the config file."


def _parse(argv: list[str]) -> flags.FlagValues:
  values = _flags(argv)
  try:
    values(argv)
    for name in ("config", "workdir"):
      if not values[name].value:
        raise BadInput(f"--{name} is required: give --config=FILE.py and --workdir=DIR.")
    path = config_flags.get_config_filename(values["config"]).split(":", 1)[0]
    if not os.path.isfile(path):
      raise BadInput(f"--config={path}: no such file: give the path of a config file "
                     "with get_config() (e.g. configs/digits.py).")
    values.config  # pylint: disable=pointless-statement  # loads the file and overrides
  except AttributeError as error:  # ml_collections: an override of an unknown field
    raise BadInput(_override_error(argv, error)) from error
  except flags.Error as error:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if "Traceback" in str(error):  # the config file's get_config() raised
      raise BadInput(f"--config: {lines[-1]}") from error
    raise BadInput(f"{' '.join(lines)}: fix the flag (see --helpshort).") from error
  return values


def _run(values: flags.FlagValues) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  if values.distributed:  # before anything asks JAX for its devices
    jax.distributed.initialize(values.coordinator_address, values.num_processes,
                               values.process_id)
  from kamal_jax import pipeline, report, train  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  if values.compilation_cache:
    pipeline.enable_compilation_cache(values.compilation_cache)
  stages = pipeline.STAGES if values.stage == "all" else (values.stage,)
  try:
    workdir = pipeline.workdir_for(values.config, Path(values.workdir), values.start_fresh)
    result = pipeline.train_and_evaluate(values.config, workdir, stages)
  except (ValueError, pipeline.StageNotReadyError, train.NonFiniteLossError) as error:
    raise BadInput(str(error)) from error
  if result is not None and jax.process_index() == 0:
    print(report.summary(result))
    print(f"\nReport: {workdir / 'report.md'}")


def cli(argv: list[str]) -> int:
  """Runs the command on argv (argv[0] is the program) and returns its exit status."""
  if any(a in HELP for a in argv[1:]):
    print(__doc__ + "\n" + _flags(argv).get_help())
    return 0
  debug = "--debug" in argv
  try:
    _run(_parse(argv))
  except BadInput as error:
    if debug:
      raise
    print(f"kamal-jax: error: {' '.join(str(error).split())}", file=sys.stderr)
    return 2
  return 0


def run():
  sys.exit(cli(sys.argv))


if __name__ == "__main__":
  run()
