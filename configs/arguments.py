"""The one parser of a config's argument: `--config=configs/FILE.py:ARG`.

ARG is `key=value,key=value` (`main=stanford_dogs,aux=cars196,seed=0`); a lone value
without `=` is the first key's (`configs/digits.py:domains` is `variant=domains`),
as in big_vision's `parse_arg`. Every config that takes an argument parses it here,
so all refuse a key or a value they do not know in the same words.
"""
from collections.abc import Mapping, Sequence

__all__ = ["parse"]


def parse(arg: str | None, defaults: Mapping[str, str | int],
          choices: Mapping[str, Sequence] | None = None) -> dict[str, str | int]:
  """`defaults` with the values that `arg` sets: a value takes its default's type (an
  int default takes integers, others strings), and where `choices` names the key,
  one of its choices.

  Raises:
    ValueError: a key that `defaults` lacks (naming the keys), a value that is no
      integer where one belongs, or one that is not among its choices (naming them).
  """
  if arg and "=" not in arg and "," not in arg:
    arg = f"{next(iter(defaults))}={arg}"
  settings = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"Unknown config argument {key!r}: use "
                       f"{', '.join(f'{k}=' for k in defaults)}.")
    settings[key] = _typed(key, value, defaults[key])
    allowed = (choices or {}).get(key)
    if allowed is not None and settings[key] not in allowed:
      raise ValueError(f"{key}={settings[key]!r}: use one of {tuple(allowed)}.")
  return settings


def _typed(key: str, value: str, default: str | int) -> str | int:
  if not isinstance(default, int):
    return value
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"{key}={value!r}: give an integer.") from None
