"""kamal-jax: the command line.

  kamal-jax --config=configs/digits.py --workdir=runs/digits [--stage=stage1]
            [--config.seed=1 ...] [--start_fresh] [--debug] [--distributed ...]
  kamal-jax export --workdir=W [--out=DIR] [--network=student|components|teachers]
  kamal-jax predict --model=DIR IMAGES_OR_FOLDERS... [--out=predictions.csv]
            [--batch_size=256] [--skip_unreadable]

A finished run exports its student into WORKDIR/export/student by itself; `export`
writes any of its networks again (`kamal_jax.export`), `predict` runs an exported
network on image files (`kamal_jax.predict`).

Exit status: 0 when the stages ran; 2 on bad input (config, data, teachers,
workdir, a workdir another run holds), a stage that cannot go on (non-finite loss,
earlier stage missing) or a file the file system would not write (full disk), with
one line on stderr that names the problem and the fix; 130 on SIGINT and 143 on
SIGTERM, with one line that says where the run stopped (`kamal_jax.interrupts`).
`--debug` shows the traceback instead. Nothing in the workdir is touched before the
input has passed its checks; the rerun of a stopped run goes on from its last good
checkpoint.
"""
import logging as python_logging
import os
import re
import sys
from pathlib import Path

from absl import flags, logging
from ml_collections import config_flags

from kamal_jax import files, interrupts

__all__ = ["BadInput", "cli", "COMMANDS", "HELP", "run"]

HELP = ("-h", "--help", "--helpshort", "--helpfull")


def _define_debug(values: flags.FlagValues):
  flags.DEFINE_bool("debug", False, "Show the traceback of an error.", flag_values=values)


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
  _define_debug(values)
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
  """A one-line message for an override of a field the config does not have, at any
  depth (ml_collections raises AttributeError or KeyError, naming the missing key and
  perhaps the field it resembles)."""
  text = str(error)
  field = re.search(r"\w+", text).group()
  named = [a.split("=")[0] for a in argv
           if a.startswith("--config.") and field in a.split("=")[0].split(".")[1:]]
  where = named[0] if named else f"--config...{field}"
  similar = re.search(r'Did you mean "(\w+)"', text)
  fix = (f"did you mean {similar.group(1)!r}?" if similar
         else "check the name against the config file.")
  return f"{where}: the config has no field {field!r}: {fix}"


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
  except (AttributeError, KeyError) as error:  # ml_collections: an unknown field
    raise BadInput(_override_error(argv, error)) from error
  except flags.Error as error:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if "Traceback" in str(error):  # the config file's get_config() raised
      raise BadInput(f"--config: {lines[-1]}") from error
    raise BadInput(f"{' '.join(lines)}: fix the flag (see --helpshort).") from error
  return values


def _not_from_orbax_thread(record: python_logging.LogRecord) -> bool:
  """A log filter that drops the errors orbax logs, with their tracebacks, from the
  thread where they happened: the same error reaches the main thread, which the
  command reports in one line."""
  return not (record.levelno >= python_logging.ERROR and
              f"{os.sep}orbax{os.sep}" in record.pathname)


def _quiet_late_storage_callbacks(excepthook):
  """sys.excepthook, but for the error a storage thread's late callback raises into
  the event loop of a checkpoint write that already failed and closed it ('Event loop
  is closed'): printed bare from that thread, after the write's own error, which the
  command reports in one line."""
  def hook(kind, error, traceback):
    if not (kind is RuntimeError and str(error) == "Event loop is closed"):
      excepthook(kind, error, traceback)
  return hook


def _run(values: flags.FlagValues) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  if values.distributed:  # before anything asks JAX for its devices
    jax.distributed.initialize(values.coordinator_address, values.num_processes,
                               values.process_id)
  from kamal_jax import door, pipeline, report, train  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  if not values.debug:
    python_logging.getLogger("absl").addFilter(_not_from_orbax_thread)
    sys.excepthook = _quiet_late_storage_callbacks(sys.excepthook)
  if values.compilation_cache:
    pipeline.enable_compilation_cache(values.compilation_cache)
  stages = pipeline.STAGES if values.stage == "all" else (values.stage,)
  try:
    workdir = door.workdir_for(values.config, Path(values.workdir), values.start_fresh)
    result = pipeline.train_and_evaluate(values.config, workdir, stages)
  except (ValueError, pipeline.StageNotReadyError, train.NonFiniteLossError) as error:
    raise BadInput(str(error)) from error
  if result is not None and jax.process_index() == 0:
    print(report.summary(result))
    print(f"\nReport: {workdir / 'report.md'}")
    if (workdir / "export" / "student").is_dir():
      print(f"Student: {workdir / 'export' / 'student'} "
            f"(kamal-jax predict --model={workdir / 'export' / 'student'} IMAGES...)")


def _export_flags() -> flags.FlagValues:
  from kamal_jax import pipeline  # pylint: disable=g-import-not-at-top
  values = flags.FlagValues()
  flags.DEFINE_string("workdir", None, "The workdir of a finished run.", flag_values=values)
  flags.DEFINE_string("out", None, "Where the model folders go (default WORKDIR/export).",
                      flag_values=values)
  flags.DEFINE_enum("network", "student", pipeline.NETWORKS, "Which networks to export.",
                    flag_values=values)
  _define_debug(values)
  return values


def _export(values: flags.FlagValues, arguments: list[str]) -> None:
  from kamal_jax import pipeline  # pylint: disable=g-import-not-at-top
  if arguments:
    raise BadInput(f"unexpected arguments {arguments}: export takes flags only (see --help).")
  if not values.workdir:
    raise BadInput("--workdir is required: give the workdir of a finished run.")
  logging.set_verbosity(logging.WARNING)
  try:
    folders = pipeline.export_workdir(Path(values.workdir), values.network, values.out)
  except (ValueError, pipeline.StageNotReadyError) as error:
    raise BadInput(str(error)) from error
  for folder in folders:
    sizes = ", ".join(f"{f.name} {f.stat().st_size / 2**20:.1f} MiB"
                      for f in sorted(folder.iterdir()))
    print(f"{folder}: {sizes}")


def _predict_flags() -> flags.FlagValues:
  values = flags.FlagValues()
  flags.DEFINE_string("model", None, "A model folder written by `kamal-jax export`.",
                      flag_values=values)
  flags.DEFINE_string("out", "predictions.csv", "The CSV to write.", flag_values=values)
  flags.DEFINE_integer("batch_size", 256, "Images per forward.", lower_bound=1,
                       flag_values=values)
  flags.DEFINE_bool("skip_unreadable", False,
                    "List an unreadable image as skipped, with its reason, instead of "
                    "stopping at it.", flag_values=values)
  _define_debug(values)
  return values


def _predict(values: flags.FlagValues, paths: list[str]) -> None:
  from kamal_jax import predict  # pylint: disable=g-import-not-at-top
  if not values.model:
    raise BadInput("--model is required: give a folder written by `kamal-jax export`.")
  if not paths:
    raise BadInput("no images given: name image files or folders after the flags.")
  try:
    model = predict.load(values.model)
    files = predict.image_files(paths)
    count, seconds = predict.write_csv(
        model, files, Path(values.out), values.batch_size, values.skip_unreadable)
  except ValueError as error:
    raise BadInput(str(error)) from error
  print(f"{count} images in {seconds:.1f} s ({count / max(seconds, 1e-9):,.1f} images/s) "
        f"-> {values.out}")


COMMANDS = {"export": (_export_flags, _export), "predict": (_predict_flags, _predict)}


def _subcommand(name: str, argv: list[str]) -> None:
  """COMMANDS[name]: its own flags parsed from argv, then run with them and the
  positional arguments."""
  make_flags, run = COMMANDS[name]
  values = make_flags()
  try:
    arguments = values(argv)[1:]
  except flags.Error as error:
    raise BadInput(f"{' '.join(str(error).split())}: fix the flag (see --help).") from error
  run(values, arguments)


def cli(argv: list[str]) -> int:
  """Runs the command on argv (argv[0] is the program; argv[1] may name a
  subcommand, COMMANDS) and returns its exit status."""
  name = argv[1] if len(argv) > 1 and argv[1] in COMMANDS else None
  argv = [f"{argv[0]} {name}"] + argv[2:] if name else argv
  if any(a in HELP for a in argv[1:]):
    values = COMMANDS[name][0]() if name else _flags(argv)
    print(__doc__ + "\n" + values.get_help())
    return 0
  try:
    with interrupts.handled():
      if name:
        _subcommand(name, argv)
      else:
        _run(_parse(argv))
  except (BadInput, files.WriteError) as error:
    if "--debug" in argv:
      raise
    fix = ("" if isinstance(error, BadInput) else
           ": free space or fix the file system, then run the same command again")
    print(f"kamal-jax: error: {' '.join(str(error).split())}{fix}", file=sys.stderr)
    return 2
  except interrupts.Interrupted as stop:
    if "--debug" in argv:
      raise
    where = f" {stop.where}" if stop.where else ""
    resume = "" if name else ": run the same command again to resume"
    print(f"kamal-jax: stopped by {stop.signal_name}{where}{resume}.", file=sys.stderr)
    return stop.exit_status
  return 0


def run():
  sys.exit(cli(sys.argv))


if __name__ == "__main__":
  run()
