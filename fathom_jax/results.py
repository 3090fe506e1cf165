"""Run folders and result files: one JSON per run, written atomically; the figures derived from
a run's step times, and its printed summary.

Every JSON file the project writes is strict JSON (RFC 8259): a number that is not finite (a
diverged loss) is written as the string "NaN", "Infinity" or "-Infinity", which any parser
reads and no number can be mistaken for.
"""

import csv
import datetime
import io
import json
import math
import os
import tempfile
import uuid
from typing import Optional, Sequence

import numpy as np

SCHEMA_VERSION = 1
RESULT_FILE = "result.json"
# The JSON Schema of result.json, kept with the package (any JSON Schema validator reads it).
SCHEMA_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "result.schema.json")


def new_run_dir(output_dir: str, workload: str, mode: str, preset: str) -> str:
  """Creates a fresh run folder; the random suffix keeps concurrent runs apart."""
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  path = os.path.join(output_dir, f"{stamp}-{workload}-{mode}-{preset}-{uuid.uuid4().hex[:6]}")
  os.makedirs(path, exist_ok=False)
  return path


def _atomically(path: str, write) -> None:
  """write(descriptor, path) of a temporary file beside `path` (closing the descriptor), then a
  rename onto `path`, so readers never see a partial file, whatever happens to this process;
  the file gets the user's umask (mkstemp gives 0600)."""
  folder = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=folder)
  try:
    write(fd, tmp)
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
  except BaseException as e:
    if os.path.exists(tmp):
      os.unlink(tmp)
    if isinstance(e, OSError) and not e.filename:  # a write to the descriptor names no file
      raise OSError(e.errno, e.strerror, path) from None
    raise


def write_text_atomic(path: str, text: str) -> None:
  """Text written whole or not at all."""
  def write(fd, tmp):
    with os.fdopen(fd, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
  _atomically(path, write)


def save_figure(fig, path: str, **savefig_options) -> None:
  """A matplotlib figure saved whole or not at all, in the format of `path`'s extension."""
  extension = os.path.splitext(path)[1].lstrip(".") or None
  def write(fd, tmp):
    os.close(fd)
    fig.savefig(tmp, format=extension, **savefig_options)
  _atomically(path, write)


def csv_text(rows: Sequence[dict], fields: Optional[Sequence[str]] = None) -> str:
  """CSV of `rows` under `fields` (default: every key, in order of first appearance); a missing
  or None value is an empty cell."""
  fields = list(fields or dict.fromkeys(k for r in rows for k in r))
  out = io.StringIO()
  writer = csv.DictWriter(out, fieldnames=fields, extrasaction="ignore")
  writer.writeheader()
  writer.writerows(rows)
  return out.getvalue()


def read_json_object(path: str) -> Optional[dict]:
  """The JSON object in `path`; None where the file is missing, unreadable or damaged."""
  try:
    with open(path) as f:
      value = json.load(f)
  except (OSError, ValueError):
    return None
  return value if isinstance(value, dict) else None


def unfinished(record: dict) -> str:
  """What a run's result record says of a run that did not complete ('interrupted (…)'), or ''
  for a completed one."""
  if record.get("status") == "completed":
    return ""
  return (record.get("status", "of unknown status")
          + (f" ({record['error']})" if record.get("error") else ""))


def _umask() -> int:
  """This process's umask, read without changing it (Linux), else the usual 022."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except OSError:
    pass
  return 0o022


def strict(value):
  """`value` as strict JSON takes it: arrays and numpy scalars as Python values, tuples as
  lists, non-finite floats as their names (see the module docstring)."""
  if isinstance(value, dict):
    return {k: strict(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [strict(v) for v in value]
  if isinstance(value, (bool, int, str)) or value is None:
    return value
  if isinstance(value, float):
    if math.isfinite(value):
      return value
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
  return strict(_jsonable(value))


def dumps(payload) -> str:
  """Strict JSON text of `payload`, indented, with a final newline."""
  return json.dumps(strict(payload), indent=2, allow_nan=False) + "\n"


def write_json_atomic(path: str, payload: dict) -> None:
  """Strict JSON written whole or not at all (write_text_atomic)."""
  write_text_atomic(path, dumps(payload))


def read_result(run_dir: str) -> dict:
  with open(os.path.join(run_dir, RESULT_FILE)) as f:
    return json.load(f)


def _jsonable(value):
  if getattr(value, "ndim", 0) > 0 and hasattr(value, "tolist"):  # arrays
    return value.tolist()
  if hasattr(value, "item"):  # numpy and JAX scalars
    return value.item()
  if isinstance(value, tuple):
    return list(value)
  raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def percentiles(times: Sequence[float]) -> dict:
  """Median, 10th and 90th percentiles, mean, min and max of step times."""
  arr = np.asarray(times)
  return {"median": float(np.median(arr)), "p10": float(np.percentile(arr, 10)),
          "p90": float(np.percentile(arr, 90)), "mean": float(arr.mean()),
          "min": float(arr.min()), "max": float(arr.max())}


def summarise(figures: dict, batch_size: int) -> dict:
  """Adds the figures derived from the measured step times (as far as there are any)."""
  times = figures["step_times_s"]
  figures["steps_completed"] = len(times)
  if not times:
    return figures
  timing = percentiles(times)
  flops = figures.get("flops_per_step")
  figures.update(step_time_s=timing, examples_per_s=batch_size / timing["median"],
                 flops_per_s=flops / timing["median"] if flops else None)
  if figures.get("tokens_per_example"):  # sequence models: per token position of the batch
    figures["tokens_per_s"] = figures["examples_per_s"] * figures["tokens_per_example"]
    figures["time_per_token_s"] = timing["median"] / figures["tokens_per_example"]
  if figures.get("losses"):
    figures["final_loss"] = figures["losses"][-1]
  return figures


def si(value: Optional[float], unit: str) -> str:
  if value is None:
    return "n/a"
  for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(value) >= scale:
      return f"{value / scale:.2f} {prefix}{unit}"
  return f"{value:.2f} {unit}"


def format_summary(record: dict) -> str:
  f = record["figures"]
  if not f["step_times_s"]:
    return (f"== {record['workload']} {record['mode']}: {record['status']} before any measured "
            f"step: {record.get('error', '')}")
  t = f["step_time_s"]
  mem = f["peak_device_memory_bytes"]
  if mem is None and f["compiled_memory"]:
    mem = sum(v for k, v in f["compiled_memory"].items() if k != "generated_code_size_in_bytes")
    mem_text = f"{si(mem, 'B')} (compiler estimate)"
  else:
    mem_text = si(mem, "B")
  lines = [
      f"== {record['workload']} {record['mode']} ({record['preset']}, batch "
      f"{record['config']['batch_size']}, {record['spec']['dtype']}, "
      f"{record['environment']['backend']}, {record.get('implementation', 'tuned')}) ==",
      f"  compile      {f['lower_time_s'] + f['compile_time_s']:.2f} s "
      f"(lower {f['lower_time_s']:.2f} s, compile {f['compile_time_s']:.2f} s)",
      f"  step time    median {t['median'] * 1e3:.2f} ms  p10 {t['p10'] * 1e3:.2f} ms  "
      f"p90 {t['p90'] * 1e3:.2f} ms  ({len(f['step_times_s'])} steps)",
      f"  throughput   {f['examples_per_s']:.1f} {record['example_unit']}/s"
      + (f", {si(f['tokens_per_s'], 'tokens/s')}, {f['time_per_token_s'] * 1e3:.3f} ms per "
         f"token of the batch" if f.get("tokens_per_s") else ""),
      f"  model FLOPs  {si(f['flops_per_step'], 'FLOP')}/step, "
      f"{si(f['flops_per_s'], 'FLOP/s')}",
      f"  memory       {mem_text}",
  ]
  if "final_loss" in f:
    lines.append(f"  loss         {f['losses'][0]:.4f} -> {f['final_loss']:.4f}")
  bad = (record.get("data") or {}).get("bad_samples")
  if bad:  # only under --bad_samples=skip
    more = bad["skipped"] - len(bad["first"])
    detail = "; ".join(bad["first"] + ([f"{more} more"] if more else []))
    lines.append(f"  bad samples  {bad['skipped']} skipped" + (f": {detail}" if detail else ""))
  if record.get("run_dir"):
    lines.append(f"  result       {os.path.join(record['run_dir'], RESULT_FILE)}")
  return "\n".join(lines)
