"""What the door of an image folder costs (`kamal_jax.data.folder.load` lists the
files and checks each one's header before training), against decoding every image.

  python benchmarks/folder_check.py [--images=200000] [--size=28] [--rounds=3] [--record]

It writes `images` grey size x size PNG files (1,000 distinct noise images, repeated)
into 10 class folders of a temporary directory, then times on the warm page cache,
median of `rounds`, the rows alternating (wall-clock, and the CPU time of all the
process's threads, less disturbed by other work on the machine):
  before                 the door as it was, copied here: rglob and sorted Paths per
                         class, then PIL's header of each file, in order;
  folder.load            the door now: os.scandir, then the header and the pixel
                         limit (`images.open_image`) of each file, in order; and
                         those checks alone, without the listing;
  headers in THREADS     the same checks spread over `images.THREADS`, the door it
                         could be (PIL parses headers in Python: the threads take
                         turns at the GIL);
  full decode            `images.decode` of every file, in order and in THREADS, the
                         door that would also catch a truncated file.
"""
import io
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL
from absl import app, flags
from PIL import Image

from kamal_jax import report
from kamal_jax.data import folder, images

FLAGS = flags.FLAGS
flags.DEFINE_integer("images", 200_000, "How many image files the folder holds.")
flags.DEFINE_integer("size", 28, "Their width and height.")
flags.DEFINE_integer("rounds", 3, "Timed rounds per row (the median is shown).")
flags.DEFINE_bool("record", False, "Also write the table into benchmarks/RESULTS.md.")


def _write(root: Path, count: int, size: int):
  rng = np.random.default_rng(0)
  encoded = []
  for _ in range(min(count, 1000)):
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size), np.uint8)).save(buffer, "PNG")
    encoded.append(buffer.getvalue())
  for label in range(10):
    (root / f"class{label}").mkdir(parents=True)
  for i in range(count):
    (root / f"class{i % 10}" / f"{i:07d}.png").write_bytes(encoded[i % len(encoded)])


def _before(root: Path) -> list[Path]:
  """folder.load's listing and header check before this benchmark was written."""
  files = []
  for directory in sorted(d for d in root.iterdir() if d.is_dir()):
    found = sorted(f for f in directory.rglob("*") if not f.name.startswith(".")
                   and f.is_file())
    for f in found:
      with Image.open(f) as image:
        image.size  # pylint: disable=pointless-statement
    files.extend(found)
  return files


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as scratch:
    root = Path(scratch) / "images"
    start = time.perf_counter()
    _write(root, FLAGS.images, FLAGS.size)
    print(f"wrote {FLAGS.images} files in {time.perf_counter() - start:.1f} s", flush=True)
    files, _, _ = folder.load(str(root))
    decode = lambda f: images.decode(f, 1)
    runs = {
        "before: rglob, PIL's header, in order": lambda: _before(root),
        "folder.load: scandir, header and pixel limit, in order":
            lambda: folder.load(str(root)),
        "header and pixel limit, in order, without the listing":
            lambda: [folder.check_readable(f) for f in files],
        "header and pixel limit in images.THREADS":
            lambda: list(images.THREADS.map(folder.check_readable, files)),
        "full decode, in order": lambda: [decode(f) for f in files],
        "full decode in images.THREADS": lambda: list(images.THREADS.map(decode, files)),
    }
    times = {name: [] for name in runs}
    for _ in range(FLAGS.rounds):
      for name, run in runs.items():
        start, cpu = time.perf_counter(), time.process_time()
        run()
        times[name].append((time.perf_counter() - start, time.process_time() - cpu))
        print(f"{name}: {times[name][-1][0]:.2f} s, {times[name][-1][1]:.2f} s of CPU",
              flush=True)
  rows = []
  for name, measured in times.items():
    seconds, cpu = (statistics.median(column) for column in zip(*measured))
    rows.append([name, f"{len(files):,}", f"{seconds:.2f}", f"{1e6 * seconds / len(files):.1f}",
                 f"{1e6 * cpu / len(files):.1f}"])
  table = report.table(["door", "images", "seconds", "us per image", "CPU us per image"], rows)
  text = (f"### The image folder's door\n\n{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU "
          f"cores (images.THREADS: as many threads), Python {platform.python_version()}, "
          f"Pillow {PIL.__version__}\n\n`python benchmarks/folder_check.py --images={FLAGS.images} "
          f"--size={FLAGS.size} --rounds={FLAGS.rounds}`: {FLAGS.size}x{FLAGS.size} grey PNG "
          f"files in 10 class folders, warm page cache, median of {FLAGS.rounds} rounds."
          f"\n\n{table}")
  if FLAGS.record:
    import side_by_side as sbs  # pylint: disable=g-import-not-at-top (torch, only to record)
    sbs.publish("folder_check", text, record=True)
  else:
    print("\n" + text)


if __name__ == "__main__":
  app.run(main)
