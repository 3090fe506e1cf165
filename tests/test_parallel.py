"""Data parallelism on several virtual CPU devices, and a two-process run on localhost."""

import json
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in a fresh interpreter: the device count must be set before JAX starts its CPU backend.
_SCRIPT = """
import json, sys
import jax
jax.config.update("jax_num_cpu_devices", 4)
from fathom_jax import model_steps, placement, runner
from fathom_jax.tuned import updates
out = {}
default_min_bytes = updates.ORDERED_UPDATES_MIN_BYTES
for workload in sys.argv[1].split(","):
  for n, ordered in ((1, ""), (4, ""), (4, "/ordered")):
    updates.ORDERED_UPDATES_MIN_BYTES = 0 if ordered else default_min_bytes
    spec = runner.RunSpec(workload, preset="tiny", batch_size=8, steps=3, warmup_steps=0,
                          output_dir=None, quiet=True, num_devices=n)
    out[f"{workload}/{n}{ordered}"] = runner.execute(spec)["figures"]["losses"]
updates.ORDERED_UPDATES_MIN_BYTES = default_min_bytes
res = runner.resolve(runner.RunSpec("memnet", batch_size=8))
mesh = placement.make_placement(jax.devices(), 2, 8)
batch = placement.place_batch(next(res.source.batches(8, seed=0, train=True)), mesh)
state = jax.jit(model_steps.init_train_state, static_argnums=0, out_shardings=mesh.replicated)(
    res.model, jax.random.key(0), batch)
hlo = jax.jit(model_steps.make_train_step(res.model)).lower(state, batch).compile().as_text()
out["all_reduces"] = hlo.count(" all-reduce(") + hlo.count(" all-reduce-start(")
print(json.dumps(out))
"""


def _run(*args, **kwargs):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
  return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                        timeout=300, **kwargs)


def test_one_and_four_devices_agree_and_gradients_are_all_reduced():
  proc = _run("-c", _SCRIPT, "memnet,autoenc")
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  for workload in ("memnet", "autoenc"):
    one = out[f"{workload}/1"]
    assert len(one) == 3
    for four in (out[f"{workload}/4"], out[f"{workload}/4/ordered"]):
      for a, b in zip(one, four):
        assert abs(a - b) <= 1e-4 * abs(a), (workload, one, four)
  assert out["all_reduces"] >= 1


def test_batch_must_divide_over_devices(tmp_path, forked_cli):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = forked_cli.run("run.py", "--workload=memnet", "--preset=tiny", "--cpu_devices=4",
                        "--batch_size=6", f"--output_dir={tmp_path}", env=env)
  assert proc.returncode == 2
  assert proc.stderr.strip() == "error: global batch 6 does not divide evenly over 4 devices"
  proc = forked_cli.run("run.py", "--workload=memnet", "--preset=tiny", "--num_devices=3",
                        f"--output_dir={tmp_path}", env=env)
  assert proc.returncode == 2 and "--num_devices must be between 1 and 1" in proc.stderr


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_process_run_on_localhost(tmp_path):
  port = _free_port()
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  procs = [
      subprocess.Popen(
          [sys.executable, os.path.join(ROOT, "run.py"), "--workload=memnet", "--preset=tiny",
           "--steps=3", f"--output_dir={tmp_path}", f"--coordinator_address=127.0.0.1:{port}",
           "--num_processes=2", f"--process_id={i}", "--quiet"],
          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
      for i in range(2)
  ]
  outputs = [p.communicate(timeout=300) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], [o[1][-1500:] for o in outputs]
  (run_dir,) = os.listdir(tmp_path)  # only process 0 writes
  record = json.load(open(tmp_path / run_dir / "result.json"))
  assert record["parallelism"]["num_processes"] == 2
  assert record["parallelism"]["num_devices"] == 2
  assert "loss" in outputs[0][0] and "== memnet" not in outputs[1][0]
