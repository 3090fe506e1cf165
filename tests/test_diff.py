"""Two runs compared: the interval method, matching across recompilation, the outputs, errors."""

import csv
import json
import os
import shutil

import numpy as np
import pytest

from fathom_jax import results, runner
from fathom_jax.analysis import breakdown, diff


def test_the_interval_finds_a_known_difference_and_covers_it_as_stated():
  rng = np.random.default_rng(1)
  a, b = rng.normal(10.0, 1.0, 30), rng.normal(12.0, 1.0, 30)
  d, low, high = diff.interval(a, b)
  assert d == pytest.approx(b.mean() - a.mean())
  assert low < 2.0 < high and low > 0
  assert diff.interval(a, b) == (d, low, high)  # a fixed seed: the same interval again
  # Samples of one distribution: zero inside the interval.
  d, low, high = diff.interval(a, rng.normal(10.0, 1.0, 30))
  assert low < 0 < high
  # Over many draws, the 95% interval holds the true difference about 95% of the time.
  held = 0
  for trial in range(200):
    a, b = rng.normal(5.0, 1.0, 25), rng.normal(5.5, 2.0, 20)
    _, low, high = diff.interval(a, b, seed=trial)
    held += low <= 0.5 <= high
  assert 0.88 <= held / 200 <= 0.99, held


@pytest.fixture(scope="module")
def two_programs(tmp_path_factory):
  """Profiled memnet train runs of two implementations: two compilations, other HLO names."""
  folders = {}
  for implementation in ("reference", "tuned"):
    out = tmp_path_factory.mktemp(implementation)
    runner.execute(runner.RunSpec("memnet", preset="tiny", batch_size=256, steps=6,
                                  warmup_steps=1, output_dir=str(out), quiet=True, profile=True,
                                  implementation=implementation))
    (folders[implementation],) = [os.path.join(out, d) for d in os.listdir(out)]
  return folders


def _ops(folder):
  with open(os.path.join(folder, breakdown.OPS_FILE)) as f:
    return list(csv.DictReader(f))


def test_runs_of_two_programs_match_on_classes_and_components(two_programs, tmp_path, capsys):
  from fathom_jax.analysis import __main__ as command
  a, b = two_programs["reference"], two_programs["tuned"]
  # The programs differ: dozens of instruction names are in one only (and a shared name need
  # not be the same op), so instruction names cannot be what the runs are matched on.
  names_a, names_b = ({r["name"] for r in _ops(f)} for f in (a, b))
  assert len(names_a ^ names_b) >= 20
  assert command.main(["diff", a, b, f"--output_dir={tmp_path}"]) == 0
  printed = capsys.readouterr().out
  with open(tmp_path / diff.DIFF_CSV) as f:
    rows = list(csv.DictReader(f))
  by_table = {}
  for r in rows:
    by_table.setdefault(r["table"], {})[r["name"]] = r
  (step,) = by_table["step"].values()
  summaries = [json.load(open(os.path.join(f, breakdown.BREAKDOWN_FILE))) for f in (a, b)]
  wall = [np.mean(s["samples"]["wall_s"]) * 1e3 for s in summaries]
  assert float(step["a_ms"]) == pytest.approx(wall[0]) and float(step["b_ms"]) == pytest.approx(
      wall[1])
  # Every class either run has is matched; components match by path and pass.
  classes = set(summaries[0]["by_class"]) | set(summaries[1]["by_class"])
  assert set(by_table["class"]) == classes
  assert all(r["matched"] == "both" for r in by_table["class"].values()
             if r["name"] in set(summaries[0]["by_class"]) & set(summaries[1]["by_class"]))
  assert by_table["component"]["MemN2N|forward"]["matched"] == "both"
  assert by_table["component"]["MemN2N|backward"]["matched"] == "both"
  for r in rows:
    if r["matched"] == "both":
      assert float(r["ci_low_ms"]) <= float(r["diff_ms"]) <= float(r["ci_high_ms"])
      assert (r["significant"] == "True") == (float(r["ci_low_ms"]) > 0 or
                                              float(r["ci_high_ms"]) < 0)
  assert "95% percentile bootstrap" in printed and "step" in printed
  assert os.path.getsize(tmp_path / diff.DIFF_FIGURE) > 1000
  md = open(tmp_path / diff.DIFF_MD).read()
  assert "## class" in md and "## component" in md and a in md


def test_a_run_against_itself_differs_by_nothing(two_programs, tmp_path):
  folder = two_programs["tuned"]
  rows, _, _ = diff.run(folder, folder, str(tmp_path), depth=None)
  assert rows and all(r["matched"] == "both" for r in rows)
  assert all(r["diff_ms"] == 0 and not r["significant"] for r in rows)


def test_per_step_samples_add_up_to_the_breakdown(two_programs):
  summary = json.load(open(os.path.join(two_programs["tuned"], breakdown.BREAKDOWN_FILE)))
  samples = summary["samples"]
  assert samples["unit"] == "step" and len(samples["wall_s"]) == summary["steps"]
  assert sum(samples["wall_s"]) == pytest.approx(summary["wall_time_s"], rel=1e-6)
  for table in ("by_class", "by_xla_category"):
    for key, series in samples[table].items():
      assert sum(series) == pytest.approx(summary[table][key]["time_s"], rel=1e-6, abs=1e-9)
  total = sum(sum(series) for series in samples["by_component"].values())
  assert total == pytest.approx(summary["covered_time_s"], rel=1e-6)


def _copy(folder, tmp_path, name):
  copy = str(tmp_path / name)
  shutil.copytree(folder, copy)
  return copy


def test_bad_input_is_one_line(two_programs, tmp_path, forked_cli):
  run = two_programs["tuned"]
  other = _copy(run, tmp_path, "other")
  record = results.read_result(other)
  record["workload"] = "autoenc"
  results.write_json_atomic(os.path.join(other, results.RESULT_FILE), record)
  damaged = _copy(run, tmp_path, "damaged")
  with open(os.path.join(damaged, breakdown.BREAKDOWN_FILE), "r+") as f:
    f.truncate(100)
  interrupted = _copy(run, tmp_path, "interrupted")
  record = results.read_result(interrupted)
  record.update(status="interrupted", error="interrupted by the user")
  results.write_json_atomic(os.path.join(interrupted, results.RESULT_FILE), record)
  empty = tmp_path / "empty"
  empty.mkdir()
  two = tmp_path / "two"
  shutil.copytree(run, two / "x")
  shutil.copytree(run, two / "y")
  for args, message in [
      ((run, other), "A is a memnet run and B a autoenc run"),
      ((run, damaged), "damaged (not JSON)"),
      ((interrupted, run), "the run is interrupted (interrupted by the user); a diff compares"),
      ((str(empty), run), "holds no breakdown.json and no trace"),
      ((run, str(tmp_path / "missing")), "does not exist"),
      ((run, os.path.join(run, breakdown.OPS_FILE)), "is not a folder"),
      ((str(two), run), "holds 2 runs; name one of them"),
      ((run, run, "--component_depth=0"), "component depth must be"),
  ]:
    proc = forked_cli.run("-m", "fathom_jax.analysis", "diff", *args,
                          f"--output_dir={tmp_path / 'out'}")
    assert proc.returncode == 2, (args, proc.stderr)
    assert message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_measured_run_against_a_static_target_estimate(two_programs, tmp_path):
  # A memnet train step compiled for an H100 on a machine without one (tests/data/targets).
  import gzip
  from fathom_jax import targets
  from fathom_jax.analysis import hlo, static
  path = os.path.join(os.path.dirname(__file__), "data", "targets", "h100", "memnet.train.hlo.txt.gz")
  with gzip.open(path, "rt") as f:
    module = hlo.parse_module(f.read())
  folder = tmp_path / "h100"
  folder.mkdir()
  estimate = static.analyse(module, targets.get("h100").peaks("float32"))
  results.write_json_atomic(str(folder / static.STATIC_FILE), estimate)
  record = results.read_result(two_programs["tuned"])
  record.update(kind="target compile", target={"name": "h100"})
  results.write_json_atomic(str(folder / results.RESULT_FILE), record)
  rows, table, _ = diff.run(two_programs["tuned"], str(folder), str(tmp_path / "out"))
  matched = {(r["table"], r["name"]): r for r in rows if r["matched"] == "both"}
  # The same model's components match across the CPU run and the GPU program; an estimate
  # has one value, so nothing gets an interval or a flag.
  assert ("component", "MemN2N|forward") in matched and ("component", "MemN2N|backward") in matched
  step = matched[("step", "step")]
  assert step["b_ms"] == pytest.approx(estimate["estimated_step_s"] * 1e3)
  assert all(r["ci_low_ms"] is None and r["significant"] is None for r in matched.values())
  assert "(no interval)" in table and "h100 (static estimate)" in table
