"""Config presets and command-line overrides for frozen config dataclasses."""

import dataclasses
import math
import typing
from typing import Any, Mapping, Sequence

from fathom_jax.errors import UsageError


def field_names(config_cls) -> list[str]:
  return [f.name for f in dataclasses.fields(config_cls)]


def _parse_value(text: str, typ: Any, name: str):
  """Converts `text` to the field's declared type; tuples are comma/colon separated."""
  origin = typing.get_origin(typ)
  if typ is bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
      return True
    if lowered in ("0", "false", "no", "off"):
      return False
    raise UsageError(f"config field {name!r} wants true/false, got {text!r}")
  if typ is int:
    try:
      return int(text)
    except ValueError:
      raise UsageError(f"config field {name!r} wants an integer, got {text!r}") from None
  if typ is float:
    try:
      return float(text)
    except ValueError:
      raise UsageError(f"config field {name!r} wants a number, got {text!r}") from None
  if typ is str:
    return text
  if origin is tuple:
    args = typing.get_args(typ)
    parts = [p for p in text.replace(":", ",").split(",") if p.strip()]
    if len(args) == 2 and args[1] is Ellipsis:
      return tuple(_parse_value(p, args[0], name) for p in parts)
    if len(parts) != len(args):
      raise UsageError(f"config field {name!r} wants {len(args)} comma-separated values, got {text!r}")
    return tuple(_parse_value(p, a, name) for p, a in zip(parts, args))
  if origin is typing.Union or str(origin) == "types.UnionType":
    args = [a for a in typing.get_args(typ) if a is not type(None)]
    if text.strip().lower() == "none":
      return None
    return _parse_value(text, args[0], name)
  raise UsageError(f"config field {name!r} cannot be set from the command line")


def apply_overrides(config, overrides: Sequence[str]):
  """Returns `config` with `field=value` strings applied, type-checked against the dataclass."""
  hints = typing.get_type_hints(type(config))
  changes = {}
  for item in overrides:
    if "=" not in item:
      raise UsageError(f"override {item!r} is not of the form field=value")
    name, value = item.split("=", 1)
    name = name.strip()
    if name not in hints:
      raise UsageError(
          f"unknown config field {name!r} for {type(config).__name__}; "
          f"fields are: {', '.join(field_names(type(config)))}")
    changes[name] = _parse_value(value.strip(), hints[name], name)
  return replace(config, **changes)


def replace(config, **changes):
  """`dataclasses.replace` that re-runs the config's validation."""
  new = dataclasses.replace(config, **changes)
  validate(new)
  return new


MAX_INT_FIELD = 2**31 - 1  # sizes, counts and lengths: XLA dimensions beyond it fail slowly


def validate(config) -> None:
  """Rejects non-positive sizes: every int field must be > 0 unless its name says it may be 0."""
  for f in dataclasses.fields(config):
    value = getattr(config, f.name)
    values = value if isinstance(value, tuple) else (value,)
    for v in values:
      if isinstance(v, bool) or not isinstance(v, (int, float)):
        continue
      allows_zero = f.metadata.get("allow_zero", False)
      if v < 0 or (v == 0 and not allows_zero):
        raise UsageError(f"config field {f.name!r} must be positive, got {value!r}")
      if isinstance(v, int) and v > MAX_INT_FIELD or isinstance(v, float) and not math.isfinite(v):
        raise UsageError(f"config field {f.name!r} must be a finite number of at most "
                         f"{MAX_INT_FIELD:,}, got {value!r}")
  check = getattr(config, "check", None)
  if check is not None:
    check()


def preset(presets: Mapping[str, Any], name: str, workload: str):
  if name not in presets:
    raise UsageError(
        f"unknown preset {name!r} for {workload}; presets are: {', '.join(presets)}")
  config = presets[name]
  validate(config)
  return config


def nonneg(default):
  """A numeric config field that may be zero (a rate, a probability, a count of optional things)."""
  return dataclasses.field(default=default, metadata={"allow_zero": True})


def to_dict(config) -> dict:
  return dataclasses.asdict(config)
