"""The command line end to end: a real run writes a valid result; bad input exits 2 in one line."""

import json
import os
import subprocess
import sys

import pytest

from fathom_jax import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, cwd=None):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, os.path.join(ROOT, "run.py"), *args],
                        capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def refused(forked_cli, *args):
  """run.py with `args`, for a command that must stop before it computes (tests/forked_cli.py)."""
  return forked_cli.run(os.path.join(ROOT, "run.py"), *args,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_tiny_run_writes_valid_result(tmp_path, forked_cli):
  out = tmp_path / "runs"
  proc = refused(forked_cli, "--workload=memnet,autoenc", "--preset=tiny", "--mode=both", "--steps=3",
                 "--warmup_steps=1", f"--output_dir={out}", "--override=embed_dim=4")
  # embed_dim is not an autoenc field: resolved before anything runs, so nothing is written.
  assert proc.returncode == 2 and "unknown config field 'embed_dim'" in proc.stderr
  assert not out.exists() or not os.listdir(out)

  proc = run_cli("--workload=memnet,autoenc", "--preset=tiny", "--mode=both", "--steps=3",
                 "--warmup_steps=1", f"--output_dir={out}", "--seed=7")
  assert proc.returncode == 0, proc.stderr
  run_dirs = sorted(os.listdir(out))
  assert len(run_dirs) == 4
  records = [json.load(open(out / d / "result.json")) for d in run_dirs]
  by_key = {(r["workload"], r["mode"]): r for r in records}
  assert set(by_key) == {(w, m) for w in ("memnet", "autoenc") for m in ("train", "infer")}
  train = by_key[("memnet", "train")]
  assert train["schema_version"] == 1 and train["status"] == "completed"
  # The CPU runs the tuned implementation unless told otherwise, and says so.
  assert {r["implementation"] for r in records} == {"tuned"}
  assert proc.stdout.count(", cpu, tuned) ==") == 4
  assert train["config"]["batch_size"] == 8 and train["spec"]["seed"] == 7
  assert train["environment"]["backend"] == "cpu" and train["environment"]["jax"]
  assert train["environment"]["host_memory_reused"] is False  # auto: small steps
  # run.py starts again once, with glibc's malloc asking for huge pages, where glibc has them.
  assert train["environment"]["huge_pages"] is (host_memory._glibc_version() >= (2, 35))
  f = train["figures"]
  assert len(f["step_times_s"]) == 3 and len(f["losses"]) == 3
  assert f["step_time_s"]["p10"] <= f["step_time_s"]["median"] <= f["step_time_s"]["p90"]
  assert f["compile_time_s"] > 0 and f["flops_per_step"] > 0 and f["examples_per_s"] > 0
  assert "step time" in proc.stdout and "compile" in proc.stdout
  # Each phase says what it is doing and how long it took, before the steps.
  for phase in ("compiling the train step", "compiled in", "first batch ready in",
                "train state initialised in", "compiling the inference step",
                "parameters initialised in"):
    assert phase in proc.stdout, phase
  assert f["data_time_s"] > 0 and f["init_time_s"] > 0
  assert not [n for d in run_dirs for n in os.listdir(out / d) if n.startswith(".tmp")]


def test_flagfile_and_batch_size(tmp_path):
  flagfile = tmp_path / "flags.txt"
  flagfile.write_text(f"--workload=autoenc\n--preset=tiny\n--steps=2\n--batch_size=5\n"
                      f"--output_dir={tmp_path / 'runs'}\n--quiet\n--host_memory=keep\n"
                      "--implementation=reference\n")
  proc = run_cli(f"--flagfile={flagfile}")
  assert proc.returncode == 0, proc.stderr
  (run_dir,) = os.listdir(tmp_path / "runs")
  record = json.load(open(tmp_path / "runs" / run_dir / "result.json"))
  assert record["config"]["batch_size"] == 5 and record["implementation"] == "reference"
  assert "warm-up" not in proc.stdout  # --quiet keeps only the summary
  assert record["environment"]["host_memory_reused"] is sys.platform.startswith("linux")


def test_paper_size_image_runs_keep_freed_host_memory(tmp_path):
  # residual declares large host buffers: at the paper preset, auto keeps freed memory. (The
  # overrides give the paper preset the tiny preset's sizes and ResNet-18's depth, which compiles
  # in half the time: the choice goes by the preset.)
  proc = run_cli("--workload=residual", "--mode=infer", "--batch_size=1", "--steps=1",
                 "--override=image_size=32", "--override=base_width=4", "--override=num_classes=4",
                 "--override=depth=18",
                 "--warmup_steps=0", f"--output_dir={tmp_path}", "--quiet")
  assert proc.returncode == 0, proc.stderr
  (run_dir,) = os.listdir(tmp_path)
  record = json.load(open(tmp_path / run_dir / "result.json"))
  assert record["environment"]["host_memory_reused"] is sys.platform.startswith("linux")


@pytest.mark.parametrize("args, message", [
    (["--workload=resnet"], "unknown workload 'resnet'; workloads are:"),
    (["--workload=memnet", "--preset=huge"], "unknown preset 'huge'"),
    (["--workload=memnet", "--batch_size=0"], "--batch_size must be positive"),
    (["--workload=memnet", "--steps=0"], "--steps must be positive"),
    (["--workload=memnet", "--steps=ten"], "--steps"),
    (["--workload=memnet", "--mode=serve"], "--mode"),
    (["--workload=memnet", "--dtype=float16"], "--dtype"),
    (["--workload=memnet", "--backend=quantum"], "--backend"),
    (["--workload=memnet", "--backend=tpu"], "backend 'tpu' is not available"),
    (["--workload=memnet", "--data=/no/such/path"], "does not exist"),
    (["--workload=memnet", "--override=hops=0"], "must be positive"),
    (["--workload=memnet", "--override=hops"], "not of the form field=value"),
    (["--workload=memnet", "--override=hops=two"], "wants an integer"),
    (["--workload=memnet", "--no_such_flag=1"], "no_such_flag"),
    (["--workload=memnet", "extra"], "unexpected arguments"),
    (["--workload=,"], "--workload is empty"),
    (["--workload=memnet", "--warmup_steps=-1"], "--warmup_steps must be >= 0"),
    (["--workload=memnet", "--seed=x"], "--seed"),
    (["--workload=memnet", "--batch_size=-3"], "--batch_size must be positive"),
    (["--workload=memnet", "--override=nope=1"], "unknown config field 'nope'"),
    (["--workload=memnet", "--override=learning_rate=fast"], "wants a number"),
    (["--workload=memnet", "--cpu_devices=0"], "--cpu_devices must be in [1, 256]"),
    (["--workload=memnet", "--num_processes=0"], "--num_processes must be in [1, 1048576]"),
    (["--workload=memnet", "--num_processes=2", "--process_id=5"], "--process_id must be in"),
    (["--workload=memnet", "--profile=maybe"], "--profile"),
    (["--workload=memnet", "--bad_samples=ignore"], "--bad_samples"),
    (["--workload=memnet", "--preset="], "unknown preset ''"),
    (["--workload=memnet", "--host_memory=hoard"], "--host_memory"),
    (["--workload=memnet", "--implementation=fast"], "--implementation"),
    (["--workload=resnet", "--host_memory=auto"], "unknown workload 'resnet'"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, args, message, forked_cli):
  proc = refused(forked_cli, *args, f"--output_dir={tmp_path / 'runs'}")
  assert proc.returncode == 2, (proc.returncode, proc.stderr)
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and message in lines[0], proc.stderr
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "runs").exists()


def test_wrong_data_format_exits_2(tmp_path, forked_cli):
  bad = tmp_path / "story_train.txt"
  bad.write_text("this is not babi\n")
  proc = refused(forked_cli, "--workload=memnet", "--preset=tiny", f"--data={bad}",
                 f"--output_dir={tmp_path / 'runs'}")
  assert proc.returncode == 2
  assert "story_train.txt:1: malformed bAbI line" in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1


def test_real_data_run(tmp_path):
  from tests.test_memnet import BABI
  (tmp_path / "qa1_train.txt").write_text(BABI)
  proc = run_cli("--workload=memnet", "--preset=tiny", f"--data={tmp_path}", "--steps=2",
                 f"--output_dir={tmp_path / 'runs'}")
  assert proc.returncode == 0, proc.stderr
  (run_dir,) = os.listdir(tmp_path / "runs")
  record = json.load(open(tmp_path / "runs" / run_dir / "result.json"))
  assert record["data"]["kind"] == "real" and record["data"]["examples"] == 3
  assert record["config"]["vocab_size"] == 17


def test_corrupt_image_skipped_when_asked(tmp_path, forked_cli):
  from tests.test_images import write_folder
  root = write_folder(tmp_path / "images")
  (tmp_path / "images" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
  args = ("--workload=alexnet", "--preset=tiny", "--mode=infer", f"--data={root}", "--steps=2",
          "--warmup_steps=0", f"--output_dir={tmp_path / 'runs'}")
  proc = refused(forked_cli, *args)
  assert proc.returncode == 2 and "broken.jpg: cannot decode image" in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1
  proc = run_cli(*args, "--bad_samples=skip")
  assert proc.returncode == 0, proc.stderr
  assert "bad samples  1 skipped: " in proc.stdout and "broken.jpg" in proc.stdout
  records = [json.load(open(tmp_path / "runs" / d / "result.json"))
             for d in os.listdir(tmp_path / "runs")]
  (record,) = [r for r in records if r["status"] == "completed"]
  assert record["data"]["bad_samples"]["skipped"] == 1
  assert "broken.jpg: cannot decode image" in record["data"]["bad_samples"]["first"][0]
