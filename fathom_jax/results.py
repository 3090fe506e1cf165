"""Run folders and result files: one JSON per run, written atomically."""

import datetime
import json
import os
import tempfile
import uuid

SCHEMA_VERSION = 1
RESULT_FILE = "result.json"


def new_run_dir(output_dir: str, workload: str, mode: str, preset: str) -> str:
  """Creates a fresh run folder; the random suffix keeps concurrent runs apart."""
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  path = os.path.join(output_dir, f"{stamp}-{workload}-{mode}-{preset}-{uuid.uuid4().hex[:6]}")
  os.makedirs(path, exist_ok=False)
  return path


def write_json_atomic(path: str, payload: dict) -> None:
  """Writes through a temporary file in the same folder and renames it, so readers never see
  a partial file, whatever happens to this process."""
  folder = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=folder)
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(payload, f, indent=2, sort_keys=False, default=_jsonable)
      f.write("\n")
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def read_result(run_dir: str) -> dict:
  with open(os.path.join(run_dir, RESULT_FILE)) as f:
    return json.load(f)


def _jsonable(value):
  if hasattr(value, "item"):
    return value.item()
  if hasattr(value, "tolist"):
    return value.tolist()
  if isinstance(value, tuple):
    return list(value)
  raise TypeError(f"not JSON serialisable: {type(value).__name__}")
