"""Faults and hostile input: one-line errors with the right exit status, whole files or none,
locked study folders, damaged files redone, and random flag values that never give a traceback."""

import errno
import json
import os
import signal
import string
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from fathom_jax import errors, results, runner, study
from fathom_jax.analysis import breakdown
from tests import records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "run.py")


def _one_line(proc, status=2):
  assert proc.returncode == status, (proc.returncode, proc.stderr)
  assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
  return proc.stderr


@pytest.mark.parametrize("args, message", [
    (["--workload=memnet,,autoenc"], "has an empty item"),
    (["--workload=memnet,memnet"], "names memnet more than once"),
    (["--steps=100000000000000000000"], "--steps must be at most 1,000,000,000"),
    (["--warmup_steps=100000000000000000000"], "--warmup_steps must be at most"),
    (["--seed=1180591620717411303424"], "--seed must fit in 64 bits"),
    (["--batch_size=100000000000000000000"], "--batch_size must be positive and at most"),
    (["--override=hops=100000000000000000000"], "must be a finite number of at most"),
    (["--cpu_devices=100000"], "--cpu_devices must be in [1, 256]"),
    (["--coordinator_address=localhost"], "--coordinator_address must be host:port"),
    (["--coordinator_address=localhost:0"], "--coordinator_address must be host:port"),
    (["--coordinator_address=localhost:99999"], "--coordinator_address must be host:port"),
    (["--coordinator_address=:1234"], "--coordinator_address must be host:port"),
    (["--output_dir=/proc/fathom-jax-runs"], "cannot be written"),
])
def test_bad_input_at_the_edge(args, message, tmp_path, forked_cli):
  base = ["--workload=memnet", "--preset=tiny", f"--output_dir={tmp_path / 'runs'}"]
  proc = forked_cli.run(RUN, *base, *args)
  assert message in _one_line(proc)
  assert not (tmp_path / "runs").exists()


def test_output_folders_that_are_files_or_under_files(tmp_path, forked_cli):
  afile = tmp_path / "afile"
  afile.write_text("x")
  for path, message in ((afile, "is a file, not a folder"), (afile / "runs", "which is a file")):
    for command in ((RUN, "--workload=memnet", "--preset=tiny"),
                    ("-m", "fathom_jax.study", "--workloads=memnet")):
      proc = forked_cli.run(*command, f"--output_dir={path}")
      assert message in _one_line(proc), command
    proc = forked_cli.run("-m", "fathom_jax.analysis", "diff", str(tmp_path), str(tmp_path),
                          f"--output_dir={path}")
    assert message in _one_line(proc)
    proc = forked_cli.run("-m", "fathom_jax.peaks", f"--output={path / 'peaks.json'}")
    assert _one_line(proc)
  assert afile.read_text() == "x"


@pytest.mark.parametrize("error, status, words", [
    (OSError(errno.ENOSPC, "No space left on device", "/x/result.json"), 1,
     "error: no space left on the device: /x/result.json"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/data/qa1_train.txt"), 2,
     "error: is a directory: /data/qa1_train.txt"),
    (OSError(errno.EFBIG, "File too large", "/x/ops.csv"), 1, "error: file too large"),
    (OSError(errno.EACCES, "Permission denied", "/x"), 1, "error: permission denied: /x"),
    (MemoryError(), 1, "error: out of memory"),
    (errors.UsageError("--steps must be positive"), 2, "error: --steps must be positive"),
    (errors.Terminated(), 143, "terminated"),
    (KeyboardInterrupt(), 130, "interrupted"),
    (ValueError("something nobody foresaw\nsecond line"), 1,
     "error: ValueError: something nobody foresaw (--debug"),
])
def test_every_failure_is_one_line_with_its_status(error, status, words, capsys, monkeypatch):
  monkeypatch.delenv("FATHOM_JAX_DEBUG", raising=False)
  with pytest.raises(SystemExit) as exit_:
    with errors.one_line_errors():
      raise error
  assert exit_.value.code == status
  err = capsys.readouterr().err
  assert err.startswith(words) and err.count("\n") == 1 and "Traceback" not in err, err
  # A full disk is never reported as memory.
  assert "memory" not in err or isinstance(error, MemoryError)


@pytest.mark.parametrize("message, number, path", [
    ("RESOURCE_EXHAUSTED: /r/plugins/profile/s/vm.xplane.pb; No space left on device",
     errno.ENOSPC, "/r/plugins/profile/s/vm.xplane.pb"),
    ("INTERNAL: Permission denied", errno.EACCES, None),
    ("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 8.00GiB", None, None),
])
def test_a_native_libraries_file_error_is_read_as_one(message, number, path):
  """XLA's profiler reports a full disk as RESOURCE_EXHAUSTED, the status memory exhaustion has
  too: the C library's text tells them apart."""
  cause = errors.os_error_in(message)
  assert (cause.errno, cause.filename) == (number, path) if number else cause is None


def _can_mount_a_tmpfs() -> bool:
  try:
    return subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k t /mnt"],
                          capture_output=True, timeout=30).returncode == 0
  except (OSError, subprocess.SubprocessError):
    return False


# Lists the small file system before its namespace ends: one JSON line per file.
_LIST_FILES = """
import json, os, sys
for folder, _, names in os.walk(sys.argv[1]):
  for name in names:
    path = os.path.join(folder, name)
    text = open(path, errors="replace").read() if name.endswith(".json") else None
    print(json.dumps({"path": path, "size": os.path.getsize(path), "json": text}))
"""


@pytest.mark.skipif(not _can_mount_a_tmpfs(),
                    reason="needs unshare and mount in a user namespace for a small tmpfs")
@pytest.mark.parametrize("size, where, trace_kept", [("600k", "xplane.pb", False),
                                                     ("840k", "", True)])
def test_a_small_file_system_fills_during_a_profiled_run(size, where, trace_kept, tmp_path):
  """A real full disk (a tmpfs in a mount namespace of the test's own): the profiler's trace
  (XLA writes it) or the analysis after it (ours) meets ENOSPC. One line naming the cause,
  exit 1, and every file left in the run folder is whole."""
  mount = tmp_path / "small"
  mount.mkdir()
  script = tmp_path / "list_files.py"
  script.write_text(_LIST_FILES)
  commands = (f"mount -t tmpfs -o size={size} t {mount} || exit 99; "
              f"{sys.executable} {os.path.join(ROOT, 'run.py')} --workload=memnet --preset=tiny "
              f"--profile --steps=2 --warmup_steps=0 --quiet --output_dir={mount}/runs "
              f">/dev/null; echo $? >&2; {sys.executable} {script} {mount}")
  proc = subprocess.run(["unshare", "-rm", "sh", "-c", commands], capture_output=True,
                        text=True, timeout=300)
  line, status = proc.stderr.strip().splitlines()
  assert status == "1" and line.startswith("error: no space left on the device: "), proc.stderr
  assert where in line
  files = [json.loads(l) for l in proc.stdout.splitlines()]
  assert files and not [f for f in files if os.path.basename(f["path"]).startswith(".")]
  traces = [f for f in files if f["path"].endswith(".xplane.pb")]
  assert bool(traces) == trace_kept and all(f["size"] > 0 for f in traces)
  for f in files:  # every file whole: the JSON files parse
    if f["json"] is not None:
      record = json.loads(f["json"])
      if f["path"].endswith(results.RESULT_FILE):
        assert record["status"] == "failed" and "no space left" in record["error"]


def test_debug_shows_the_traceback(capsys, monkeypatch):
  monkeypatch.setenv("FATHOM_JAX_DEBUG", "1")
  with pytest.raises(SystemExit):
    with errors.one_line_errors():
      raise ValueError("boom")
  assert "Traceback" in capsys.readouterr().err


def test_a_full_disk_mid_run_leaves_no_partial_file(tmp_path, monkeypatch):
  """The disk fills while the run writes its result: the write fails whole, nothing half
  written stays, and the error names the cause."""
  real_fdopen = os.fdopen

  class Full:
    def __init__(self, f):
      self.f = f

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      self.f.close()

    def write(self, text):
      self.f.write(text[:10])
      raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
      return getattr(self.f, name)

  monkeypatch.setattr(results.os, "fdopen", lambda fd, mode="r": Full(real_fdopen(fd, mode)))
  spec = runner.RunSpec("memnet", preset="tiny", steps=1, warmup_steps=0,
                        output_dir=str(tmp_path), quiet=True)
  with pytest.raises(OSError) as e:
    runner.execute(spec)
  assert e.value.errno == errno.ENOSPC
  assert errors.describe_os_error(e.value).startswith("no space left on the device: ")
  assert e.value.filename.endswith("result.json")
  (run_dir,) = os.listdir(tmp_path)
  assert os.listdir(tmp_path / run_dir) == []  # no result.json, no temporary


def test_a_study_folder_is_locked_while_a_study_works_in_it(tmp_path, forked_cli):
  folder = str(tmp_path / "study")
  os.makedirs(folder)
  with study.locked(folder):
    proc = forked_cli.run("-m", "fathom_jax.study", "--workloads=memnet", "--preset=tiny",
                          f"--output_dir={folder}")
    assert f"is in use by another study (pid {os.getpid()})" in _one_line(proc)
  with study.locked(folder):  # released with its holder
    pass


def test_a_damaged_breakdown_makes_its_point_run_again(tmp_path):
  point = tmp_path / "runs" / "suite-memnet-train"
  run_dir = point / "20261207-000000-memnet-train-tiny-000000"
  os.makedirs(run_dir)
  record = records.valid_record()
  record["spec"]["profile"] = True
  results.write_json_atomic(str(run_dir / results.RESULT_FILE), record)
  results.write_json_atomic(str(run_dir / breakdown.BREAKDOWN_FILE), {"coverage": 0.9})
  assert study.point_outcome(str(point))["run_dir"] == str(run_dir)
  with open(run_dir / breakdown.BREAKDOWN_FILE, "r+") as f:
    f.truncate(5)
  assert study.point_outcome(str(point)) is None


_WORDS = st.text(alphabet=string.ascii_letters + string.digits + ",._-/ :=", max_size=30)
_HUGE = st.one_of(st.integers(max_value=0), st.integers(min_value=10**10))
_FLAGS = st.one_of(
    st.builds(lambda v: f"--workload={v}", _WORDS.filter(lambda v: not _names_valid_workloads(v))),
    st.builds(lambda v: f"--preset={v}", _WORDS.filter(lambda v: v not in ("paper", "small",
                                                                           "tiny"))),
    st.builds(lambda v: f"--mode={v}", _WORDS),
    st.builds(lambda v: f"--dtype={v}", _WORDS),
    st.builds(lambda v: f"--backend={v}", _WORDS),
    st.builds(lambda v: f"--steps={v}", _HUGE),
    st.builds(lambda v: f"--batch_size={v}", _HUGE),
    st.builds(lambda v: f"--cpu_devices={v}", _HUGE),
    st.builds(lambda v: f"--seed={v}", st.integers(min_value=2**63)),
    st.builds(lambda v: f"--override={v}", _WORDS),
    st.builds(lambda v: f"--coordinator_address={v}", _WORDS.filter(
        lambda v: not (":" in v and v.rsplit(":", 1)[1].isdigit()))),
    st.builds(lambda v: f"--data={v}", _WORDS.filter(lambda v: v != "synthetic")),
    st.builds(lambda v: f"--component_depth={v}", _WORDS.filter(
        lambda v: v not in ("model", "block", "layer", "full") and not v.isdigit())),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flag=_FLAGS)
def test_random_bad_flags_never_give_a_traceback(flag, tmp_path, forked_cli):
  args = ["--workload=memnet", "--preset=tiny", f"--output_dir={tmp_path / 'runs'}", flag]
  if flag.startswith("--coordinator_address"):
    args.append("--num_processes=2")
  proc = forked_cli.run(RUN, *args)
  _one_line(proc)


def _children(pid: int) -> list[int]:
  try:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
      return [int(p) for p in f.read().split()]
  except OSError:
    return []


def _alive(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().split(")")[-1].split()[0] != "Z"
  except OSError:
    return False


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="reads /proc (Linux)")
@pytest.mark.parametrize("sig, status", [(signal.SIGKILL, -9), (signal.SIGTERM, 143)])
def test_a_studys_runs_die_with_it(sig, status, tmp_path):
  folder = tmp_path / "study"
  proc = subprocess.Popen(
      [sys.executable, "-m", "fathom_jax.study", "--workloads=memnet", "--preset=tiny",
       "--steps=2000000", "--warmup_steps=0", "--fusion_workloads=none",
       "--thread_workloads=none", "--device_workloads=none", "--implementation_workloads=none",
       f"--output_dir={folder}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True)
  deadline = time.time() + 120
  runs = []
  while not runs and time.time() < deadline:  # the first point's run has started
    runs = [c for c in _children(proc.pid) if "fathom_jax\0--workload" in
            open(f"/proc/{c}/cmdline").read()] if _alive(proc.pid) else []
    time.sleep(0.2)
  assert runs, proc.communicate()[1][-2000:]
  time.sleep(2)
  proc.send_signal(sig)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == status, err
  if sig == signal.SIGTERM:
    assert err.startswith("terminated") and err.count("\n") == 1 and "Traceback" not in err, err
  deadline = time.time() + 30
  while any(_alive(r) for r in runs) and time.time() < deadline:
    time.sleep(0.2)
  assert not any(_alive(r) for r in runs)  # no orphan measures beside a resumed study


def _names_valid_workloads(value: str) -> bool:
  from fathom_jax.workloads import registry
  return value.strip() in ("all", "none") or all(
      part.strip() in registry.available() for part in value.split(","))


def _positive_ints(value: str) -> bool:
  return all(part.strip().isdigit() and int(part) > 0 for part in value.split(","))


_STUDY_FLAGS = st.one_of(
    st.builds(lambda v: f"--workloads={v}", _WORDS.filter(
        lambda v: not _names_valid_workloads(v))),
    st.builds(lambda v: f"--preset={v}", _WORDS.filter(lambda v: v not in ("paper", "small",
                                                                           "tiny"))),
    st.builds(lambda v: f"--steps={v}", st.integers(max_value=0)),
    st.builds(lambda v: f"--thread_counts={v}", _WORDS.filter(
        lambda v: v.strip() and not _positive_ints(v))),
    st.builds(lambda v: f"--device_counts={v}", _WORDS.filter(
        lambda v: v.strip() and not _positive_ints(v))),
    st.builds(lambda v: f"--fusion_workloads={v}", _WORDS.filter(
        lambda v: not _names_valid_workloads(v) or v.strip() not in ("all", "none", "memnet"))),
    st.builds(lambda v: f"--backend={v}", _WORDS),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flag=_STUDY_FLAGS)
def test_random_bad_study_flags_never_give_a_traceback(flag, tmp_path, forked_cli):
  proc = forked_cli.run("-m", "fathom_jax.study", "--workloads=memnet", "--preset=tiny",
                        f"--output_dir={tmp_path / 'study'}", flag, cwd=ROOT)
  _one_line(proc)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(args=st.lists(_WORDS, min_size=0, max_size=3), command=st.sampled_from(["breakdown", "diff"]))
def test_random_analysis_arguments_never_give_a_traceback(args, command, tmp_path, forked_cli):
  proc = forked_cli.run("-m", "fathom_jax.analysis", command, *[f"{tmp_path}/{a}" for a in args],
                        f"--output_dir={tmp_path / 'out'}", cwd=str(tmp_path))
  _one_line(proc)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flag=st.one_of(st.builds(lambda v: f"--dtype={v}", _WORDS),
                      st.builds(lambda v: f"--backend={v}", _WORDS.filter(lambda v: v != "cpu")),
                      st.builds(lambda v: f"--output=/proc/{v}", _WORDS)))
def test_random_peaks_flags_never_give_a_traceback(flag, forked_cli):
  proc = forked_cli.run("-m", "fathom_jax.peaks", flag)
  _one_line(proc)


def test_a_data_path_of_the_wrong_kind_is_the_users_error(tmp_path, forked_cli):
  (tmp_path / "babi" / "qa1_train.txt").mkdir(parents=True)  # a folder named as a file
  proc = forked_cli.run(RUN, "--workload=memnet", "--preset=tiny",
                        f"--data={tmp_path / 'babi'}", f"--output_dir={tmp_path / 'runs'}")
  assert "is a directory: " in _one_line(proc) and "qa1_train.txt" in proc.stderr
  assert not (tmp_path / "runs").exists()
