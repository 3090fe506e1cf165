"""Property tests: the trace reader and the breakdown on a mutated real trace either work or raise
our DataError in one line naming the file."""

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from fathom_jax.analysis import breakdown, trace
from fathom_jax.errors import DataError
from tests.trace_recording import record

FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
  """The bytes of a real trace: two annotated steps of a small jitted program, HLO embedded."""
  logdir = tmp_path_factory.mktemp("trace")
  record(logdir, steps=2)
  (path,) = trace.find_xplanes(str(logdir))
  with open(path, "rb") as fh:
    data = fh.read()
  work = tmp_path_factory.mktemp("mutated")
  return data, str(work / "host.xplane.pb")


# Protobuf encoding, to build fields and to re-encode a message after changing one inside it.

def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    out.append(n & 0x7F | (0x80 if n > 0x7F else 0))
    n >>= 7
    if not n:
      return bytes(out)


def _field(number: int, wire: int, value) -> bytes:
  key = _varint(number << 3 | wire)
  if wire == 0:
    return key + _varint(value)
  if wire == 2:
    return key + _varint(len(value)) + value
  return key + value  # wire 1 and 5: fixed 8 and 4 bytes


def _encode(fields) -> bytes:
  return b"".join(_field(*f) for f in fields)


def _edit_nested(buf: bytes, path: list[int], edit) -> bytes:
  """`edit` applied to the (number, wire, value) fields of the message reached by following
  `path` (each index picks one of the current message's length-delimited fields), with every
  enclosing length re-encoded."""
  fields = list(trace._fields(buf))
  nested = [i for i, (_, wire, _v) in enumerate(fields) if wire == 2]
  if not path or not nested:
    return _encode(edit(fields))
  i = nested[path[0] % len(nested)]
  number, wire, value = fields[i]
  try:
    fields[i] = (number, wire, _edit_nested(value, path[1:], edit))
  except ValueError:  # a string or bytes value, not a message: edit the one holding it
    return _encode(edit(fields))
  return _encode(fields)


@st.composite
def new_fields(draw):
  """One protobuf field with a number the reader looks at and any wire type: a known field with
  the wrong type, or an unknown one."""
  number = draw(st.integers(1, 8))
  wire = draw(st.sampled_from([0, 1, 2, 5]))
  if wire == 0:
    value = draw(st.integers(0, 2**64 - 1))
  elif wire == 2:
    value = draw(st.binary(max_size=16))
  else:
    value = draw(st.binary(min_size=8 if wire == 1 else 4, max_size=8 if wire == 1 else 4))
  return number, wire, value


def _set_varint(k: int, value: int):
  """An edit: the k-th varint field (ids, timestamps, durations, stat values) set to `value`."""
  def edit(fields):
    varints = [i for i, (_, wire, _v) in enumerate(fields) if wire == 0]
    if varints:
      i = varints[k % len(varints)]
      fields[i] = (fields[i][0], 0, value)
    return fields
  return edit


MUTATIONS = ["truncate", "replace", "splice", "duplicate", "delete", "field", "number", "empty"]


def _mutate(data: bytes, draw, kinds=MUTATIONS) -> bytes:
  n = len(data)
  kind = draw(st.sampled_from(kinds))
  if kind == "truncate":
    return data[:draw(st.integers(0, n))]
  if kind == "replace":
    out = bytearray(data)
    for at, byte in draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, 255)),
                                  min_size=1, max_size=8)):
      out[at] = byte
    return bytes(out)
  if kind == "splice":
    at = draw(st.integers(0, n))
    return data[:at] + draw(st.binary(min_size=1, max_size=32)) + data[at:]
  if kind in ("duplicate", "delete"):
    start = draw(st.integers(0, n - 1))
    end = draw(st.integers(start + 1, min(n, start + 256)))
    if kind == "delete":
      return data[:start] + data[end:]
    at = draw(st.integers(0, n))
    return data[:at] + data[start:end] + data[at:]
  if kind in ("field", "number"):
    path = draw(st.lists(st.integers(0, 1000), max_size=6))
    if kind == "field":
      new = draw(new_fields())
      return _edit_nested(data, path, lambda fields: [new] + fields)
    return _edit_nested(data, path, _set_varint(draw(st.integers(0, 1000)),
                                                draw(st.integers(0, 2**64 - 1))))
  return b""


def _one_line_naming(error: DataError, name: str) -> None:
  message = str(error)
  assert message.startswith(name), message
  assert "\n" not in message, message


def test_reencoding_is_exact(recorded):
  data, _ = recorded
  assert _encode(trace._fields(data)) == data  # so a "field" mutation changes only that field
  assert trace.embedded_hlo_protos(data)


def test_empty_file_and_mistyped_field(recorded):
  data, path = recorded
  with open(path, "wb"):
    pass
  with pytest.raises(DataError, match="holds no profile planes") as e:
    trace.read(path)
  _one_line_naming(e.value, path)
  # XSpace.planes (field 1) as a varint: protobuf keeps it as an unknown field and reads on.
  with open(path, "wb") as fh:
    fh.write(_field(1, 0, 5) + data)
  assert trace.read(path).hlo_texts.keys() == trace.embedded_hlo_protos(data).keys()


@settings(FUZZ, max_examples=250)
@given(st.data())
def test_read_mutated_trace(recorded, choices):
  data, path = recorded
  mutated = _mutate(data, choices.draw)
  with open(path, "wb") as fh:
    fh.write(mutated)
  try:
    t = trace.read(path)
  except DataError as e:
    _one_line_naming(e, path)
  else:
    assert all(isinstance(text, str) for text in t.hlo_texts.values())


@settings(FUZZ, max_examples=30)
@given(st.data())
def test_breakdown_on_mutated_trace(recorded, tmp_path, choices):
  data, _ = recorded
  folder = tmp_path / "run"
  folder.mkdir(exist_ok=True)
  # Mostly changed numbers (times, ids, stat values), which the profiler's reader accepts.
  kinds = ["number"] * 4 + MUTATIONS
  (folder / "host.xplane.pb").write_bytes(_mutate(data, choices.draw, kinds))
  try:
    breakdown.run(str(folder), output_dir=str(tmp_path / "out"))
  except DataError as e:
    _one_line_naming(e, str(folder))
