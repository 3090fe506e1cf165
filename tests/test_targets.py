"""The analysis on real accelerator programs: every workload's train and inference step compiled
for an H100 and a TPU v5e without either (tests/data/make_target_samples.py), and the --target
command line where the plugins are missing."""

import functools
import gzip
import json
import os

import pytest

from fathom_jax import targets
from fathom_jax.analysis import categories, cost, hlo, static
from fathom_jax.workloads import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data", "targets")
with open(os.path.join(DATA, "xla_flops.json")) as _f:
  XLA_FLOPS = json.load(_f)
PROGRAMS = sorted(XLA_FLOPS)  # "<target>/<workload>.<mode>"


@functools.lru_cache(maxsize=None)
def module(program: str, suffix: str = "hlo.txt.gz") -> hlo.Module:
  with gzip.open(os.path.join(DATA, f"{program}.{suffix}"), "rt") as f:
    return hlo.parse_module(f.read())


def _flops(m: hlo.Module, opcodes=None, targets_=None) -> float:
  """FLOPs of the module (loops once, as XLA counts), or of the ops of `opcodes` and library
  calls of `targets_` among those the program launches and those inside its fusions."""
  model = cost.CostModel(m, count_loops_once=True)
  if opcodes is None and targets_ is None:
    return model.computation(m.entry).flops
  return sum(model.instruction(i.name).flops for c in m.computations.values()
             for i in c.instructions
             if i.opcode in (opcodes or ()) or (i.opcode == "custom-call" and any(
                 i.custom_call_target.endswith(t) for t in targets_ or ())))


def test_every_workload_and_mode_has_fixtures():
  for target in ("h100", "tpu-v5e"):
    assert {p for p in PROGRAMS if p.startswith(target) and "conv_kinds" not in p} == {
        f"{target}/{w}.{m}" for w in registry.expand("all") for m in ("train", "infer")}


def test_strided_dilated_and_grouped_convolutions_reach_cudnn_in_every_kind():
  # conv_kinds.train: the program the per-kind FLOP check above runs on, beside the workloads.
  m = module("h100/conv_kinds.train")
  calls = [i for c in m.computations.values() for i in c.instructions
           if i.opcode == "custom-call" and "cudnn$conv" in i.custom_call_target]
  kinds = {i.custom_call_target.split("$")[1] for i in calls}
  assert {"convBackwardInput", "convBackwardFilter"} <= kinds and kinds & {
      "convForward", "convBiasActivationForward"}
  windows = " ".join(i.attrs.get("window", "") for i in calls)
  assert "stride=2x2" in windows and "rhs_dilate=2x2" in windows
  assert any(int(i.attrs.get("feature_group_count", "1")) == 4 for i in calls)


@pytest.mark.parametrize("program", [p for p in PROGRAMS if p.startswith("tpu")])
def test_tpu_flops_agree_with_xlas(program):
  assert _flops(module(program)) == pytest.approx(XLA_FLOPS[program], rel=0.02)


@pytest.mark.parametrize("program", [p for p in PROGRAMS if p.startswith("h100")])
def test_gpu_flops_agree_with_xlas_before_and_convolutions_after_its_passes(program):
  # The GPU compile has no cost analysis; XLA's count is of the module before its passes. After
  # them, cuDNN's forward, backward-input and backward-filter calls must count what the
  # convolutions they replaced counted (the passes rewrite other ops: small dots become
  # multiplies and reductions, fusions recompute cheap producers).
  before = module(program, "unoptimized.hlo.txt.gz")
  assert _flops(before) == pytest.approx(XLA_FLOPS[program], rel=0.02)
  convolutions = _flops(before, opcodes=("convolution",))
  cudnn = _flops(module(program), opcodes=("convolution",),
                 targets_=("convForward", "convBiasActivationForward", "convBackwardInput",
                           "convBackwardFilter"))
  # In conv_kinds XLA pads the strided convolution's input for cuDNN (16x16 to 17x17), whose
  # products with those zeros count, and turns the dilated kernel's gradient into a forward
  # call over the transposed operands: 3.9% apart. The workloads' steps agree within 2%.
  tolerance = 0.05 if "conv_kinds" in program else 0.02
  assert cudnn == pytest.approx(convolutions, rel=tolerance, abs=1.0)


def test_cudnn_convolution_kinds_are_convolution_work():
  m = module("h100/alexnet.train")
  calls = {i.custom_call_target: i for c in m.computations.values() for i in c.instructions
           if i.opcode == "custom-call" and "cudnn" in i.custom_call_target}
  assert {"__cudnn$convBiasActivationForward", "__cudnn$convBackwardInput",
          "__cudnn$convBackwardFilter"} <= set(calls)
  model = cost.CostModel(m)
  for call in calls.values():
    assert categories.fathom_class(call) == categories.CONVOLUTION
    assert categories.refined_category(call, m) == "convolution"
  # The first layer's kernel gradient (its input needs none) multiplies the same position pairs
  # as its forward convolution: the same FLOPs, read from other operands.
  def first_layer(target):
    (call,) = [i for c in m.computations.values() for i in c.instructions
               if i.opcode == "custom-call" and i.custom_call_target == target
               and "size=11x11" in i.attrs.get("window", "")]
    return model.instruction(call.name).flops
  assert first_layer("__cudnn$convBackwardFilter") == first_layer(
      "__cudnn$convBiasActivationForward") > 0


def test_gpu_gemm_fusions_are_matrix_work():
  m = module("h100/autoenc.train")
  gemms = [i for c in m.computations.values() for i in c.instructions
           if i.opcode == "fusion" and categories.refined_category(i, m) == "dot fusion"]
  assert gemms
  model = cost.CostModel(m)
  for fusion in gemms:
    shares = categories.class_shares(fusion, m, model)
    assert max(shares, key=shares.get) == categories.MATRIX


@pytest.mark.parametrize("workload", ["autoenc", "memnet"])
def test_tpu_dots_written_as_convolutions_are_matrix_work(workload):
  m = module(f"tpu-v5e/{workload}.train")
  products = [i for c in m.computations.values() for i in c.instructions
              if categories.is_matrix_product(i)]
  assert products and all(categories.fathom_class(i) == categories.MATRIX for i in products)
  summary = static.analyse(m, targets.get("tpu-v5e").peaks("float32"))
  assert categories.CONVOLUTION not in summary["classes"]
  if workload == "autoenc":  # two dense layers each way: nearly all of its arithmetic
    assert summary["classes"][categories.MATRIX]["flops"] > 0.5 * summary["flops"]


def test_residual_convolutions_stay_convolutions_on_tpu():
  summary = static.analyse(module("tpu-v5e/residual.train"), targets.get("tpu-v5e").peaks(
      "float32"))
  assert summary["classes"][categories.CONVOLUTION]["flops"] > 0.8 * summary["flops"]


@pytest.mark.parametrize("program", PROGRAMS)
def test_every_launched_op_has_a_class_and_loops_their_trip_counts(program):
  m = module(program)
  model = cost.CostModel(m)
  for inst, _ in static.launched_ops(m):
    shares = categories.class_shares(inst, m, model)
    assert abs(sum(shares.values()) - 1) < 1e-9
    assert categories.OTHER not in shares or model.instruction(inst.name).work == 0, inst.name
  for c in m.computations.values():
    for inst in c.instructions:
      if inst.opcode == "while" and not _stops_on_data(inst, m):
        assert hlo.trip_count(inst, m), (program, inst.name)


def _stops_on_data(loop: hlo.Instruction, m: hlo.Module) -> bool:
  """Whether the loop's condition ands its counter with a value it computes (seq2seq's greedy
  decoding stops when every sentence has ended): no fixed trip count."""
  root = m.computations[loop.attrs["condition"].lstrip("%")].root
  if root.opcode == "fusion":
    root = m.computations[root.called[0]].root
  return root.opcode == "and"


def test_static_breakdown_adds_up_and_is_an_estimate():
  m = module("h100/residual.train")
  peaks = targets.get("h100").peaks("float32")
  summary = static.analyse(m, peaks)
  assert summary["estimate"] is True
  for table in ("classes", "xla_categories"):
    rows = summary[table].values()
    assert sum(r["estimated_s"] for r in rows) == pytest.approx(summary["estimated_step_s"])
    assert sum(r["flops"] for r in rows) == pytest.approx(summary["flops"])
  # A floor: the step cannot beat its FLOPs at the peak, nor its bytes at the bandwidth.
  assert summary["estimated_step_s"] >= summary["flops"] / peaks.matrix_flops_per_s
  assert summary["estimated_step_s"] >= summary["bytes"] / peaks.memory_bytes_per_s * 0.999
  assert summary["library_calls_launched"] > 0 and summary["fusions_launched"] > 0
  # The H200 moves the same bytes faster.
  h200 = static.analyse(m, targets.get("h200").peaks("float32"))
  assert h200["estimated_step_s"] < summary["estimated_step_s"]


@pytest.mark.parametrize("args, message", [
    (["--target=a100"], "unknown target 'a100'; targets are: h100"),
    (["--target=h100", "--profile"], "--profile traces a run"),
    (["--target=h100", "--cpu_devices=2"], "--cpu_devices chooses devices"),
    (["--target=tpu-v5e", "--execution=unfused"], "cannot unfuse a TPU program"),
    (["--target=h100", "--execution=eager"], "a --target compiles one program"),
    (["--target=h100", "--implementation=tuned"], "compiles the reference implementation"),
])
def test_bad_target_requests_exit_2_in_one_line(args, message, tmp_path, forked_cli):
  proc = forked_cli.run("run.py", "--workload=autoenc", "--preset=tiny",
                        f"--output_dir={tmp_path / 'runs'}", *args)
  lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr
  assert message in lines[0]
  assert "Traceback" not in proc.stderr and not (tmp_path / "runs").exists()


@pytest.mark.skipif(targets.plugin_present("cuda"), reason="the GPU plugin is installed here")
def test_a_missing_plugin_names_what_to_install(tmp_path, forked_cli):
  proc = forked_cli.run("run.py", "--workload=autoenc", "--preset=tiny", "--target=h200",
                        f"--output_dir={tmp_path / 'runs'}")
  assert proc.returncode == 2 and proc.stderr.strip() == (
      f"error: --target=h200 needs jax-cuda12-plugin: {targets.INSTALL}")
  proc = forked_cli.run("-m", "fathom_jax.study", "--workloads=autoenc", "--targets=h100",
                        f"--output_dir={tmp_path / 'study'}")
  assert proc.returncode == 2 and proc.stderr.strip() == (
      f"error: --targets=h100 needs jax-cuda12-plugin: {targets.INSTALL}")
  assert not (tmp_path / "study").exists()


def test_a_study_compiles_its_steps_for_targets_and_reports_them_side_by_side(tmp_path):
  from fathom_jax import study
  from fathom_jax.study import report
  settings = study.Settings(workloads=("autoenc",), targets=("tpu-v5e",))
  (point,) = [p for p in study.plan(settings) if p.kind == "target" and p.mode == "train"]
  assert point.id == "target-autoenc-train-tpu-v5e"
  assert "--target=tpu-v5e" in point.arguments(settings)
  assert "--profile" not in point.arguments(settings)
  # This machine's step from its run's HLO, the target's from its compile's static.json.
  cpu_dir = tmp_path / "cpu"
  (cpu_dir / "hlo").mkdir(parents=True)
  with open(os.path.join(ROOT, "tests", "data", "conv_net.hlo.txt")) as f:
    (cpu_dir / "hlo" / "jit_step.optimized.hlo.txt").write_text(f.read())
  memory = {"argument_size_in_bytes": 2e6, "temp_size_in_bytes": 1e6}
  runs = [report.Run(study.Point("suite", "autoenc", "train"), "completed",
                     record={"implementation": "tuned", "figures": {"compiled_memory": memory}},
                     run_dir=str(cpu_dir)),
          report.Run(point, "completed", record={"figures": {"compiled_memory": memory}},
                     summary=static.analyse(module("tpu-v5e/autoenc.train"),
                                            targets.get("tpu-v5e").peaks("float32")))]
  peaks = {"matmul_flops_per_s": 2e11, "copy_bytes_per_s": 6e9, "platform": "cpu"}
  rows = report.target_rows(runs, peaks)
  assert [r["device"] for r in rows] == ["this cpu (tuned)", "tpu-v5e"]
  for row in rows:
    assert row["memory_gb"] == pytest.approx(0.003)
    for share in ("flops_share", "time_share"):
      assert sum(row[f"{share}:{c}"] for c in report.CLASSES) == pytest.approx(1.0)
  assert rows[1]["time_share:" + categories.MATRIX] > 0
  for folder in (report.FIGURES, report.TABLES):
    (tmp_path / folder).mkdir()
  text = "\n".join(report._target_section(runs, peaks, report._Out(str(tmp_path))))
  assert "## The same steps on other devices (static estimates)" in text
  assert os.path.getsize(tmp_path / report.FIGURES / "targets.png") > 1000
  assert (tmp_path / report.TABLES / "targets.csv").exists()


needs_gpu_plugin = pytest.mark.skipif(not targets.plugin_present("cuda"),
                                      reason="needs the 'targets' extra (jax-cuda12-plugin)")
needs_libtpu = pytest.mark.skipif(not targets.plugin_present("tpu"),
                                  reason="needs the 'targets' extra (libtpu)")


def _compile(target_name, tmp_path, **spec_fields):
  from fathom_jax import runner, target_compile
  targets.prepare_process()
  target = targets.get(target_name)
  spec = runner.RunSpec("autoenc", preset="tiny", output_dir=str(tmp_path), **spec_fields)
  return target_compile.compile_for_target(spec, target, targets.devices(target), say=lambda _: 0)


@needs_gpu_plugin
def test_a_deviceless_gpu_compile_writes_a_run_folder_and_unfused_unfuses(tmp_path):
  record = _compile("h100", tmp_path / "fused")
  assert record["status"] == "completed" and record["kind"] == "target compile"
  assert record["implementation"] == "reference" and record["target"]["name"] == "h100"
  run_dir = record["run_dir"]
  assert sorted(os.listdir(run_dir)) == ["hlo", "result.json", "static.json"]
  assert {f.split(".", 1)[1] for f in os.listdir(os.path.join(run_dir, "hlo"))} == {
      "optimized.hlo.txt", "unoptimized.hlo.txt", "analysis.json"}
  fused = record["figures"]["static"]["fusions_launched"]
  unfused = _compile("h100", tmp_path / "unfused", execution="unfused")
  assert unfused["figures"]["static"]["ops_launched"] > record["figures"]["static"]["ops_launched"]
  assert unfused["figures"]["static"]["fusions_launched"] > fused  # each op its own kernel


@needs_libtpu
def test_a_deviceless_tpu_compile_counts_as_xla_does(tmp_path):
  record = _compile("tpu-v5e", tmp_path)
  with open(os.path.join(record["run_dir"], "hlo", "jit_train_step.analysis.json")) as f:
    xla = json.load(f)["cost_analysis"]["flops"]
  assert record["figures"]["static"]["flops"] == pytest.approx(xla, rel=0.02)
