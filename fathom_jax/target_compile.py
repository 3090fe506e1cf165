"""`run.py --target=NAME`: a workload's step compiled for a device this machine lacks, and run
nowhere. The run folder gets what a profiled run's `hlo/` gets (the optimised and the
pre-optimisation HLO, the compiler's cost and memory analyses), `static.json` (the static
breakdown of fathom_jax.analysis.static, an estimate) and `result.json`.
"""

import dataclasses
import functools
import json
import os
import time
from typing import Optional

from fathom_jax import compiling, config as config_lib, environment, model_steps, profiling, results, targets
from fathom_jax.errors import UsageError

def _abstract(tree, sharding):
  import jax
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def lower_step(model, mode: str, batch_size: int, device, platform: str):
  """The train or inference step lowered for `device` of `platform` ('cuda', 'tpu'), from
  shapes alone."""
  import jax
  from jax.sharding import Mesh, NamedSharding, PartitionSpec
  sharding = NamedSharding(Mesh([device], ("data",)), PartitionSpec())
  key = jax.random.key(0)
  batch = jax.eval_shape(lambda k: model.synthetic_batch(k, batch_size), key)
  if mode == "train":
    state = jax.eval_shape(functools.partial(model_steps.init_train_state, model), key, batch)
    args = (_abstract(state, sharding), _abstract(batch, sharding))
    step = model_steps.make_train_step(model)
  else:
    variables = jax.eval_shape(model.init, key, batch)
    args = (_abstract(variables, sharding), _abstract(batch, sharding), _abstract(key, sharding))
    step = model_steps.make_infer_step(model)
  return jax.jit(step).trace(*args).lower(lowering_platforms=(platform,))


def unoptimized_flops(lowered) -> Optional[float]:
  """XLA's own count of the program before its passes, by XLA's cost analysis on this machine's
  CPU client (a GPU compile without a GPU gives no analysis of its own); None where this jaxlib
  offers no such call."""
  try:
    import jax
    from jax._src.lib import xla_client
    module = lowered.compiler_ir("hlo").as_hlo_module()
    cost = xla_client._xla.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module)
  except Exception:
    return None
  return float(cost["flops"]) if cost and "flops" in cost else None


def check_request(spec, target: targets.Target) -> None:
  """UsageError for what a compile for `target` cannot do."""
  if spec.implementation == "tuned":
    raise UsageError(f"--implementation=tuned applies on cpu only; --target={target.name} "
                     "compiles the reference implementation")
  if spec.execution == "eager":
    raise UsageError("--execution=eager dispatches op by op on this machine; a --target "
                     "compiles one program")
  if spec.execution == "unfused" and target.platform == "tpu":
    raise UsageError("--execution=unfused cannot unfuse a TPU program: the TPU compiler's fusion "
                     "passes are its own and cannot be turned off by name")
  if spec.data != "synthetic":
    raise UsageError("--target compiles from shapes: leave --data at 'synthetic'")


def compile_for_target(spec, target: targets.Target, devices: list, say=print) -> dict:
  """Compiles `spec`'s step for `target`; returns the result record (also written to disk)."""
  from fathom_jax import runner
  from fathom_jax.analysis import hlo, static
  check_request(spec, target)
  resolved = runner.resolve(spec, platform=target.platform)
  model = resolved.model
  start = time.perf_counter()
  lowered = lower_step(model, spec.mode, resolved.batch_size, devices[0], target.platform)
  lower_s = time.perf_counter() - start
  options = compiling.compile_options(spec.execution)
  compiled = lowered.compile(**options)
  compile_s = time.perf_counter() - start - lower_s
  module = hlo.parse_module(compiled.as_text())
  summary = static.analyse(module, target.peaks(spec.dtype))
  summary["xla_flops_unoptimized"] = unoptimized_flops(lowered)
  record = {
      "schema_version": results.SCHEMA_VERSION,
      "status": "completed",
      "provenance": {**environment.provenance(), "duration_s": time.perf_counter() - start},
      "kind": "target compile",
      "workload": spec.workload,
      "mode": spec.mode,
      "preset": spec.preset,
      "implementation": resolved.implementation,
      "target": target.describe(),
      "spec": dataclasses.asdict(spec),
      "config": config_lib.to_dict(resolved.config),
      "figures": {
          "parameters": model_steps.count_parameters(model),
          "batch_size": resolved.batch_size,
          "lower_time_s": lower_s,
          "compile_time_s": compile_s,
          "compiled_memory": compiling.memory_analysis(compiled),
          "static": summary,
      },
  }
  title = (f"{spec.workload} {spec.mode} ({spec.preset}, batch {resolved.batch_size}, "
           f"{spec.dtype}) on {target.name}")
  if spec.output_dir:
    run_dir = results.new_run_dir(spec.output_dir, spec.workload, spec.mode, spec.preset)
    record["run_dir"] = run_dir
    profiling.save_programs(run_dir, lowered, compiled)
    results.write_json_atomic(os.path.join(run_dir, static.STATIC_FILE), summary)
    results.write_json_atomic(os.path.join(run_dir, results.RESULT_FILE), record)
  say(static.format_table(summary, title))
  memory = record["figures"]["compiled_memory"]
  if memory:
    total = sum(memory.get(k, 0) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                            "temp_size_in_bytes"))
    say(f"  memory       {total / 1e9:.3f} GB (arguments, outputs and temporaries; the "
        f"compiler's figures) of {target.memory_bytes / 1e9:.1f} GB")
  say(f"  compile      {compile_s:.2f} s (lower {lower_s:.2f} s)")
  if spec.output_dir:
    say(f"  result       {os.path.join(record['run_dir'], results.RESULT_FILE)}")
  return json.loads(json.dumps(record, default=str))
