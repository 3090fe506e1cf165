"""A study: profiled runs of the suite, planned, run one process each, resumable, then a report.

  python -m fathom_jax.study --workloads=all --preset=tiny --output_dir=study

The plan holds, for each workload, a profiled train and inference run (the breakdowns the
similarity, train-versus-inference and roofline sections use); the train step run again unfused
and eagerly (fused versus per-op execution); at 1, 2, ... N CPUs (thread scaling; each point is
its own process whose CPU affinity is set before JAX starts); and over 1, 2, 4, 8 devices
(device scaling, virtual CPU devices on a CPU machine). A run of the machine's peaks (a large
matmul and a large copy) comes first. Each point's run folder lives under
`<output_dir>/runs/<point>/`; a point whose run finished (completed, or failed for a reason a
retry would not change) is never redone, so an interrupted study, started again with the same
command, runs only what is missing. The report (`fathom_jax.study.report`) is then written to
`<output_dir>/report.md` with its figures and tables.
"""

import contextlib
import dataclasses
import glob
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from typing import Optional, Sequence

from fathom_jax import errors, results
from fathom_jax.errors import UsageError

STUDY_FILE = "study.json"
RUNS_DIR = "runs"
PEAKS_POINT = "peaks"
POINT_FILE = "point.json"  # a point's outcome when its process wrote no result (bad input)
LOG_FILE = "log.txt"
LOCK_FILE = ".lock"
FINISHED = ("completed", "failed")


@dataclasses.dataclass(frozen=True)
class Settings:
  """What a study measures; a study folder holds one set of settings."""
  workloads: tuple[str, ...]
  preset: str = "tiny"
  steps: int = 5
  warmup_steps: int = 2
  backend: Optional[str] = None
  fusion_workloads: tuple[str, ...] = ()
  thread_workloads: tuple[str, ...] = ()
  thread_counts: tuple[int, ...] = ()
  device_workloads: tuple[str, ...] = ()
  device_counts: tuple[int, ...] = ()
  device_batch: dict = dataclasses.field(default_factory=dict)  # workload -> global batch
  implementation: Optional[str] = None  # every run's; None: run.py's default for the backend
  implementation_workloads: tuple[str, ...] = ()  # train step as reference and as tuned (CPU)
  targets: tuple[str, ...] = ()  # devices the suite's steps also compile for (run.py --target)


@dataclasses.dataclass(frozen=True)
class Point:
  """One run of the study: a workload, mode and the one knob this point varies."""
  kind: str  # 'suite', 'fusion', 'threads', 'devices', 'implementation' or 'target'
  workload: str
  mode: str
  execution: str = "compiled"
  implementation: Optional[str] = None
  cpus: Optional[int] = None
  devices: Optional[int] = None
  batch_size: Optional[int] = None
  target: Optional[str] = None

  @property
  def id(self) -> str:
    knob = {"suite": "", "fusion": f"-{self.execution}", "threads": f"-cpus{self.cpus}",
            "devices": f"-devices{self.devices}",
            "implementation": f"-{self.implementation}", "target": f"-{self.target}"}[self.kind]
    return f"{self.kind}-{self.workload}-{self.mode}{knob}"

  def arguments(self, settings: Settings) -> list[str]:
    if self.kind == "target":  # compiled for the device, run nowhere: the reference program
      return [f"--workload={self.workload}", f"--mode={self.mode}", f"--preset={settings.preset}",
              f"--target={self.target}", "--quiet"]
    args = [f"--workload={self.workload}", f"--mode={self.mode}", f"--preset={settings.preset}",
            f"--steps={settings.steps}", f"--warmup_steps={settings.warmup_steps}", "--profile",
            "--quiet", f"--execution={self.execution}"]
    if settings.backend:
      args.append(f"--backend={settings.backend}")
    implementation = self.implementation or settings.implementation
    if implementation:
      args.append(f"--implementation={implementation}")
    if self.cpus is not None:
      args.append(f"--cpus={self.cpus}")
    if self.devices is not None:
      if (settings.backend or "cpu") == "cpu":
        args.append(f"--cpu_devices={self.devices}")
      args.append(f"--num_devices={self.devices}")
    if self.batch_size is not None:
      args.append(f"--batch_size={self.batch_size}")
    return args


def plan(settings: Settings) -> list[Point]:
  points = [Point("suite", w, m) for w in settings.workloads for m in ("train", "infer")]
  points += [Point("fusion", w, "train", execution=e) for w in settings.fusion_workloads
             for e in ("unfused", "eager")]
  points += [Point("threads", w, "train", cpus=n) for w in settings.thread_workloads
             for n in settings.thread_counts]
  points += [Point("devices", w, "train", devices=n, batch_size=settings.device_batch.get(w))
             for w in settings.device_workloads for n in settings.device_counts]
  points += [Point("implementation", w, "train", implementation=i)
             for w in settings.implementation_workloads for i in ("reference", "tuned")]
  points += [Point("target", w, m, target=t) for t in settings.targets
             for w in settings.workloads for m in ("train", "infer")]
  return points


def measuring_points(settings: Settings) -> dict[str, str]:
  """{point id: id of the point whose run measures it}. Points with the same command share one
  run (the implementation comparison's run of the suite's own implementation is the suite's
  train run): the first in plan order measures, the others read its run."""
  first: dict[tuple, str] = {}
  return {p.id: first.setdefault(tuple(p.arguments(settings)), p.id) for p in plan(settings)}


def doublings(available: int) -> tuple[int, ...]:
  """1, 2, 4, ... up to `available` (CPUs this process may use, devices it has), and that count
  itself: the default points of a scaling series."""
  counts = [2**i for i in range(int(math.log2(available)) + 1)]
  return tuple(sorted(set(counts) | {available}))


def device_batch(workload: str, preset: str, counts: Sequence[int]) -> int:
  """The preset's batch, rounded up so the largest device count divides it: every point of a
  device-scaling series runs the same global batch."""
  from fathom_jax import config as config_lib
  from fathom_jax.workloads import registry
  w = registry.get(workload)
  batch = config_lib.preset(w.presets, preset, w.name).batch_size
  step = math.lcm(*counts)
  return -(-batch // step) * step


# ---------------------------------------------------------------------------------------------
# Points on disk.


def point_dir(output_dir: str, point_id: str) -> str:
  return os.path.join(output_dir, RUNS_DIR, point_id)


def point_outcome(folder: str) -> Optional[dict]:
  """The finished outcome of a point's folder: {'status', 'run_dir' or 'error'}; None when the
  point has not finished (never run, killed, interrupted, or its files are damaged)."""
  return scan_point(folder)[0]


def scan_point(folder: str) -> tuple[Optional[dict], bool]:
  """(point_outcome, whether the folder holds a run that finished but whose files cannot be
  read: a result.json that is not a JSON object, or a completed run's breakdown or static
  analysis). A damaged run is no outcome: the point runs again."""
  note = os.path.join(folder, POINT_FILE)
  if os.path.exists(note):
    with open(note) as f:
      return json.load(f), False
  damaged = False
  for path in sorted(glob.glob(os.path.join(folder, "*", results.RESULT_FILE))):
    record = results.read_json_object(path)
    if record is None:
      damaged = True
      continue
    if record.get("status") not in FINISHED:
      continue
    run_dir = os.path.dirname(path)
    if record["status"] == "completed" and not _analyses_readable(run_dir, record):
      damaged = True
      continue
    return {"status": record["status"], "run_dir": run_dir, "error": record.get("error")}, False
  return None, damaged


def _earlier_redone(output_dir: str) -> list:
  study_file = results.read_json_object(os.path.join(output_dir, STUDY_FILE)) or {}
  return list(study_file.get("redone_after_damage") or [])


def _analyses_readable(run_dir: str, record: dict) -> bool:
  """Whether the files a completed run's analyses left (breakdown.json of a profiled run,
  static.json of a target compile) are whole JSON objects."""
  from fathom_jax.analysis import breakdown, static
  wanted = ([breakdown.BREAKDOWN_FILE] if (record.get("spec") or {}).get("profile") else []) + (
      [static.STATIC_FILE] if record.get("kind") == "target compile" else [])
  return all(results.read_json_object(os.path.join(run_dir, name)) is not None
             for name in wanted)


def _command(arguments: list[str]) -> list[str]:
  return [sys.executable, "-m", "fathom_jax", *arguments]


def _environment() -> dict:
  """This process's environment, with this copy of fathom_jax importable by the children."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
  env[errors.PARENT_VARIABLE] = str(os.getpid())  # the point's process dies with the study
  return env


@contextlib.contextmanager
def locked(output_dir: str):
  """The study folder, held by this process alone while it works in it: a second study on the
  same folder is refused (the lock goes with the process, however it ends)."""
  import fcntl
  path = os.path.join(output_dir, LOCK_FILE)
  handle = open(path, "a+")
  try:
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:
    handle.seek(0)
    holder = handle.read().strip() or "another process"
    handle.close()
    raise UsageError(f"{output_dir} is in use by another study ({holder}); wait for it to end, "
                     "or choose another --output_dir") from None
  try:
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}\n")
    handle.flush()
    yield
  finally:
    handle.close()


def shown(arguments: list[str]) -> str:
  """The command as a user would type it."""
  return " ".join(["python run.py", *map(shlex.quote, arguments)])


def run_point(output_dir: str, point: Point, settings: Settings, timeout_s: float) -> dict:
  folder = point_dir(output_dir, point.id)
  shutil.rmtree(folder, ignore_errors=True)  # what an unfinished attempt left
  os.makedirs(folder)
  arguments = point.arguments(settings) + [f"--output_dir={folder}"]
  with open(os.path.join(folder, LOG_FILE), "w") as log:
    log.write(shown(arguments) + "\n")
    log.flush()
    try:
      proc = subprocess.run(_command(arguments), stdout=log, stderr=subprocess.STDOUT,
                            timeout=timeout_s, env=_environment())
      code = proc.returncode
    except subprocess.TimeoutExpired:
      code = None
  if code == 130:
    raise KeyboardInterrupt
  outcome = point_outcome(folder)
  if outcome is None:  # bad input (exit 2), a crash or the time limit: no result file
    with open(os.path.join(folder, LOG_FILE)) as f:
      lines = [l.strip() for l in f if l.strip()]
    error = (f"exceeded the {timeout_s:.0f} s limit" if code is None else
             f"killed by signal {-code}" if code < 0 else
             next((l for l in reversed(lines) if l.startswith("error:")),
                  f"exit status {code}: {lines[-1] if lines else 'no output'}"))
    outcome = {"status": "failed", "error": error, "exit_status": code}
    # A time limit may be too short and a signal came from outside: a later attempt tries
    # again. An exit status the run chose (bad input) is its answer.
    if code is not None and code > 0:
      results.write_json_atomic(os.path.join(folder, POINT_FILE), outcome)
  return outcome


def _read_peaks(path: str) -> Optional[dict]:
  peaks = results.read_json_object(path)
  return peaks if peaks and "matmul_flops_per_s" in peaks else None


def run_peaks(output_dir: str, settings: Settings) -> dict:
  path = os.path.join(output_dir, RUNS_DIR, PEAKS_POINT, "peaks.json")
  if _read_peaks(path) is None:  # never measured, or damaged
    os.makedirs(os.path.dirname(path), exist_ok=True)
    args = ["--output", path] + (["--backend", settings.backend] if settings.backend else [])
    proc = subprocess.run([sys.executable, "-m", "fathom_jax.peaks", *args],
                          capture_output=True, text=True, env=_environment())
    if proc.returncode != 0:
      raise UsageError(f"measuring the machine's peaks failed: "
                       f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
  return _read_peaks(path)


def _check_settings(output_dir: str, settings: Settings) -> None:
  """A study folder keeps one set of settings: resuming with others would mix incomparable runs."""
  path = os.path.join(output_dir, STUDY_FILE)
  if not os.path.exists(path):
    return
  try:
    with open(path) as f:
      saved = json.load(f)["settings"]
  except (OSError, ValueError, KeyError):
    raise UsageError(f"{path} is not a study file; choose another --output_dir") from None
  mine = json.loads(json.dumps(dataclasses.asdict(settings)))
  changed = sorted(k for k in mine if saved.get(k) != mine[k])
  if changed:
    raise UsageError(f"{output_dir} holds a study with other settings ({', '.join(changed)}); "
                     "rerun with the same flags to resume it, or choose another --output_dir")


def execute(output_dir: str, settings: Settings, argv: Sequence[str], timeout_s: float = 3600,
            say=print) -> dict:
  """Runs every unfinished point, then writes the report. Returns {point id: outcome}."""
  os.makedirs(output_dir, exist_ok=True)
  with locked(output_dir):
    return _execute(output_dir, settings, argv, timeout_s, say)


def _execute(output_dir: str, settings: Settings, argv: Sequence[str], timeout_s: float,
             say) -> dict:
  _check_settings(output_dir, settings)
  points = plan(settings)
  study_file = {
      "settings": dataclasses.asdict(settings),
      "command": " ".join(["python -m fathom_jax.study", *map(shlex.quote, argv)]),
      "points": {p.id: shown(p.arguments(settings)) for p in points},
      # Points run again because the files of their earlier run were damaged.
      "redone_after_damage": _earlier_redone(output_dir),
  }
  results.write_json_atomic(os.path.join(output_dir, STUDY_FILE), study_file)
  run_peaks(output_dir, settings)
  measuring = measuring_points(settings)
  # Each measuring point's folder read once: its outcome so far, and whether it is damaged.
  found = {p.id: scan_point(point_dir(output_dir, p.id)) for p in points
           if measuring[p.id] == p.id}
  todo = {point_id for point_id, (outcome, _) in found.items() if outcome is None}
  outcomes = {}
  spent: list[float] = []  # seconds of each point run by this call

  def left() -> str:
    """The time the points still to run will take at the mean pace so far."""
    if not spent or not todo:
      return ""
    seconds = sum(spent) / len(spent) * len(todo)
    return (f"; {len(todo)} to run, about "
            + (f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min") + " left")

  for i, point in enumerate(points):
    if measuring[point.id] != point.id:
      outcomes[point.id] = outcome = outcomes[measuring[point.id]]
      say(f"[{i + 1}/{len(points)}] {point.id}: {outcome['status']}, the run of "
          f"{measuring[point.id]}")
      continue
    outcome, damaged = found[point.id]
    if damaged:
      say(f"[{i + 1}/{len(points)}] {point.id}: its earlier run's files are damaged; running "
          "it again")
      study_file["redone_after_damage"] = sorted(
          set(study_file["redone_after_damage"]) | {point.id})
      results.write_json_atomic(os.path.join(output_dir, STUDY_FILE), study_file)
    if outcome is not None:
      say(f"[{i + 1}/{len(points)}] {point.id}: {outcome['status']} earlier, kept")
    else:
      start = time.perf_counter()
      outcome = run_point(output_dir, point, settings, timeout_s)
      spent.append(time.perf_counter() - start)
      todo.discard(point.id)
      error = f": {outcome['error']}" if outcome["status"] != "completed" else ""
      say(f"[{i + 1}/{len(points)}] {point.id}: {outcome['status']} in "
          f"{spent[-1]:.1f} s{error}{left()}")
    outcomes[point.id] = outcome
  from fathom_jax.study import report
  path = report.build(output_dir)
  say(f"report: {path}")
  return outcomes
