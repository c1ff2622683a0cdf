"""TensorBoard event files of scalars, written here: the TFRecord framing (length,
data, each with its masked CRC-32C) of Event protos, encoded by hand. The writers on
PyPI import TensorFlow or (tensorboardX, where it is installed) PyTorch, which cost
every run over a second; scalars need 60 lines."""
import socket
import struct
import time
from pathlib import Path

__all__ = ["crc32c", "EventFile", "scalar_event"]


def _crc32c_table() -> list[int]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    table.append(crc)
  return table


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli), the checksum of TFRecord framing."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _record(data: bytes) -> bytes:
  """One TFRecord: length, its masked CRC, the data, its masked CRC."""
  length = struct.pack("<Q", len(data))
  return (length + struct.pack("<I", _masked(crc32c(length))) + data
          + struct.pack("<I", _masked(crc32c(data))))


def _varint(value: int) -> bytes:
  out = bytearray()
  while True:
    low, value = value & 0x7F, value >> 7
    out.append(low | (0x80 if value else 0))
    if not value:
      return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
  """A length-delimited protobuf field."""
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int, body: bytes) -> bytes:
  """An Event proto: wall_time (1, double), step (2, int64), then `body`."""
  return b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step) + body


def scalar_event(tag: str, value: float, step: int, wall_time: float) -> bytes:
  """Event{summary (5): Summary{value (1): Value{tag (1), simple_value (2, float)}}}."""
  value_proto = _field(1, tag.encode()) + b"\x15" + struct.pack("<f", value)
  return _event(wall_time, step, _field(5, _field(1, value_proto)))


class EventFile:
  """One events.out.tfevents.* file in `directory`, as TensorBoard reads them."""

  def __init__(self, directory: Path):
    directory.mkdir(parents=True, exist_ok=True)
    now = time.time()
    self.file = (directory / f"events.out.tfevents.{int(now)}.{socket.gethostname()}").open("ab")
    self.file.write(_record(_event(now, 0, _field(3, b"brain.Event:2"))))  # file_version

  def add_scalar(self, tag: str, value: float, step: int):
    self.file.write(_record(scalar_event(tag, value, step, time.time())))

  def flush(self):
    self.file.flush()

  def close(self):
    self.file.close()
