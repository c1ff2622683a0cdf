"""Writing run files so that a kill at any moment leaves the old content or the new."""
import os
from pathlib import Path

__all__ = ["write_atomic"]


def write_atomic(path: Path, text: str):
  """Writes `text` to a temporary file beside `path`, then renames it over `path`."""
  path = Path(path)
  temporary = path.with_name(f".{path.name}.tmp")
  temporary.write_text(text)
  os.replace(temporary, path)
