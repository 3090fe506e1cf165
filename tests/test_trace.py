"""The trace reader and the breakdown on traces a test records now, and the breakdown command."""

import csv
import json
import os

import pytest

from fathom_jax.analysis import __main__ as cli
from fathom_jax.analysis import breakdown, categories, hlo, trace
from fathom_jax.errors import DataError
from tests.trace_recording import TRIPS, record


@pytest.fixture(scope="module")
def annotated(tmp_path_factory):
  logdir = tmp_path_factory.mktemp("annotated")
  return logdir, record(logdir)


def test_layout_events_steps_and_embedded_hlo(annotated):
  logdir, compiled_text = annotated
  (path,) = trace.find_xplanes(str(logdir))
  assert os.path.relpath(path, logdir).startswith(os.path.join("plugins", "profile"))
  t = trace.read(path)
  assert [w.step for w in t.steps] == [0, 1, 2] and {w.name for w in t.steps} == {"train"}
  assert all(w.duration_ns > 0 for w in t.steps)
  # The embedded HLO is the compiled program, and every op event names one of its instructions.
  (key,) = [k for k in t.hlo_texts if k.startswith("jit_program(")]
  module = hlo.parse_module(t.hlo_texts[key])
  assert module.name == "jit_program"
  assert set(module.instructions) == set(hlo.parse_module(compiled_text).instructions)
  ours = [e for e in t.events if e.module == "jit_program"]
  assert ours and all(f"{e.module}({e.program_id})" == key for e in ours)
  assert all(e.op in module.instructions for e in ours)


def test_loop_body_events_per_iteration(annotated):
  logdir, _ = annotated
  traces = trace.read_all(str(logdir))
  programs = breakdown.load_programs(traces)
  result = breakdown.analyse(traces, programs)
  rows = {r["name"]: r for r in result.ops}
  (module,) = [p.module for k, p in programs.items() if k.startswith("jit_program(")]
  (loop,) = [i for i in module.instructions.values() if i.opcode == "while"]
  body = module.computations[loop.attrs["body"].lstrip("%")]
  dots = [i.name for i in body.instructions if categories.refined_category(i, module) ==
          "dot fusion"]
  assert len(dots) == 1
  assert rows[dots[0]]["occurrences"] == 3 * TRIPS
  assert rows[dots[0]]["fathom_class"] == categories.MATRIX
  assert rows[loop.name]["occurrences"] == 3 and rows[loop.name]["flops"] == 0
  assert any(r["fathom_class"] == categories.OPTIMIZATION for r in result.ops)
  s = result.summary
  assert s["steps"] == 3 and s["step_source"] == "step annotations"
  assert 0 < s["coverage"] <= 1 and s["unmatched_share"] == 0
  # Attributed time adds up to the covered time, per class and per category alike.
  for key in ("by_class", "by_xla_category"):
    assert sum(v["share_of_step"] for v in s[key].values()) == pytest.approx(s["coverage"])
  assert sum(r["total_time_us"] for r in result.ops) * 1e-6 == pytest.approx(
      s["covered_time_s"])
  # Executed FLOPs: the loop body on every iteration, as the cost model counts the program.
  per_step = sum(r["flops"] * r["occurrences"] for r in result.ops
                 if r["program"].startswith("jit_program(")) / 3
  assert per_step >= TRIPS * 2 * 64 ** 3
  assert per_step == pytest.approx(s["model_flops_per_step"], rel=1e-3)


def ev(op, start, end, thread="t0"):
  return trace.OpEvent(1, "m", op, start, end - start, thread)


def test_attribution_of_overlapping_and_nested_events():
  window = trace.Window("train", 0, 0.0, 100.0)
  events = [ev("loop", 10, 90), ev("a", 20, 40), ev("b", 30, 60, "t1"), ev("c", 95, 120)]
  share, covered = breakdown._attribute(window, events, [True, False, False, False])
  # loop alone 10-20 and 60-90; a alone 20-30; a and b share 30-40; b alone 40-60; c 95-100.
  assert covered == pytest.approx(85)
  assert share[0] == pytest.approx(40) and share[1] == pytest.approx(15)
  assert share[2] == pytest.approx(25) and share[3] == pytest.approx(5)
  assert sum(share.values()) == pytest.approx(covered)


def test_steps_from_program_executions(tmp_path):
  record(tmp_path, steps=4, annotate=False)
  traces = trace.read_all(str(tmp_path))
  assert traces[0].steps == []
  result = breakdown.analyse(traces, breakdown.load_programs(traces), stalled_step_factor=None)
  assert result.summary["step_source"] == "program executions"
  assert result.summary["steps"] == 4


def test_a_stalled_step_is_left_out_of_the_averages(tmp_path, capsys):
  record(tmp_path, steps=6, stalled_step=3)
  traces = trace.read_all(str(tmp_path))
  programs = breakdown.load_programs(traces)
  s = breakdown.analyse(traces, programs).summary
  left_out = s["stalled_steps_left_out"]
  assert any(w["time_s"] >= 0.3 for w in left_out)
  # Every other step ran the program once; none of them is slower than the limit.
  assert s["steps"] == 6 - len(left_out)
  assert s["step_time_s"] <= breakdown.STALLED_STEP_FACTOR * s["median_step_time_s"]
  assert "stalled step" in breakdown.format_table(s)
  every = breakdown.analyse(traces, programs, stalled_step_factor=None).summary
  assert every["steps"] == 6 and every["stalled_steps_left_out"] == []
  assert every["step_time_s"] >= 0.3 / 6
  assert cli.main(["breakdown", str(tmp_path), f"--output_dir={tmp_path / 'all'}",
                   "--all_steps"]) == 0
  assert "left out" not in capsys.readouterr().out
  assert json.load(open(tmp_path / "all" / "breakdown.json"))["steps"] == 6


def test_stalled_steps_need_a_median_to_stand_out():
  windows = [trace.Window("train", i, 0.0, d) for i, d in enumerate((10.0, 11.0, 40.0))]
  assert breakdown.split_stalled(windows) == (windows, [])
  windows.append(trace.Window("train", 3, 0.0, 12.0))
  assert breakdown.split_stalled(windows) == (windows[:2] + windows[3:], [windows[2]])
  assert breakdown.split_stalled(windows, None) == (windows, [])


def test_command_writes_outputs(annotated, tmp_path, capsys):
  logdir, _ = annotated
  out = tmp_path / "out"
  assert cli.main(["breakdown", str(logdir), f"--output_dir={out}"]) == 0
  assert "op breakdown" in capsys.readouterr().out
  summary = json.load(open(out / "breakdown.json"))
  rows = list(csv.DictReader(open(out / "ops.csv")))
  assert set(rows[0]) == set(breakdown.CSV_FIELDS)
  assert sum(float(r["total_time_us"]) for r in rows) * 1e-6 == pytest.approx(
      summary["covered_time_s"], rel=1e-6)
  assert (out / "breakdown.png").read_bytes()[:4] == b"\x89PNG"


def test_hlo_dumped_beside_a_trace_without_embedded_hlo(tmp_path, capsys):
  compiled_text = record(tmp_path, steps=2, embed_hlo=False)
  traces = trace.read_all(str(tmp_path))
  assert not any(k.startswith("jit_program") for t in traces for k in t.hlo_texts)
  (tmp_path / "jit_program.optimized.hlo.txt").write_text(compiled_text)
  assert cli.main(["breakdown", str(tmp_path)]) == 0
  rows = list(csv.DictReader(open(tmp_path / "ops.csv")))
  ours = [r for r in rows if r["program"].startswith("jit_program")]
  assert ours and all(r["xla_category"] != breakdown.UNMATCHED for r in ours)


def _exit_status(command, argv) -> int:
  """A command's exit status, whether it returns it or exits with it."""
  try:
    return command(argv)
  except SystemExit as e:
    return e.code


def test_damaged_input(annotated, tmp_path, capsys):
  logdir, _ = annotated
  (path,) = trace.find_xplanes(str(logdir))
  broken = tmp_path / "plugins" / "profile" / "cut"
  broken.mkdir(parents=True)
  data = open(path, "rb").read()
  (broken / "host.xplane.pb").write_bytes(data[:len(data) // 2])
  with pytest.raises(DataError, match="not a readable xplane trace"):
    trace.read_all(str(tmp_path))
  assert _exit_status(cli.main, ["breakdown", str(tmp_path)]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1
  with pytest.raises(DataError, match="no such trace folder"):
    trace.find_xplanes(str(tmp_path / "missing"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(DataError, match="no \\*.xplane.pb trace under"):
    trace.find_xplanes(str(tmp_path / "empty"))
  notes = tmp_path / "empty" / "notes.optimized.hlo.txt"
  notes.write_text("not hlo\n")
  assert _exit_status(cli.main, ["breakdown", str(logdir), f"--hlo={notes}"]) == 2
  assert "notes.optimized.hlo.txt:1: not HLO text" in capsys.readouterr().err


DEVICE_XSPACE = """
planes {
  id: 1 name: "/host:CPU"
  lines { id: 1 name: "python" timestamp_ns: 1000
    events { metadata_id: 1 offset_ps: 0 duration_ps: 100000000
             stats { metadata_id: 1 int64_value: 0 } } }
  event_metadata { key: 1 value { id: 1 name: "train" } }
  stat_metadata { key: 1 value { id: 1 name: "step_num" } }
}
planes {
  id: 2 name: "/device:GPU:0"
  lines { id: 1 name: "XLA Modules" timestamp_ns: 1000
    events { metadata_id: 1 offset_ps: 10000000 duration_ps: 80000000 } }
  lines { id: 2 name: "Stream #7" timestamp_ns: 1000
    events { metadata_id: 2 offset_ps: 10000000 duration_ps: 30000000
             stats { metadata_id: 1 str_value: "ynn_fusion" } }
    events { metadata_id: 3 offset_ps: 40000000 duration_ps: 20000000
             stats { metadata_id: 1 str_value: "ynn_fusion" } }
    events { metadata_id: 4 offset_ps: 60000000 duration_ps: 10000000
             stats { metadata_id: 1 str_value: "add_tanh_fusion" } } }
  event_metadata { key: 1 value { id: 1 name: "jit__lambda(5)" } }
  event_metadata { key: 2 value { id: 2 name: "gemm_kernel_part1" } }
  event_metadata { key: 3 value { id: 3 name: "gemm_kernel_part2" } }
  event_metadata { key: 4 value { id: 4 name: "loop_fusion_kernel" } }
  stat_metadata { key: 1 value { id: 1 name: "hlo_op" } }
}
"""


def test_device_plane_kernels_summed_per_op(tmp_path):
  """A GPU-style plane (written from text here): kernels carry only the op name, the 'XLA
  Modules' line says which program ran; two kernels of one op are one execution of it."""
  from jax.profiler import ProfileData
  session = tmp_path / "plugins" / "profile" / "session"
  session.mkdir(parents=True)
  (session / "gpu.xplane.pb").write_bytes(ProfileData.text_proto_to_serialized_xspace(
      DEVICE_XSPACE))
  (t,) = trace.read_all(str(tmp_path))
  assert t.device == "/device:GPU:0" and len(t.events) == 3
  assert {(e.module, e.program_id) for e in t.events} == {("jit__lambda", 5)}
  data = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "dot.hlo.txt")
  result = breakdown.analyse([t], breakdown.load_programs([t], [data]))
  rows = {r["name"]: r for r in result.ops}
  assert rows["ynn_fusion"]["occurrences"] == 1
  assert rows["ynn_fusion"]["total_time_us"] == pytest.approx(50)  # 30 + 20 us of kernels
  assert rows["add_tanh_fusion"]["total_time_us"] == pytest.approx(10)
  s = result.summary
  assert s["coverage"] == pytest.approx(0.6)  # 60 of the step's 100 us
  assert s["by_class"][categories.MATRIX]["share_of_step"] == pytest.approx(0.5)
  assert s["by_xla_category"]["dot fusion"]["share_of_step"] == pytest.approx(0.5)


def test_xprof_cross_check(annotated, tmp_path):
  from fathom_jax.analysis import xprof_check
  logdir, _ = annotated
  result, _ = breakdown.run(str(logdir), str(tmp_path))
  # xprof's hlo_stats has no rows for CPU traces: the check says there was nothing to compare.
  assert result.summary["xprof_check"]["xprof_rows"] == 0
  ops = [{"name": "fusion.1", "busy_time_us": 30.0, "xla_category_raw": "loop fusion"},
         {"name": "dot.2", "busy_time_us": 90.0, "xla_category_raw": "dot"}]
  table = {"cols": [{"id": "hlo_op_name"}, {"id": "category"}, {"id": "total_time"}],
           "rows": [{"c": [{"v": "fusion.1"}, {"v": "Loop fusion"}, {"v": 40.0}]},
                    {"c": [{"v": "dot.2"}, {"v": "convolution"}, {"v": 80.0}]},
                    {"c": [{"v": "copy.9"}, {"v": "data formatting"}, {"v": 5.0}]}]}
  check = xprof_check.compare(ops, xprof_check.table_rows(json.dumps(table)), steps=1)
  assert check["matched_ops"] == 2 and check["xprof_rows"] == 3
  assert check["time_ratio"] == pytest.approx(120 / 120)
  assert check["category_agreement"] == pytest.approx(40 / 120)
