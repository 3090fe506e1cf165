"""A profiled run end to end: trace, HLO, analyses and the op breakdown in the run folder."""

import collections
import csv
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

from fathom_jax import cli, profiling
from fathom_jax.analysis import breakdown, categories, trace
from fathom_jax.errors import DataError


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
  """(result record, run folder) of a profiled run.py run, in a process of its own: a trace
  embeds the HLO of every program its process compiled, and this one's should be its own."""
  out = tmp_path_factory.mktemp("runs")
  # A tiny model at a batch large enough that the ops, not Python dispatch, fill the step.
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "run.py"), "--workload=memnet", "--preset=tiny",
       "--batch_size=4096", "--steps=4", "--warmup_steps=1", f"--output_dir={out}", "--profile",
       "--quiet"], capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  (run_dir,) = glob.glob(os.path.join(out, "*"))
  with open(os.path.join(run_dir, "result.json")) as f:
    return json.load(f), run_dir


def test_run_folder_layout(profiled):
  record, run_dir = profiled
  assert record["status"] == "completed" and record["spec"]["profile"] is True
  # TensorBoard's profile plugin reads <logdir>/plugins/profile/<session>/<host>.xplane.pb.
  assert len(glob.glob(os.path.join(run_dir, "plugins", "profile", "*", "*.xplane.pb"))) == 1
  assert not [n for n in os.listdir(run_dir) if n.startswith(".")]  # no temporary left
  hlo_dir = os.path.join(run_dir, profiling.HLO_DIR)
  assert sorted(os.listdir(hlo_dir)) == ["jit_train_step.analysis.json",
                                         "jit_train_step.optimized.hlo.txt",
                                         "jit_train_step.unoptimized.hlo.txt"]
  analysis = json.load(open(os.path.join(hlo_dir, "jit_train_step.analysis.json")))
  assert analysis["cost_analysis"]["flops"] == record["figures"]["flops_per_step"]
  assert analysis["memory_analysis"]["temp_size_in_bytes"] >= 0
  assert open(os.path.join(hlo_dir, "jit_train_step.optimized.hlo.txt")).read().startswith(
      "HloModule jit_train_step")
  for name in (breakdown.OPS_FILE, breakdown.COMPONENT_FILE, breakdown.BREAKDOWN_FILE,
               breakdown.FIGURE_FILE):
    assert os.path.getsize(os.path.join(run_dir, name)) > 0
  # The result file is the one written at the end, with the breakdown's summary in it.
  summary = json.load(open(os.path.join(run_dir, breakdown.BREAKDOWN_FILE)))
  assert record["figures"]["profile"]["coverage"] == pytest.approx(summary["coverage"])


def test_a_trace_is_seen_only_once_the_profiler_finished_it(profiled, tmp_path):
  _, run_dir = profiled
  (session,) = glob.glob(os.path.join(run_dir, "plugins", "profile", "*"))
  (xplane,) = [n for n in os.listdir(session) if n.endswith(trace.XPLANE_SUFFIX)]
  # The profiler's folder of a run killed while it wrote: a cut trace in a newer session.
  cut = os.path.join(tmp_path, ".tmp-trace-x", "plugins", "profile", "2999_12_31_23_59_59")
  os.makedirs(cut)
  with open(os.path.join(session, xplane), "rb") as f, open(os.path.join(cut, xplane), "wb") as g:
    g.write(f.read(1000))
  with pytest.raises(DataError, match="no \\*.xplane.pb trace under this folder"):
    trace.find_xplanes(str(tmp_path))
  profiling.publish_trace(os.path.join(tmp_path, ".tmp-trace-x"), str(tmp_path))
  assert trace.find_xplanes(str(tmp_path)) == [
      os.path.join(tmp_path, "plugins", "profile", "2999_12_31_23_59_59", xplane)]


def test_step_times_with_and_without_profiling(profiled):
  record, _ = profiled
  f = record["figures"]
  p = f["profile"]
  assert len(f["step_times_s"]) == 4 and len(p["step_times_s"]) == 4
  assert p["step_time_s"]["median"] > 0
  assert p["overhead"] == pytest.approx(
      p["step_time_s"]["median"] / f["step_time_s"]["median"] - 1)
  # Page faults of a profiled step, and whether large blocks were mapped afresh meanwhile.
  assert p["page_faults_per_step"] >= 0
  assert p["large_blocks_returned"] is record["environment"]["host_memory_reused"]


def test_breakdown_covers_the_step_and_adds_up(profiled):
  record, run_dir = profiled
  summary = json.load(open(os.path.join(run_dir, breakdown.BREAKDOWN_FILE)))
  # A step slower than STALLED_STEP_FACTOR times the median (noise on a busy machine) is left
  # out of the averages and listed; the others are the steps the breakdown reports.
  assert summary["steps"] + len(summary["stalled_steps_left_out"]) == 4
  assert summary["step_source"] == "step annotations"
  assert summary["coverage"] >= 0.8, summary["coverage"]
  assert summary["unmatched_share"] == 0
  for key in ("by_class", "by_xla_category"):
    total = sum(v["share_of_step"] for v in summary[key].values())
    assert total == pytest.approx(summary["coverage"], rel=1e-9)
  classes = summary["by_class"]
  assert set(classes) <= set(categories.CLASSES)
  # Adam's update is found by its scope, the key split by its random-bits primitive.
  assert classes[categories.OPTIMIZATION]["time_s"] > 0
  assert classes[categories.RANDOM]["time_s"] > 0
  assert record["figures"]["profile"]["class_shares"] == pytest.approx(
      {k: v["share_of_step"] for k, v in classes.items()})


def test_ops_table(profiled):
  _, run_dir = profiled
  rows = list(csv.DictReader(open(os.path.join(run_dir, breakdown.OPS_FILE))))
  summary = json.load(open(os.path.join(run_dir, breakdown.BREAKDOWN_FILE)))
  assert sum(float(r["total_time_us"]) for r in rows) * 1e-6 == pytest.approx(
      summary["covered_time_s"], rel=1e-6)
  steps = summary["steps"]  # those not left out as stalled
  step = [r for r in rows if r["program"].startswith("jit_train_step(")]
  assert step and all(int(r["occurrences"]) % steps == 0 for r in step)  # once a step, or loops
  assert any(r["source"].endswith(os.path.join("workloads", "memnet.py") + ":" +
                                  r["source"].rsplit(":", 1)[-1]) for r in step)
  assert {r["fathom_class"] for r in step} >= {categories.MATRIX, categories.ELEMENTWISE}
  # FLOPs per step of what the trace shows executing match the cost model's count for the
  # program with every loop iteration (the condition runs once more than the body: rel 1e-3).
  executed = sum(float(r["flops"]) * int(r["occurrences"]) for r in step) / steps
  assert executed == pytest.approx(summary["flops_per_step_executed"], rel=1e-9)
  assert executed == pytest.approx(summary["model_flops_per_step"], rel=1e-3)


def test_time_by_model_component(profiled):
  _, run_dir = profiled
  summary = json.load(open(os.path.join(run_dir, breakdown.BREAKDOWN_FILE)))
  parts = summary["by_component"]
  assert summary["component_depth"] == 3  # the run's default: layer
  # Components share out the covered time, and each splits into the classes it holds.
  assert sum(v["share_of_step"] for v in parts.values()) == pytest.approx(summary["coverage"])
  for v in parts.values():
    assert sum(v["by_class_s"].values()) == pytest.approx(v["time_per_step_s"], rel=1e-9)
  by_pass = collections.Counter()
  for v in parts.values():
    by_pass[v["pass"]] += v["time_per_step_s"]
  # MemN2N's forward and backward passes, and Adam's update under its scope (no pass).
  assert by_pass["forward"] > 0 and by_pass["backward"] > 0
  optimizer = [v for v in parts.values() if v["component"] == "fathom.optimization"]
  assert optimizer and optimizer[0]["pass"] == "" and optimizer[0]["by_class_s"] == {
      categories.OPTIMIZATION: pytest.approx(optimizer[0]["time_per_step_s"])}
  assert any(v["component"].startswith("MemN2N") for v in parts.values())
  # FLOPs per step by component add up to the executed ops' count.
  assert sum(v["flops_per_step"] for v in parts.values()) == pytest.approx(
      summary["flops_per_step_executed"], rel=1e-6)
  rows = list(csv.DictReader(open(os.path.join(run_dir, breakdown.COMPONENT_FILE))))
  assert [(r["component"], r["pass"]) for r in rows] == [
      (v["component"], v["pass"]) for v in parts.values()]
  # ops.csv keeps each op's whole paths, from which any depth can be summed again.
  ops = list(csv.DictReader(open(os.path.join(run_dir, breakdown.OPS_FILE))))
  assert all(r["components"] for r in ops)


def test_breakdown_command_at_another_depth(profiled, tmp_path):
  from fathom_jax.analysis import __main__ as command
  _, run_dir = profiled
  assert command.main(["breakdown", run_dir, f"--output_dir={tmp_path}",
                       "--component_depth=model"]) == 0
  summary = json.load(open(tmp_path / breakdown.BREAKDOWN_FILE))
  assert summary["component_depth"] == 1
  assert all("/" not in v["component"] for v in summary["by_component"].values())


@pytest.mark.parametrize("flag", ["--component_depth=0", "--component_depth=deep"])
def test_bad_component_depth_is_one_line(flag, tmp_path, forked_cli):
  proc = forked_cli.run("-m", "fathom_jax.analysis", "breakdown", str(tmp_path), flag)
  assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
  assert "component depth must be one of" in proc.stderr
  proc = forked_cli.run(os.path.join(ROOT, "run.py"), "--workload=memnet", "--preset=tiny",
                        "--profile", flag, f"--output_dir={tmp_path}")
  assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
  assert "component depth must be one of" in proc.stderr and os.listdir(tmp_path) == []


def test_breakdown_command_reproduces_the_run(profiled, tmp_path, capsys):
  from fathom_jax.analysis import __main__ as command
  _, run_dir = profiled
  assert command.main(["breakdown", run_dir, f"--output_dir={tmp_path}"]) == 0
  again = json.load(open(tmp_path / breakdown.BREAKDOWN_FILE))
  first = json.load(open(os.path.join(run_dir, breakdown.BREAKDOWN_FILE)))
  share = lambda s: {k: v["share_of_step"] for k, v in s["by_class"].items()}
  assert share(again) == pytest.approx(share(first))
  assert again["coverage"] == pytest.approx(first["coverage"])
  assert "note:" not in capsys.readouterr().out


def test_breakdown_of_an_interrupted_run_says_so(profiled, tmp_path, capsys):
  from fathom_jax.analysis import __main__ as command
  record, run_dir = profiled
  copy = tmp_path / "run"
  shutil.copytree(run_dir, copy)
  (copy / "result.json").write_text(json.dumps(
      {**record, "status": "interrupted", "error": "interrupted by the user"}))
  assert command.main(["breakdown", str(copy)]) == 0
  first = capsys.readouterr().out.splitlines()[0]
  assert first == (f"note: the run in {copy} is interrupted (interrupted by the user); the "
                   "breakdown covers the steps its trace holds")


def test_profile_flag():
  try:
    cli.parse_flags(["run.py", "--workload=memnet", "--profile"])
    (spec,) = cli.specs_from_flags()
    assert spec.profile is True
    cli.parse_flags(["run.py", "--workload=memnet", "--noprofile"])
    assert cli.specs_from_flags()[0].profile is False
  finally:
    cli.FLAGS.unparse_flags()
