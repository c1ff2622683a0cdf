"""SIGINT and SIGTERM under the command line: the run ends with one line that says
where it stopped, never a traceback.

SIGINT (Ctrl-C) stops at once. SIGTERM is how clusters and preemptible machines
announce the end: during a stage's training loop it is held until the step running
finishes, so that the loop checkpoints that step first (`train.fit`) and the
resumed run loses no finished step; elsewhere it stops at once too, except while a
checkpoint is handed to orbax or sealed (`deferred`, a fraction of a second).

The handlers are the command line's (`handled`); a library caller keeps Python's
own (KeyboardInterrupt, and SIGTERM ending the process).
"""
import contextlib
import signal

__all__ = ["deferred", "handled", "Interrupted", "sigterm_held", "sigterm_received"]


class Interrupted(BaseException):
  """The run was stopped by a signal. A BaseException, as KeyboardInterrupt is, so
  that no `except Exception` on its way up mistakes it for an error.

  `where`: where it stopped, filled in on the way up by the code that knows (the
  training loop, the pipeline's stage)."""

  def __init__(self, signal_name: str, where: str = ""):
    super().__init__(signal_name, where)
    self.signal_name = signal_name
    self.where = where

  @property
  def exit_status(self) -> int:
    return 128 + signal.Signals[self.signal_name].value  # the shell's convention

  def located(self, where: str) -> "Interrupted":
    """This interrupt with `where` filled in, unless code nearer to it already did."""
    return self if self.where else Interrupted(self.signal_name, where)


_held = False  # inside `sigterm_held`
_received = False  # a SIGTERM came while held
_deferring = False  # inside `deferred`
_deferred = None  # the name of the first signal that came while deferring


def _handle(signum: int, frame):  # pylint: disable=unused-argument
  global _received, _deferred
  name = signal.Signals(signum).name
  if signum == signal.SIGTERM and _held:
    _received = True
  elif _deferring:
    _deferred = _deferred or name
  else:
    raise Interrupted(name)


@contextlib.contextmanager
def handled():
  """Inside, SIGINT and SIGTERM raise Interrupted (SIGTERM held in `sigterm_held`);
  the handlers before are restored after (the tests run the command line many times
  in one process). Main thread only, as Python's signal handlers are."""
  signals = (signal.SIGINT, signal.SIGTERM)
  before = [signal.signal(signum, _handle) for signum in signals]
  try:
    yield
  finally:
    for signum, handler in zip(signals, before):
      signal.signal(signum, handler)


@contextlib.contextmanager
def sigterm_held():
  """Inside, a SIGTERM is noted for `sigterm_received` instead of stopping the run;
  one the code inside did not act on stops the run as it leaves."""
  global _held, _received
  _held, _received = True, False
  try:
    yield
  finally:
    _held = False
  if _received:
    raise Interrupted("SIGTERM")


@contextlib.contextmanager
def deferred():
  """Inside, a signal that would stop the run stops it as the code inside leaves.

  For code that hands work to other threads: orbax builds a save's coroutines in
  the calling thread and runs them in its own, so a SIGINT raised in between left a
  coroutine never awaited (a RuntimeWarning after the run's one line) and a write
  half handed over."""
  global _deferring, _deferred
  if _deferring:  # nested: the outer one stops the run
    yield
    return
  _deferring, _deferred = True, None
  try:
    yield
  finally:
    _deferring = False
  if _deferred:
    raise Interrupted(_deferred)


def sigterm_received() -> bool:
  """Whether a SIGTERM came inside `sigterm_held` (then the loop stops after its step)."""
  return _received
