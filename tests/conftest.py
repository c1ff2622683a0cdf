"""Eight simulated CPU devices for every test, and a shared compilation cache.

XLA reads the device count once, when jax first starts, so this runs before any
test module imports jax.
"""
import errno
import os
import subprocess
from pathlib import Path

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"])
os.environ.setdefault("KAMAL_JAX_TEST_CACHE",
                      os.path.expanduser("~/.cache/kamal_jax/jax-tests"))

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ["KAMAL_JAX_TEST_CACHE"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """One tfds data directory for the session (the digits files are built once)."""
  return str(tmp_path_factory.mktemp("tfds"))



@pytest.fixture(scope="session")
def tiny(data_dir):
  """The shrunk digits default (tests/tiny_config.py)."""
  import tiny_config
  return tiny_config.get_config(data_dir)


@pytest.fixture(scope="session")
def finished(tiny, tmp_path_factory):
  """The shrunk default run to the end, uninterrupted: (workdir, report)."""
  from kamal_jax import pipeline  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp("run")
  return workdir, pipeline.train_and_evaluate(tiny, str(workdir))


@pytest.fixture
def small_disk(tmp_path):
  """A directory on a 64 MiB file system of its own (a tmpfs: mounting one needs
  root), or None where none can be mounted."""
  disk = tmp_path / "disk"
  disk.mkdir()
  try:
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)],
                             capture_output=True).returncode == 0
  except OSError:  # no mount command
    mounted = False
  yield disk if mounted else None
  if mounted:
    subprocess.run(["umount", "--lazy", str(disk)], check=True)


def fill(disk: Path) -> Path:
  """Fills the file system of `disk` to its last byte with one file (returned: delete
  it to free the space)."""
  ballast = disk / "ballast"
  descriptor = os.open(ballast, os.O_WRONLY | os.O_CREAT)
  try:
    for size in (1 << 20, 1 << 12, 1):
      try:
        while True:
          os.write(descriptor, bytes(size))
      except OSError as error:
        assert error.errno == errno.ENOSPC, error
  finally:
    os.close(descriptor)
  return ballast
