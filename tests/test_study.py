"""The study on a small real suite: runs, resume, and the report's analyses."""

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from fathom_jax import study
from fathom_jax.analysis import scaling, similarity
from fathom_jax.study import report
from fathom_jax.errors import UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = study.Settings(
    workloads=("memnet", "autoenc"), preset="tiny", steps=3, warmup_steps=1,
    fusion_workloads=("memnet",), thread_workloads=("memnet",), thread_counts=(1, 2),
    device_workloads=("memnet",), device_counts=(1, 2), device_batch={"memnet": 8},
    implementation="tuned", implementation_workloads=("memnet",))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A study run to the end: 4 suite runs, memnet unfused and eager, at 1 and 2 CPUs, on 1 and
  2 devices, and as reference (as tuned is the suite's own train run)."""
  folder = str(tmp_path_factory.mktemp("study"))
  lines = []
  outcomes = study.execute(folder, SETTINGS, ["--test"], say=lines.append)
  return folder, outcomes, lines


def _csv(folder, name):
  with open(os.path.join(folder, report.TABLES, name), newline="") as f:
    return list(csv.DictReader(f))


def test_every_point_completes_and_the_report_has_every_section(finished):
  folder, outcomes, lines = finished
  assert len(outcomes) == len(study.plan(SETTINGS)) == 12
  # One line per point, with what is left: 11 runs (one point reads another's).
  progress = [l for l in lines if l.startswith("[")]
  assert len(progress) == 12 and "; 10 to run, about " in progress[0]
  assert "to run" not in progress[-1]
  assert {o["status"] for o in outcomes.values()} == {"completed"}, outcomes
  with open(os.path.join(folder, report.REPORT_FILE)) as f:
    text = f.read()
  for heading in ("## The suite", "## Training versus inference", "## Similarity",
                  "## Where the classes sit in each model",
                  "## Fused versus per-op execution", "## Which components changed",
                  "## CPU thread scaling",
                  "## Device scaling", "## What the breakdown found in XLA:CPU",
                  "## Roofline", "## Runs"):
    assert heading in text
  for name in ("breakdown", "dendrogram_train", "dendrogram_infer", "fusion", "threads",
               "devices", "implementations", "roofline"):
    path = os.path.join(folder, report.FIGURES, f"{name}.png")
    assert os.path.getsize(path) > 1000 and f"figures/{name}.png" in text
  # The machine, the versions and the commands that reproduce every run.
  assert "jax 0." in text and "python -m fathom_jax.study --test" in text
  assert text.count("`python run.py --workload=") == 12
  assert text.count("--quiet --execution=compiled --implementation=reference`") == 1
  # The suite's 4 runs, and the tuned point that reads the suite's train run.
  assert text.count("--quiet --execution=compiled --implementation=tuned`") == 5
  assert len(os.listdir(os.path.join(folder, study.RUNS_DIR))) == 12  # 11 runs and the peaks
  suite = _csv(folder, "suite.csv")
  assert {(r["workload"], r["mode"]) for r in suite} == {
      (w, m) for w in ("memnet", "autoenc") for m in ("train", "infer")}
  assert all(0 < float(r["coverage"]) <= 1 and float(r["step_ms"]) > 0 for r in suite)


def test_unfused_runs_more_kernels_and_no_fewer_classes(finished):
  folder = finished[0]
  rows = {r["execution"]: r for r in _csv(folder, "fusion.csv")}
  assert set(rows) == {"compiled", "unfused", "eager"}
  compiled, unfused = rows["compiled"], rows["unfused"]
  assert float(unfused["ops_per_step"]) > 2 * float(compiled["ops_per_step"])
  assert int(unfused["classes_present"]) >= int(compiled["classes_present"])
  # Fusion keeps intermediates out of memory: the unfused program moves more bytes.
  assert float(unfused["mb_moved_per_step"]) > float(compiled["mb_moved_per_step"])
  # Eager dispatch is slower than the compiled step and its ops explain less of it.
  assert float(rows["eager"]["step_ms"]) > float(compiled["step_ms"])
  assert float(rows["eager"]["coverage"]) < float(compiled["coverage"])


def test_each_models_largest_components_with_their_classes(finished):
  rows = _csv(finished[0], "component_kinds.csv")
  assert {(r["workload"], r["mode"]) for r in rows} == {
      (w, m) for w in ("memnet", "autoenc") for m in ("train", "infer")}
  memnet_train = [r for r in rows if (r["workload"], r["mode"]) == ("memnet", "train")]
  assert len(memnet_train) <= 5 and any(r["component"] == "MemN2N" for r in memnet_train)
  shares = [float(r["share_of_step"]) for r in memnet_train]
  assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1


def test_components_fusion_and_tuning_changed_are_named_with_intervals(finished):
  rows = _csv(finished[0], "component_diffs.csv")
  comparisons = {r["comparison"] for r in rows}
  assert "compiled -> unfused" in comparisons
  for r in rows:
    low, diff, high = (float(r[k]) for k in ("ci_low_ms", "diff_ms", "ci_high_ms"))
    assert low <= diff <= high and (low > 0 or high < 0)  # only intervals that exclude zero
    assert diff == pytest.approx(float(r["b_ms"]) - float(r["a_ms"]), rel=1e-6, abs=1e-9)
  # Unfused, the model's own layers take longer: its forward or backward pass is among them.
  unfused = [r for r in rows if r["comparison"] == "compiled -> unfused"]
  assert any(r["component"].startswith("MemN2N|") and float(r["diff_ms"]) > 0 for r in unfused)


def test_similarity_of_a_workload_to_itself_is_one(finished):
  folder = finished[0]
  for mode in ("train", "infer"):
    rows = _csv(folder, f"similarity_{mode}.csv")
    assert [r["workload"] for r in rows] == ["memnet", "autoenc"]
    matrix = np.array([[float(r[w]) for w in ("memnet", "autoenc")] for r in rows])
    np.testing.assert_allclose(np.diag(matrix), 1.0, atol=1e-9)
    np.testing.assert_allclose(matrix, matrix.T, atol=1e-12)
    assert 0 < matrix[0, 1] < 1


def test_similarity_and_clustering_on_known_vectors():
  names, vectors = similarity.class_vectors(
      {"a": {"x": 2.0, "y": 0.0}, "b": {"x": 4.0, "y": 0.1}, "c": {"x": 0.0, "y": 1.0},
       "idle": {}}, ("x", "y"))
  assert names == ["a", "b", "c"]  # no time, no direction
  sim = similarity.cosine_similarity(vectors)
  assert sim[0, 0] == pytest.approx(1.0) and sim[0, 2] == pytest.approx(0.0)
  # Average linkage joins the two alike workloads first.
  linkage = similarity.cluster(vectors)
  assert sorted(linkage[0][:2].astype(int)) == [0, 1]


@pytest.mark.parametrize("p", [0.0, 0.5, 0.9, 0.99])
def test_amdahl_fit_recovers_the_parallel_fraction_of_synthetic_timings(p):
  counts = [1, 2, 4, 8, 16]
  times = [0.3 * ((1 - p) + p / n) for n in counts]
  fit = scaling.amdahl_fit(counts, times)
  assert fit["parallel_fraction"] == pytest.approx(p, abs=1e-6)
  assert fit["t1_s"] == pytest.approx(0.3)
  noisy = [t * (1 + 0.02 * (-1) ** i) for i, t in enumerate(times)]
  assert scaling.amdahl_fit(counts, noisy)["parallel_fraction"] == pytest.approx(p, abs=0.05)


def test_reference_and_tuned_are_compared_class_by_class(finished):
  folder = finished[0]
  (row,) = _csv(folder, "implementations.csv")
  assert row["workload"] == "memnet"
  reference, tuned = float(row["reference_ms"]), float(row["tuned_ms"])
  assert reference > 0 and tuned > 0
  assert float(row["speedup"]) == pytest.approx(reference / tuned, rel=1e-6)
  # Each implementation's classes add up to the part of its step that op events cover.
  runs = {r.point.implementation: r for r in report.load(folder)[1]
          if r.point.kind == "implementation"}
  assert {r.record["implementation"] for r in runs.values()} == {"reference", "tuned"}
  for name, run in runs.items():
    classes = sum(float(row[f"{name}_ms:{c}"]) for c in report.CLASSES)
    assert classes == pytest.approx(run.summary["coverage"] * run.step_s * 1e3, rel=1e-6)


def test_thread_and_device_scaling_sections(finished):
  folder = finished[0]
  threads = _csv(folder, "threads.csv")
  assert [int(r["cpus"]) for r in threads] == [1, 2]
  assert float(threads[0]["speedup"]) == 1.0
  # The affinity mask reached JAX's process: it saw one CPU, then two.
  runs = [r for r in report.load(folder)[1] if r.point.kind == "threads"]
  assert [r.record["environment"]["cpu_affinity"] for r in runs] == [1, 2]
  fit = _csv(folder, "amdahl.csv")[0]
  assert 0.0 <= float(fit["parallel_fraction"]) <= 1.0
  devices = _csv(folder, "devices.csv")
  assert [int(r["devices"]) for r in devices] == [1, 2]
  assert {int(r["global_batch"]) for r in devices} == {8}
  # One device needs no collective; two all-reduce their gradients.
  assert float(devices[0]["communication_ms"]) == 0.0
  assert float(devices[1]["communication_ms"]) > 0.0


def test_an_interrupted_study_resumes_and_redoes_only_unfinished_runs(finished, tmp_path):
  source = finished[0]
  folder = str(tmp_path / "study")
  shutil.copytree(source, folder)
  killed = study.point_dir(folder, "threads-memnet-train-cpus2")
  # kill -9: the run folder stays, without a result file.
  for result in [os.path.join(d, "result.json") for d in
                 [os.path.join(killed, x) for x in os.listdir(killed)] if os.path.isdir(d)]:
    os.unlink(result)
  # Ctrl-C: the result says interrupted.
  interrupted = study.point_dir(folder, "suite-autoenc-infer")
  run_dir = study.point_outcome(interrupted)["run_dir"]
  with open(os.path.join(run_dir, "result.json")) as f:
    record = json.load(f)
  record["status"] = "interrupted"
  with open(os.path.join(run_dir, "result.json"), "w") as f:
    json.dump(record, f)
  # A damaged breakdown: the run finished, but its analysis cannot be read.
  damaged = study.point_outcome(study.point_dir(folder, "fusion-memnet-train-unfused"))["run_dir"]
  with open(os.path.join(damaged, "breakdown.json"), "r+") as f:
    f.truncate(20)
  measuring = study.measuring_points(SETTINGS)
  before = {p: study.point_outcome(study.point_dir(folder, measuring[p])) for p in measuring}
  lines = []
  outcomes = study.execute(folder, SETTINGS, ["--test"], say=lines.append)
  redone = [l.split()[1].rstrip(":") for l in lines if l.startswith("[")
            and " earlier, kept" not in l and ", the run of " not in l
            and "files are damaged" not in l]
  assert sorted(redone) == ["fusion-memnet-train-unfused", "suite-autoenc-infer",
                            "threads-memnet-train-cpus2"]
  assert any("fusion-memnet-train-unfused: its earlier run's files are damaged" in l
             for l in lines)
  with open(os.path.join(folder, report.REPORT_FILE)) as f:
    runs_table = f.read().split("## Runs")[1]
  line = next(l for l in runs_table.splitlines() if l.startswith("| fusion-memnet-train-unfused"))
  assert "run again: the earlier run's files were damaged" in line
  assert all(o["status"] == "completed" for o in outcomes.values())
  for point_id, outcome in outcomes.items():
    if point_id not in redone:
      assert outcome["run_dir"] == before[point_id]["run_dir"]


def test_points_with_the_same_command_share_one_run(finished):
  measuring = study.measuring_points(SETTINGS)
  assert {p: m for p, m in measuring.items() if p != m} == {
      "implementation-memnet-train-tuned": "suite-memnet-train"}
  # Named apart, the implementations are different commands: every point runs.
  apart = study.Settings(**{**SETTINGS.__dict__, "implementation": None})
  assert all(p == m for p, m in study.measuring_points(apart).items())
  runs = {r.point.id: r for r in report.load(finished[0])[1]}
  assert runs["implementation-memnet-train-tuned"].run_dir == runs["suite-memnet-train"].run_dir
  assert not os.path.exists(study.point_dir(finished[0], "implementation-memnet-train-tuned"))


def test_a_study_folder_refuses_other_settings(finished):
  other = study.Settings(**{**SETTINGS.__dict__, "preset": "small"})
  with pytest.raises(UsageError, match="other settings .*preset"):
    study.execute(finished[0], other, [])


def _study_cli(*args, cwd=None):
  return subprocess.run([sys.executable, "-m", "fathom_jax.study", *args], capture_output=True,
                        text=True, cwd=cwd or ROOT, timeout=120)


def _study_refused(forked_cli, *args):
  """The study's command, for one that must stop before it runs (tests/forked_cli.py)."""
  return forked_cli.run("-m", "fathom_jax.study", *args)


@pytest.mark.parametrize("args, message", [
    (["--workloads=nosuch"], "unknown workload"),
    (["--preset=huge", "--workloads=memnet"], "unknown preset"),
    (["--thread_counts=0"], "--thread_counts must be positive"),
    (["--thread_counts=1,999"], "at most"),
    (["--thread_counts=two"], "comma list of integers"),
    (["--device_counts=0"], "--device_counts must be positive"),
    (["--workloads=memnet", "--fusion_workloads=autoenc"], "outside --workloads"),
    (["--steps=0"], "--steps must be positive"),
    (["--backend=quantum"], "error: flag --backend"),
    (["stray"], "unexpected arguments"),
    (["--workloads=memnet", "--implementation_workloads=autoenc"], "outside --workloads"),
    # The suite's processes see only the CPU (JAX_PLATFORMS=cpu): a GPU study finds no devices
    # to scale over, where it would otherwise count them.
    (["--workloads=memnet", "--backend=gpu"], "cannot count the devices of backend gpu"),
])
def test_bad_study_flags_give_one_line_and_exit_2(args, message, tmp_path, forked_cli):
  proc = _study_refused(forked_cli, *args, f"--output_dir={tmp_path / 's'}")
  assert proc.returncode == 2, proc.stderr
  assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
  assert "Traceback" not in proc.stderr
  assert not os.path.exists(tmp_path / "s")  # nothing half-written


def test_scaling_series_double_up_to_what_there_is():
  assert study.doublings(1) == (1,)
  assert study.doublings(6) == (1, 2, 4, 6)
  assert study.doublings(8) == (1, 2, 4, 8)


def test_report_only_needs_a_study(tmp_path, forked_cli):
  proc = _study_refused(forked_cli, "--report_only", f"--output_dir={tmp_path}")
  assert proc.returncode == 2 and "holds no study" in proc.stderr


def test_report_only_rebuilds_the_report(finished, tmp_path):
  folder = str(tmp_path / "copy")
  shutil.copytree(finished[0], folder)
  os.unlink(os.path.join(folder, report.REPORT_FILE))
  proc = _study_cli("--report_only", f"--output_dir={folder}")
  assert proc.returncode == 0, proc.stderr
  assert os.path.exists(os.path.join(folder, report.REPORT_FILE))


@pytest.mark.parametrize("args, message", [
    (["--execution=jit"], "error: flag --execution"),
    (["--cpus=0"], "--cpus must be in [1,"),
    (["--cpus=4096"], "--cpus must be in [1,"),
])
def test_bad_execution_and_cpu_flags_of_a_run(args, message, tmp_path, forked_cli):
  proc = forked_cli.run("run.py", "--workload=memnet", "--preset=tiny", f"--output_dir={tmp_path}",
                        *args)
  assert proc.returncode == 2 and message in proc.stderr, proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1 and os.listdir(tmp_path) == []


@pytest.mark.parametrize("code, error, kept", [
    ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", "killed by signal 9", False),
    ("import sys; print('error: no such thing', file=sys.stderr); sys.exit(2)",
     "error: no such thing", True),
])
def test_a_point_killed_from_outside_is_tried_again_and_bad_input_is_not(
    code, error, kept, tmp_path, monkeypatch):
  monkeypatch.setattr(study, "_command", lambda arguments: [sys.executable, "-c", code])
  point = study.plan(SETTINGS)[0]
  outcome = study.run_point(str(tmp_path), point, SETTINGS, timeout_s=60)
  assert outcome["status"] == "failed" and outcome["error"] == error
  # A finished point is never redone; one killed by a signal is unfinished.
  assert (study.point_outcome(study.point_dir(str(tmp_path), point.id)) is not None) is kept


def test_a_damaged_peaks_file_leaves_the_report_whole_and_is_measured_again(finished, tmp_path):
  folder = str(tmp_path / "copy")
  shutil.copytree(finished[0], folder)
  peaks = os.path.join(folder, study.RUNS_DIR, study.PEAKS_POINT, "peaks.json")
  with open(peaks, "r+") as f:
    f.truncate(10)
  assert os.path.exists(report.build(folder))  # read as missing, not a traceback
  assert study.run_peaks(folder, SETTINGS)["matmul_flops_per_s"] > 0  # measured again
