"""The run's files: written so that a kill at any moment leaves the old content or the
new, reported in one line when the file system refuses a write, and guarded by a lock
so that one run at a time writes a workdir."""
import contextlib
import datetime
import fcntl
import os
import re
import socket
import sys
from pathlib import Path

__all__ = ["holder", "LOCK", "lock_workdir", "WorkdirBusy", "write_atomic", "WriteError",
           "writing"]


class WriteError(Exception):
  """A run file the file system would not write (full disk, quota, read-only, I/O
  error): its path and the system's reason, for one line."""


def _system_reason(error: BaseException | None) -> str | None:
  """The operating system's reason for `error` or for any error behind it: an
  OSError's strerror, or the code tensorstore (orbax's writer) puts in its messages
  (`... [os_error_code='28']`); None when no system call failed."""
  while error is not None:
    if isinstance(error, OSError) and error.errno:
      return error.strerror
    code = re.search(r"os_error_code='?(\d+)", str(error))
    if code:
      return os.strerror(int(code.group(1)))
    error = error.__cause__ or error.__context__
  return None


@contextlib.contextmanager
def writing(path: Path):
  """Raises a failed system call inside as a WriteError naming `path` (what the run
  was writing) and the system's reason; other errors pass as they are. An error
  raised while a WriteError was on its way is that failure seen again (orbax raises
  a failed save once more when its manager closes): the first one is raised."""
  try:
    yield
  except WriteError:
    raise
  except Exception as error:  # orbax wraps tensorstore's errors in ValueError
    reason = _system_reason(error)
    if reason is None:
      raise
    earlier = error.__context__
    while earlier is not None and not isinstance(earlier, WriteError):
      earlier = earlier.__context__
    raise (earlier or WriteError(f"{path}: {reason}")) from error


def write_atomic(path: Path, text: str):
  """Writes `text` to a temporary file beside `path`, then renames it over `path`."""
  path = Path(path)
  temporary = path.with_name(f".{path.name}.tmp")
  with writing(path):
    temporary.write_text(text)
    os.replace(temporary, path)


LOCK = ".kamal_jax.lock"  # in the workdir: who runs in it, under an flock while it does


class WorkdirBusy(Exception):
  """Another run holds the workdir's lock."""


def _record(file) -> str:
  """The holder's record in an open lock file."""
  file.seek(0)
  return file.read().strip() or "another process"


def holder(workdir: Path) -> str | None:
  """Who holds `workdir`'s lock now (its record), or None; writes nothing. The
  kernel drops an flock with its process, so a record left by a killed run reads as
  free."""
  try:
    file = (Path(workdir) / LOCK).open("r")
  except OSError:
    return None
  with file:
    try:
      fcntl.flock(file, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
      return _record(file)
  return None


def lock_workdir(workdir: Path):
  """`workdir`'s lock, held until the returned file is closed (or the process ends),
  with this process's record in it; WorkdirBusy while another run holds it."""
  path = Path(workdir) / LOCK
  with writing(path):
    file = path.open("a+")
  try:
    fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    record = _record(file)
    file.close()
    raise WorkdirBusy(record) from None
  since = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
  with writing(path):
    file.truncate(0)
    file.write(f"pid {os.getpid()} on {socket.gethostname()} since {since} "
               f"({' '.join(sys.argv)})\n")
    file.flush()
  return file
