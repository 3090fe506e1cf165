"""The shared runner: builds the jitted train and inference steps of any workload, compiles them
ahead of time, times them, and writes the run's result file."""

import dataclasses
import os
import time
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fathom_jax import config as config_lib
from fathom_jax import data as data_lib
from fathom_jax import environment, results
from fathom_jax.errors import UsageError
from fathom_jax.workloads import base, registry

MODES = ("train", "infer")
DTYPES = ("float32", "bfloat16")
OPTIMIZER_SCOPE = "optimizer"  # named scope of the update, so the analysis can find it in HLO


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """Everything that defines one run of one workload in one mode."""
  workload: str
  mode: str = "train"
  preset: str = "tiny"
  overrides: tuple[str, ...] = ()
  batch_size: Optional[int] = None
  steps: int = 10
  warmup_steps: int = 2
  seed: int = 0
  dtype: str = "float32"
  data: str = "synthetic"
  output_dir: Optional[str] = "runs"
  backend: Optional[str] = None
  num_devices: Optional[int] = None  # data-parallel width; default: every device of the backend
  quiet: bool = False  # no progress lines


# ---------------------------------------------------------------------------------------------
# Steps: pure functions of (state, batch), assembled from a workload's Model.


def init_train_state(model: base.Model, rng: jax.Array, batch) -> dict:
  init_rng, step_rng = jax.random.split(rng)
  variables = dict(model.init(init_rng, batch))
  params = variables.pop("params")
  return {
      "step": jnp.zeros((), jnp.int32),
      "params": params,
      "model_state": variables,
      "opt_state": model.optimizer.init(params),
      "rng": step_rng,
  }


def count_parameters(model: base.Model, batch_size: int = 1) -> int:
  """Trainable parameter count, by abstract evaluation of `init` (nothing is allocated)."""
  def shapes(rng):
    return model.init(rng, model.synthetic_batch(rng, batch_size))["params"]
  params = jax.eval_shape(shapes, jax.random.key(0))
  return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))


def make_train_step(model: base.Model) -> Callable:
  """(state, batch) -> (state, metrics): loss, gradients and the optax update in one function."""

  def train_step(state, batch):
    rng, step_rng = jax.random.split(state["rng"])

    def loss_fn(params):
      variables = {**state["model_state"], "params": params}
      outputs, updates = model.apply(variables, batch, train=True, rng=step_rng)
      loss, metrics = model.loss(outputs, batch)
      return loss, (updates, metrics)

    (loss, (updates, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    with jax.named_scope(OPTIMIZER_SCOPE):
      param_updates, opt_state = model.optimizer.update(grads, state["opt_state"], state["params"])
      params = optax.apply_updates(state["params"], param_updates)
    model_state = {**state["model_state"], **updates}
    step = state["step"] + 1
    if model.on_update is not None:
      variables = model.on_update({**model_state, "params": params}, step)
      model_state = {k: v for k, v in variables.items() if k != "params"}
    new_state = {"step": step, "params": params, "model_state": model_state,
                 "opt_state": opt_state, "rng": rng}
    return new_state, {"loss": loss, **metrics}

  return train_step


def make_infer_step(model: base.Model) -> Callable:
  """(variables, batch, rng) -> outputs of the model in inference mode."""

  def infer_step(variables, batch, rng):
    outputs, _ = model.apply(variables, batch, train=False, rng=rng)
    return outputs

  return infer_step


# ---------------------------------------------------------------------------------------------
# Resolution of a RunSpec into a workload, config, model and data source.


@dataclasses.dataclass(frozen=True)
class Resolved:
  workload: base.Workload
  config: Any
  model: base.Model
  source: Any
  batch_size: int


def resolve(spec: RunSpec) -> Resolved:
  if spec.mode not in MODES:
    raise UsageError(f"unknown mode {spec.mode!r}; modes are: {', '.join(MODES)}")
  if spec.dtype not in DTYPES:
    raise UsageError(f"unknown dtype {spec.dtype!r}; dtypes are: {', '.join(DTYPES)}")
  for name in ("steps", "warmup_steps"):
    if getattr(spec, name) < (1 if name == "steps" else 0):
      raise UsageError(f"--{name} must be {'positive' if name == 'steps' else '>= 0'}, "
                       f"got {getattr(spec, name)}")
  workload = registry.get(spec.workload)
  config = config_lib.preset(workload.presets, spec.preset, workload.name)
  config = config_lib.apply_overrides(config, spec.overrides)
  if spec.batch_size is not None:
    if spec.batch_size <= 0:
      raise UsageError(f"--batch_size must be positive, got {spec.batch_size}")
    config = config_lib.replace(config, batch_size=spec.batch_size)
  elif spec.mode == "infer" and getattr(config, "infer_batch_size", None):
    # A config may infer at another batch than it trains (deepq acts on one state at a time).
    config = config_lib.replace(config, batch_size=config.infer_batch_size)
  source = None
  if spec.data != "synthetic":
    if workload.load_data is None:
      raise UsageError(f"{workload.name} reads no dataset; leave --data at 'synthetic'")
    if not os.path.exists(spec.data):
      raise UsageError(f"--data path does not exist: {spec.data}")
    source, config = workload.load_data(config, spec.data)
  model = workload.build(config, spec.dtype)
  if source is None:
    source = (workload.default_source(config, model) if workload.default_source
              else data_lib.SyntheticSource(model.synthetic_batch))
  return Resolved(workload, config, model, source, config.batch_size)


# ---------------------------------------------------------------------------------------------
# Timing.


def _block(tree):
  return jax.tree.map(lambda x: x.block_until_ready() if hasattr(x, "block_until_ready") else x,
                      tree)


def _percentiles(times: Sequence[float]) -> dict:
  arr = np.asarray(times)
  return {"median": float(np.median(arr)), "p10": float(np.percentile(arr, 10)),
          "p90": float(np.percentile(arr, 90)), "mean": float(arr.mean()),
          "min": float(arr.min()), "max": float(arr.max())}


def _cost(compiled) -> dict:
  try:
    cost = compiled.cost_analysis()
  except Exception:  # some backends do not implement it
    return {}
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return {"flops": float(cost.get("flops", 0.0)),
          "bytes_accessed": float(cost.get("bytes accessed", 0.0))} if cost else {}


def _memory(compiled) -> dict:
  try:
    stats = compiled.memory_analysis()
  except Exception:
    return {}
  if stats is None:
    return {}
  names = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
           "temp_size_in_bytes", "generated_code_size_in_bytes")
  return {n: int(getattr(stats, n)) for n in names if hasattr(stats, n)}


def _peak_device_memory(device) -> Optional[int]:
  try:
    stats = device.memory_stats()
  except Exception:
    return None
  if not stats:
    return None
  return int(stats.get("peak_bytes_in_use", stats.get("bytes_in_use", 0))) or None


class _Printer:
  def __init__(self, prefix: str, quiet: bool):
    self.prefix, self.quiet = prefix, quiet

  def __call__(self, message: str) -> None:
    if not self.quiet:
      print(f"[{self.prefix}] {message}", flush=True)


def _batches(source, batch_size: int, seed: int, train: bool) -> Iterator:
  iterator = source.batches(batch_size, seed=seed, train=train)
  # A source that observes the latest state (an agent acting in an environment) must not run ahead.
  if isinstance(source, data_lib.SyntheticSource) or hasattr(source, "observe"):
    return iterator
  return data_lib.prefetch(iterator)


# ---------------------------------------------------------------------------------------------
# Data parallelism: a 1-D mesh over the devices; batches sharded on their leading axis, state
# replicated, so XLA reduces the gradients with collectives.

DATA_AXIS = "data"


@dataclasses.dataclass(frozen=True)
class Placement:
  mesh: jax.sharding.Mesh
  batch: jax.sharding.NamedSharding
  replicated: jax.sharding.NamedSharding

  @property
  def num_devices(self) -> int:
    return self.mesh.devices.size


def make_placement(devices: Sequence, num_devices: Optional[int], batch_size: int) -> Placement:
  n = len(devices) if num_devices is None else num_devices
  if not 1 <= n <= len(devices):
    raise UsageError(f"--num_devices must be between 1 and {len(devices)} (the "
                     f"{devices[0].platform} devices present), got {n}")
  if batch_size % n:
    raise UsageError(f"global batch {batch_size} does not divide evenly over {n} devices")
  if batch_size % jax.process_count():
    raise UsageError(f"global batch {batch_size} does not divide evenly over "
                     f"{jax.process_count()} processes")
  mesh = jax.sharding.Mesh(np.asarray(devices[:n]), (DATA_AXIS,))
  P = jax.sharding.PartitionSpec
  return Placement(mesh, jax.sharding.NamedSharding(mesh, P(DATA_AXIS)),
                   jax.sharding.NamedSharding(mesh, P()))


def place_batch(batch, placement: Placement):
  """Global numpy batch -> global jax arrays; each process contributes only its own slice."""
  count, index = jax.process_count(), jax.process_index()

  def put(x):
    x = np.asarray(x)
    local = x.shape[0] // count
    return jax.make_array_from_process_local_data(
        placement.batch, x[index * local:(index + 1) * local], x.shape)

  return jax.tree.map(put, batch)


def execute(spec: RunSpec, resolved: Optional[Resolved] = None) -> dict:
  """Runs one workload in one mode and returns its result record (also written to disk when
  `spec.output_dir` is set)."""
  resolved = resolved or resolve(spec)
  devices = environment.select_devices(spec.backend)
  device = devices[0]
  model, source, batch_size = resolved.model, resolved.source, resolved.batch_size
  placement = make_placement(devices, spec.num_devices, batch_size)
  train = spec.mode == "train"
  say = _Printer(f"{spec.workload} {spec.mode}", spec.quiet)
  writes = spec.output_dir and jax.process_index() == 0  # one writer per multi-host run
  run_dir = (results.new_run_dir(spec.output_dir, spec.workload, spec.mode, spec.preset)
             if writes else None)

  batches = _batches(source, batch_size, spec.seed, train)
  put = lambda b: place_batch(b, placement)
  first = put(next(batches))
  replicated = placement.replicated
  # Keys are made inside jit: a host-side key cannot be placed on other hosts' devices.
  make_key = jax.jit(lambda: jax.random.key(spec.seed), out_shardings=replicated)

  with jax.default_device(device):
    if train:
      state = jax.jit(init_train_state, static_argnums=0, out_shardings=replicated)(
          model, make_key(), first)
      step_fn = jax.jit(make_train_step(model), donate_argnums=0, out_shardings=replicated)
      t0 = time.perf_counter()
      lowered = step_fn.lower(state, first)
    else:
      rng = make_key()
      variables = jax.jit(model.init, out_shardings=replicated)(rng, first)
      step_fn = jax.jit(make_infer_step(model))
      infer_rng = jax.jit(lambda k: jax.random.fold_in(k, 1), out_shardings=replicated)(rng)
      t0 = time.perf_counter()
      lowered = step_fn.lower(variables, first, infer_rng)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
  say(f"compiled in {t2 - t0:.2f} s (lower {t1 - t0:.2f} s, compile {t2 - t1:.2f} s)")

  total = spec.warmup_steps + spec.steps
  step_times, losses = [], []
  observe = getattr(source, "observe", None)
  batch = first
  log_every = max(1, total // 10)
  for i in range(total):
    if i > 0:
      if observe is not None:
        observe(state if train else variables)
      batch = put(next(batches))
      _block(batch)
    start = time.perf_counter()
    if train:
      state, metrics = compiled(state, batch)
      out = _block(metrics)
    else:
      out = _block(compiled(variables, batch, infer_rng))
    elapsed = time.perf_counter() - start
    warm = i < spec.warmup_steps
    if not warm:
      step_times.append(elapsed)
    loss = float(out["loss"]) if train else None
    if train and not warm:
      losses.append(loss)
    if i % log_every == 0 or i == total - 1:
      tag = "warm-up " if warm else ""
      loss_text = f" loss {loss:.4f}" if train else ""
      say(f"{tag}step {i + 1}/{total}{loss_text} {elapsed * 1e3:.1f} ms")

  cost = _cost(compiled)
  timing = _percentiles(step_times)
  flops = cost.get("flops")
  figures = {
      "parameters": count_parameters(model),
      "lower_time_s": t1 - t0,
      "compile_time_s": t2 - t1,
      "step_time_s": timing,
      "step_times_s": step_times,
      "examples_per_s": batch_size / timing["median"],
      "flops_per_step": flops,
      "flops_source": "xla_cost_analysis",
      "flops_per_s": flops / timing["median"] if flops else None,
      "bytes_accessed_per_step": cost.get("bytes_accessed"),
      "compiled_memory": _memory(compiled),
      "peak_device_memory_bytes": _peak_device_memory(device),
  }
  if train:
    figures.update(losses=losses, final_loss=losses[-1])
  record = {
      "schema_version": results.SCHEMA_VERSION,
      "status": "completed",
      "workload": spec.workload,
      "mode": spec.mode,
      "preset": spec.preset,
      "spec": dataclasses.asdict(spec),
      "config": config_lib.to_dict(resolved.config),
      "example_unit": resolved.workload.example_unit,
      "data": source.summary(),
      "environment": environment.describe(devices),
      "parallelism": {"num_devices": placement.num_devices, "mesh_axes": [DATA_AXIS],
                      "num_processes": jax.process_count(),
                      "per_device_batch": batch_size // placement.num_devices},
      "figures": figures,
  }
  if run_dir:
    record["run_dir"] = run_dir
    results.write_json_atomic(os.path.join(run_dir, results.RESULT_FILE), record)
  return record


def _si(value: Optional[float], unit: str) -> str:
  if value is None:
    return "n/a"
  for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(value) >= scale:
      return f"{value / scale:.2f} {prefix}{unit}"
  return f"{value:.2f} {unit}"


def format_summary(record: dict) -> str:
  f = record["figures"]
  t = f["step_time_s"]
  mem = f["peak_device_memory_bytes"]
  if mem is None and f["compiled_memory"]:
    mem = sum(v for k, v in f["compiled_memory"].items() if k != "generated_code_size_in_bytes")
    mem_text = f"{_si(mem, 'B')} (compiler estimate)"
  else:
    mem_text = _si(mem, "B")
  lines = [
      f"== {record['workload']} {record['mode']} ({record['preset']}, batch "
      f"{record['config']['batch_size']}, {record['spec']['dtype']}, "
      f"{record['environment']['backend']}) ==",
      f"  compile      {f['lower_time_s'] + f['compile_time_s']:.2f} s "
      f"(lower {f['lower_time_s']:.2f} s, compile {f['compile_time_s']:.2f} s)",
      f"  step time    median {t['median'] * 1e3:.2f} ms  p10 {t['p10'] * 1e3:.2f} ms  "
      f"p90 {t['p90'] * 1e3:.2f} ms  ({len(f['step_times_s'])} steps)",
      f"  throughput   {f['examples_per_s']:.1f} {record['example_unit']}/s",
      f"  model FLOPs  {_si(f['flops_per_step'], 'FLOP')}/step, "
      f"{_si(f['flops_per_s'], 'FLOP/s')}",
      f"  memory       {mem_text}",
  ]
  if "final_loss" in f:
    lines.append(f"  loss         {f['losses'][0]:.4f} -> {f['final_loss']:.4f}")
  if record.get("run_dir"):
    lines.append(f"  result       {os.path.join(record['run_dir'], results.RESULT_FILE)}")
  return "\n".join(lines)
