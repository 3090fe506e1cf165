"""Failures are loud, precise and harmless: non-finite loss, memory exhausted, interruption."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fathom_jax import compiling, runner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _popen(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
  return subprocess.Popen([sys.executable, os.path.join(ROOT, "run.py"), *args],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _run(*args):
  proc = _popen(*args)
  out, err = proc.communicate(timeout=300)
  return proc.returncode, out, err


def _only_result(folder):
  (run_dir,) = os.listdir(folder)
  files = os.listdir(os.path.join(folder, run_dir))
  assert not [f for f in files if f.startswith(".tmp")]
  return json.load(open(os.path.join(folder, run_dir, "result.json")))


def test_nonfinite_loss_stops_the_run_and_is_recorded(tmp_path):
  code, _, err = _run("--workload=autoenc", "--preset=tiny", "--steps=5", "--warmup_steps=0",
                      "--override=learning_rate=1e30", f"--output_dir={tmp_path}")
  assert code == 1
  assert err.strip().startswith("error: autoenc: non-finite loss (nan) at step 2")
  assert "Traceback" not in err
  record = _only_result(tmp_path)
  assert record["status"] == "failed" and "step 2" in record["error"]
  assert record["figures"]["steps_completed"] == 2


def test_allow_nonfinite_continues(tmp_path):
  code, _, err = _run("--workload=autoenc", "--preset=tiny", "--steps=4", "--warmup_steps=0",
                      "--override=learning_rate=1e30", "--allow_nonfinite",
                      f"--output_dir={tmp_path}")
  assert code == 0, err
  record = _only_result(tmp_path)
  assert record["status"] == "completed"
  assert record["figures"]["steps_completed"] == 4
  assert record["figures"]["nonfinite_steps"] == [2, 3, 4]


def test_batch_too_large_for_memory_is_refused_before_compiling(tmp_path):
  code, out, err = _run("--workload=autoenc", "--preset=paper", "--batch_size=20000000",
                        f"--output_dir={tmp_path}")
  assert code == 1
  line, = err.strip().splitlines()
  assert line.startswith("error: out of memory: autoenc train at batch 20000000: by its shapes "
                         "the step needs at least ")
  assert "free; try a smaller --batch_size" in line
  assert "compiled in" not in out
  record = _only_result(tmp_path)
  assert record["status"] == "failed" and "compile_time_s" not in record["figures"]
  assert record["figures"]["memory_floor_bytes"] > 20000000 * 784 * 4  # the input alone


def test_the_compilers_memory_figure_refuses_what_the_shapes_let_through(monkeypatch):
  spec = runner.RunSpec(workload="memnet", steps=1, warmup_steps=0, output_dir=None, quiet=True)
  figures = runner.execute(spec)["figures"]
  floor, needed = figures["memory_floor_bytes"], compiling.bytes_needed(figures["compiled_memory"])
  assert 0 < floor < needed
  for free, expected in ((floor - 1, "by its shapes the step needs at least"),
                         ((floor + needed) // 2, "the compiler says the step needs")):
    monkeypatch.setattr(runner, "_available_bytes", lambda device, free=free: free)
    with pytest.raises(runner.RunFailed, match=expected):
      runner.execute(spec)


def _wait_for(proc, text: str, timeout: float = 120) -> None:
  deadline = time.time() + timeout
  for line in proc.stdout:
    if text in line:
      return
    assert time.time() < deadline, "timed out"
  raise AssertionError(f"process ended before printing {text!r}: {proc.stderr.read()[-2000:]}")


@pytest.mark.parametrize("sig, status, word", [(signal.SIGINT, 130, "interrupted"),
                                               (signal.SIGTERM, 143, "terminated")])
def test_ctrl_c_and_sigterm_write_an_interrupted_result(sig, status, word, tmp_path):
  proc = _popen("--workload=memnet", "--preset=tiny", "--steps=2000000", "--warmup_steps=1",
                f"--output_dir={tmp_path}")
  _wait_for(proc, "step 2/")
  time.sleep(0.5)
  proc.send_signal(sig)
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == status, err
  assert "Traceback" not in err and err.startswith(word) and err.count("\n") == 1, err
  record = _only_result(tmp_path)
  assert record["status"] == "interrupted"
  steps = record["figures"]["steps_completed"]
  assert 0 < steps < 2000000
  assert len(record["figures"]["losses"]) == steps == len(record["figures"]["step_times_s"])


def test_kill_9_leaves_no_partial_result(tmp_path):
  proc = _popen("--workload=memnet", "--preset=tiny", "--steps=2000000", "--warmup_steps=1",
                f"--output_dir={tmp_path}")
  _wait_for(proc, "step 2/")
  proc.kill()
  proc.communicate(timeout=60)
  (run_dir,) = os.listdir(tmp_path)
  assert os.listdir(tmp_path / run_dir) == []  # no result.json at all, rather than a broken one


def test_concurrent_runs_never_share_a_folder(tmp_path):
  procs = [_popen("--workload=memnet", "--preset=tiny", "--steps=2", f"--output_dir={tmp_path}",
                  "--quiet") for _ in range(3)]
  for p in procs:
    p.communicate(timeout=300)
    assert p.returncode == 0
  run_dirs = os.listdir(tmp_path)
  assert len(run_dirs) == 3
  for d in run_dirs:
    assert json.load(open(tmp_path / d / "result.json"))["status"] == "completed"


@pytest.mark.parametrize("phase", ["compile", "data", "init", "profile", "write"])
@pytest.mark.parametrize("sig, status, word", [(signal.SIGINT, 130, "interrupted"),
                                               (signal.SIGTERM, 143, "terminated")])
def test_a_signal_in_any_phase_is_one_line_and_leaves_whole_files(phase, sig, status, word,
                                                                 tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
         runner.PAUSE_VARIABLE: phase}
  proc = subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "run.py"), "--workload=memnet", "--preset=tiny",
       "--steps=2", "--warmup_steps=0", "--profile", f"--output_dir={tmp_path}"],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
  _wait_for(proc, f"paused at {phase}")
  proc.send_signal(sig)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == status, err
  assert "Traceback" not in err and err.startswith(word) and err.count("\n") == 1, err
  (run_dir,) = os.listdir(tmp_path)
  files = [os.path.join(d, f) for d, _, names in os.walk(tmp_path / run_dir) for f in names]
  assert not [f for f in files if os.path.basename(f).startswith(".tmp")], files
  record = _only_result(tmp_path)
  # Held while the result is written, a signal then comes after a completed run's result.
  assert record["status"] == ("completed" if phase == "write" else "interrupted")


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_while_xla_compiles_is_acted_on_after_it(sig, status, tmp_path):
  # Raised inside the compiler's call or a garbage-collection callback, a signal was lost (the
  # run went on) or crashed the runtime at exit; recorded, it ends the run after the compile.
  proc = _popen("--workload=seq2seq", "--preset=tiny", "--steps=2", f"--output_dir={tmp_path}")
  _wait_for(proc, "compiling the train step")
  time.sleep(0.3)
  proc.send_signal(sig)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == status, err
  assert "Traceback" not in err and err.count("\n") == 1, err
  assert _only_result(tmp_path)["status"] == "interrupted"
