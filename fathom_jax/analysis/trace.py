"""Reads the traces `jax.profiler.trace` writes (TensorBoard profile plugin layout,
<logdir>/plugins/profile/<run>/<host>.xplane.pb) with the profiler's own reader,
`jax.profiler.ProfileData`.

What it extracts:
  - op events: one per executed HLO instruction (CPU: on the XLA thread-pool lines; GPU/TPU: on the
    device planes, where the 'XLA Ops' line holds one event per op, or else the kernels on the
    stream lines, several of which may make one op), with the program id and module name;
  - step windows from step annotations (`jax.profiler.StepTraceAnnotation`), else one window per
    program execution;
  - the HLO of every program, which the profiler embeds in the metadata plane as HloProto; the
    ProfileData API does not expose it, so the few protobuf fields on that path are read here and
    jaxlib turns each HloModuleProto back into HLO text.
"""

import dataclasses
import glob
import os
import re
from typing import Iterator, Optional

from fathom_jax.errors import DataError

XPLANE_SUFFIX = ".xplane.pb"


@dataclasses.dataclass(frozen=True)
class OpEvent:
  program_id: Optional[int]
  module: str  # HLO module name, e.g. 'jit_train_step'
  op: str  # HLO instruction name
  start_ns: float
  duration_ns: float
  thread: str  # the line the event was on: a host thread or a device stream
  run_id: Optional[int] = None  # which execution of the program (CPU events carry it)
  first: bool = True  # False for the 2nd, 3rd... kernel of one execution of a device op

  @property
  def end_ns(self) -> float:
    return self.start_ns + self.duration_ns


@dataclasses.dataclass(frozen=True)
class Window:
  name: str
  step: Optional[int]
  start_ns: float
  end_ns: float

  @property
  def duration_ns(self) -> float:
    return self.end_ns - self.start_ns


@dataclasses.dataclass
class Trace:
  path: str
  events: list[OpEvent]
  steps: list[Window]  # from step annotations; [] when the program had none
  executions: list[Window]  # one per program execution, named '<module>(<program id>)'
  hlo_texts: dict[str, str]  # '<module>(<program id>)' -> HLO text embedded in the trace
  device: str  # 'cpu', or the device planes' names


def find_xplanes(path: str) -> list[str]:
  """The xplane files of the latest profiling session under `path` (a logdir, a run folder, a
  session folder or a single .xplane.pb file)."""
  if os.path.isfile(path):
    if not path.endswith(XPLANE_SUFFIX):
      raise DataError(f"{path}: not an xplane file (want *{XPLANE_SUFFIX})")
    return [path]
  if not os.path.isdir(path):
    raise DataError(f"{path}: no such trace folder")
  files = glob.glob(os.path.join(path, "**", "*" + XPLANE_SUFFIX), recursive=True)
  if not files:
    raise DataError(f"{path}: no *{XPLANE_SUFFIX} trace under this folder (write one with "
                    "jax.profiler.trace(logdir))")
  latest = max(os.path.dirname(f) for f in files)  # session folders are named by date and time
  return sorted(f for f in files if os.path.dirname(f) == latest)


# ---------------------------------------------------------------------------------------------
# The embedded HLO: XSpace.planes[name == '/host:metadata'].event_metadata[*] each carry the
# program name ('jit_f(6)') and a bytes stat holding an HloProto, whose field 1 is the module.


def _varint(buf: bytes, i: int) -> tuple[int, int]:
  result = shift = 0
  while True:
    if i >= len(buf):
      raise ValueError("truncated varint")
    b = buf[i]
    i += 1
    result |= (b & 0x7F) << shift
    shift += 7
    if b < 0x80:
      return result, i


def _fields(buf: bytes) -> Iterator[tuple[int, int, object]]:
  """(field number, wire type, value) triples of one protobuf message; values of varints are
  ints, of the other wire types bytes."""
  i, n = 0, len(buf)
  while i < n:
    key, i = _varint(buf, i)
    number, wire = key >> 3, key & 7
    if wire == 0:
      value, i = _varint(buf, i)
    elif wire == 1:
      value, i = buf[i:i + 8], i + 8
    elif wire == 5:
      value, i = buf[i:i + 4], i + 4
    elif wire == 2:
      length, i = _varint(buf, i)
      value, i = buf[i:i + length], i + length
    else:
      raise ValueError(f"unsupported wire type {wire}")
    if i > n:
      raise ValueError("truncated message")
    yield number, wire, value


def _values(buf: bytes, number: int) -> list[bytes]:
  """The length-delimited values of field `number` (messages, strings, bytes). The same number
  with another wire type is an unknown field to protobuf parsers, which keep it and read on; the
  profiler's reader accepts such a file, so it is skipped here too."""
  return [v for n, w, v in _fields(buf) if n == number and w == 2]


def _last(buf: bytes, number: int) -> Optional[bytes]:
  values = _values(buf, number)
  return values[-1] if values else None  # a repeated singular field: the last one wins


def _printable(name: str) -> str:
  return "".join(c if c.isprintable() else "?" for c in name)


def embedded_hlo_protos(data: bytes) -> dict[str, bytes]:
  """'<module>(<program id>)' -> serialized HloModuleProto, from an XSpace's metadata plane;
  a malformed protobuf walk raises ValueError."""
  out = {}
  for plane in _values(data, 1):  # XSpace.planes
    if _last(plane, 2) != b"/host:metadata":  # XPlane.name
      continue
    for entry in _values(plane, 4):  # XPlane.event_metadata (map<int64, XEventMetadata>)
      metadata = _last(entry, 2) or b""
      name = _printable((_last(metadata, 2) or b"").decode("utf-8", "replace"))
      for stat in _values(metadata, 5):  # XEventMetadata.stats
        proto = _last(stat, 6)  # XStat.bytes_value: the HloProto
        module = _last(proto, 1) if proto is not None else None  # HloProto.hlo_module
        if module is not None and name:
          out[name] = module
  return out


def hlo_text_from_proto(module_proto: bytes) -> str:
  from jax._src.lib import xla_client  # jaxlib's HLO bindings
  module = xla_client.hlo.HloModule.from_serialized_hlo_module_proto(module_proto)
  return module.to_string()


# ---------------------------------------------------------------------------------------------
# Events.


def _stats(event) -> dict:
  return {k: v for k, v in event.stats}


def _program_id(value) -> Optional[int]:
  try:
    return int(value)
  except (TypeError, ValueError):
    return None


_PROGRAM = re.compile(r"^(.*)\((\d+)\)$")


def _module_windows(plane) -> list[Window]:
  return [Window(e.name, None, e.start_ns, e.end_ns)
          for line in plane.lines if line.name == "XLA Modules" for e in line.events]


def _device_events(plane) -> list[OpEvent]:
  """Op events of a GPU/TPU plane: the 'XLA Ops' line if present, else every event that names
  an HLO op (kernels; several may belong to one op)."""
  lines = list(plane.lines)
  ops_lines = [l for l in lines if l.name == "XLA Ops"]
  modules = []
  for line in lines:
    if line.name == "XLA Modules":
      for e in line.events:
        m = _PROGRAM.match(e.name)
        modules.append((e.start_ns, e.end_ns, m.group(1) if m else e.name,
                        _program_id(m.group(2)) if m else _program_id(_stats(e).get("run_id"))))
  events = []
  for line in ops_lines or lines:
    if line.name in ("XLA Modules", "Steps", "Framework Ops", "Framework Name Scope",
                     "Source code", "XLA TraceMe"):
      continue
    for e in line.events:
      stats = _stats(e)
      op = stats.get("hlo_op") or (e.name if ops_lines else None)
      if not op:
        continue
      module = stats.get("hlo_module", "")
      program = _program_id(stats.get("program_id"))
      if not module or program is None:
        for start, end, name, pid in modules:
          if start <= e.start_ns <= end:
            module, program = module or name, program if program is not None else pid
            break
      events.append(OpEvent(program, str(module), str(op), e.start_ns, e.duration_ns,
                            f"{plane.name}/{line.name}"))
  # Consecutive kernels of one op are one execution of it: count them once, time them all.
  events.sort(key=lambda e: e.start_ns)
  for i in range(1, len(events)):
    a, b = events[i - 1], events[i]
    if (a.module, a.program_id, a.op) == (b.module, b.program_id, b.op):
      events[i] = dataclasses.replace(b, first=False)
  return events


def _host_events(plane) -> tuple[list[OpEvent], list[Window]]:
  events, steps = [], []
  for line in plane.lines:
    for e in line.events:
      stats = _stats(e)
      if "hlo_op" in stats:
        events.append(OpEvent(_program_id(stats.get("program_id")),
                              str(stats.get("hlo_module", "")), str(stats["hlo_op"]),
                              e.start_ns, e.duration_ns, line.name,
                              _program_id(stats.get("run_id"))))
      elif "step_num" in stats:
        steps.append(Window(e.name, _program_id(stats["step_num"]), e.start_ns, e.end_ns))
  return events, steps


def _executions(events: list[OpEvent], modules: list[Window]) -> list[Window]:
  """One window per program execution: the device's 'XLA Modules' events where there are any;
  else the span of the events sharing a run id; else runs of events of one program separated by
  gaps longer than the run so far."""
  if modules:
    return sorted(modules, key=lambda w: w.start_ns)
  by_program: dict[tuple, list[OpEvent]] = {}
  for e in events:
    by_program.setdefault((e.module, e.program_id, e.run_id), []).append(e)
  windows = []
  for (module, pid, run_id), evs in by_program.items():
    if run_id is not None:
      windows.append(Window(f"{module}({pid})", None, min(e.start_ns for e in evs),
                            max(e.end_ns for e in evs)))
      continue
    evs.sort(key=lambda e: e.start_ns)
    start, end = evs[0].start_ns, evs[0].end_ns
    for e in evs[1:]:
      if e.start_ns - end > max(end - start, 1e5):  # a gap longer than the run so far: next run
        windows.append(Window(f"{module}({pid})", None, start, end))
        start = e.start_ns
      end = max(end, e.end_ns)
    windows.append(Window(f"{module}({pid})", None, start, end))
  return sorted(windows, key=lambda w: w.start_ns)


def read(path: str) -> Trace:
  """Reads one xplane file; a damaged or foreign file raises DataError."""
  from jax.profiler import ProfileData
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise DataError(f"{path}: cannot read ({e.strerror})") from None
  try:
    profile = ProfileData.from_serialized_xspace(data)
  except Exception:  # the reader raises RuntimeError('Failed to parse XSpace ...')
    raise DataError(f"{path}: not a readable xplane trace (truncated or not an XSpace)") from None
  planes = list(profile.planes)
  if not planes:  # an empty file parses as an empty XSpace
    raise DataError(f"{path}: the trace holds no profile planes (an empty or cut file)")
  host, device, steps, devices, modules = [], [], [], [], []
  for plane in planes:
    if plane.name.startswith("/device:"):
      device_events = _device_events(plane)
      if device_events:
        devices.append(plane.name)
        device += device_events
        modules += _module_windows(plane)
    elif plane.name.startswith("/host:"):
      host_events, host_steps = _host_events(plane)
      host += host_events
      steps += host_steps
  # Where devices run the ops, host events naming ops are launches, not the work.
  events = device or host
  try:
    protos = embedded_hlo_protos(data)
  except ValueError:
    raise DataError(f"{path}: the trace's metadata plane is damaged") from None
  texts = {}
  for name, proto in protos.items():
    try:
      texts[name] = hlo_text_from_proto(proto)
    except Exception:
      raise DataError(f"{path}: the HLO embedded for {name} is not a readable module") from None
  steps.sort(key=lambda w: w.start_ns)
  return Trace(path, events, steps, _executions(events, modules), texts,
               ", ".join(devices) if devices else "cpu")


def read_all(path: str) -> list[Trace]:
  return [read(p) for p in find_xplanes(path)]
