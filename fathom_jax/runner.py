"""The shared runner: builds the jitted train and inference steps of any workload, compiles them
ahead of time, times them, and writes the run's result file."""

import contextlib
import dataclasses
import functools
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fathom_jax import compiling
from fathom_jax import config as config_lib
from fathom_jax import data as data_lib
from fathom_jax import environment, results, scopes
from fathom_jax.errors import RunFailed, UsageError
from fathom_jax import tuned
from fathom_jax.workloads import base, registry

MODES = ("train", "infer")
DTYPES = ("float32", "bfloat16")
# How the step executes: as XLA compiles it; compiled with every fusion pass off, so each op is
# its own kernel; or dispatched op by op from Python, loops unrolled (the 2016 graph executors'
# view of the program).
EXECUTIONS = ("compiled", "unfused", "eager")
# Pass names of the fusion passes of XLA's CPU and GPU pipelines; unknown names are ignored.
FUSION_PASSES = ("fusion", "priority-fusion", "multi_output_fusion", "horizontal-loop-fusion",
                 "fusion-merger", "sibling-multi-output-fusion", "cpu-instruction-fusion")


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
  allow_nonfinite: bool = False  # keep going past a NaN/inf loss (for studies of divergence)
  profile: bool = False  # trace the measured steps again under the profiler; op breakdown
  execution: str = "compiled"  # one of EXECUTIONS
  bad_samples: str = "fail"  # a damaged sample in a real dataset: 'fail', or 'skip' and count it
  quiet: bool = False  # no progress lines
  implementation: Optional[str] = None  # 'reference' or 'tuned'; default: tuned.default(platform)


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
    if model.before_update is not None:
      grads = model.before_update(grads)
    with jax.named_scope(scopes.OPTIMIZATION):
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
  implementation: str


def resolve(spec: RunSpec) -> Resolved:
  if spec.mode not in MODES:
    raise UsageError(f"unknown mode {spec.mode!r}; modes are: {', '.join(MODES)}")
  if spec.dtype not in DTYPES:
    raise UsageError(f"unknown dtype {spec.dtype!r}; dtypes are: {', '.join(DTYPES)}")
  if spec.execution not in EXECUTIONS:
    raise UsageError(f"unknown execution {spec.execution!r}; executions are: "
                     f"{', '.join(EXECUTIONS)}")
  if spec.bad_samples not in data_lib.BAD_SAMPLES:
    raise UsageError(f"unknown bad_samples {spec.bad_samples!r}; choices are: "
                     f"{', '.join(data_lib.BAD_SAMPLES)}")
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
    source, config = workload.load_data(config, spec.data, bad_samples=spec.bad_samples)
  platform = environment.select_devices(spec.backend)[0].platform
  implementation = tuned.choose(spec.implementation, platform)
  model = (tuned.build(workload, config, spec.dtype) if implementation == "tuned"
           else workload.build(config, spec.dtype))
  if source is None:
    source = (workload.default_source(config, model) if workload.default_source
              else data_lib.SyntheticSource(model.synthetic_batch))
  return Resolved(workload, config, model, source, config.batch_size, implementation)


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


def _needed_bytes(memory: dict) -> int:
  return (memory.get("argument_size_in_bytes", 0) + memory.get("output_size_in_bytes", 0)
          + memory.get("temp_size_in_bytes", 0) - memory.get("alias_size_in_bytes", 0))


def _available_bytes(device) -> Optional[int]:
  """What one device can hold: its allocator's limit, or the host's free memory for the CPU."""
  try:
    stats = device.memory_stats()
  except Exception:
    stats = None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
  if device.platform == "cpu" and hasattr(os, "sysconf"):
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  return None


def _out_of_memory(spec: RunSpec, batch_size: int, needed: Optional[int],
                   available: Optional[int]) -> RunFailed:
  need = f"the compiler says the step needs {_si(needed, 'B')}" if needed else "memory exhausted"
  have = f", the device has {_si(available, 'B')} free" if available else ""
  return RunFailed(f"out of memory: {spec.workload} {spec.mode} at batch {batch_size}: {need}"
                   f"{have}; try a smaller --batch_size")


def _is_oom(error: Exception) -> bool:
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def execute(spec: RunSpec, resolved: Optional[Resolved] = None) -> dict:
  """Runs one workload in one mode and returns its result record (also written to disk when
  `spec.output_dir` is set).

  A run that fails (non-finite loss, memory exhausted) or is interrupted still writes its
  record, with status 'failed' or 'interrupted' and the steps it finished, then raises.
  """
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
  figures = {"parameters": count_parameters(model), "step_times_s": []}
  if train:
    figures["losses"] = []
  record = {
      "schema_version": results.SCHEMA_VERSION,
      "status": "running",
      "workload": spec.workload,
      "mode": spec.mode,
      "preset": spec.preset,
      "implementation": resolved.implementation,
      "spec": dataclasses.asdict(spec),
      "config": config_lib.to_dict(resolved.config),
      "example_unit": resolved.workload.example_unit,
      "environment": environment.describe(devices),
      "parallelism": {"num_devices": placement.num_devices, "mesh_axes": [DATA_AXIS],
                      "num_processes": jax.process_count(),
                      "per_device_batch": batch_size // placement.num_devices},
      "figures": figures,
  }
  if run_dir:
    record["run_dir"] = run_dir
  try:
    _measure(spec, model, source, batch_size, placement, figures, say, run_dir)
    record["status"] = "completed"
  except RunFailed as e:
    record.update(status="failed", error=str(e))
    raise
  except KeyboardInterrupt:
    record.update(status="interrupted", error="interrupted by the user")
    raise
  except jax.errors.JaxRuntimeError as e:
    if not _is_oom(e):
      raise
    memory = figures.get("compiled_memory", {})
    failure = _out_of_memory(spec, batch_size, _needed_bytes(memory) or None,
                             _available_bytes(device))
    record.update(status="failed", error=str(failure))
    raise failure from None
  except Exception as e:
    record.update(status="failed", error=f"{type(e).__name__}: {e}".splitlines()[0])
    raise
  finally:
    record["data"] = source.summary()
    record["figures"] = _summarise(figures, batch_size)
    if run_dir:
      results.write_json_atomic(os.path.join(run_dir, results.RESULT_FILE), record)
  return record


def _check_batch(batch, expected, workload: str) -> None:
  got = jax.tree.map(lambda x: (x.shape, str(x.dtype)), batch)
  want = jax.tree.map(lambda x: (x.shape, str(x.dtype)), expected)
  if got != want:
    raise UsageError(f"{workload}: the data yields batches {got}, the model expects {want}")


def _summarise(figures: dict, batch_size: int) -> dict:
  """Adds the figures derived from the measured step times (as far as there are any)."""
  times = figures["step_times_s"]
  figures["steps_completed"] = len(times)
  if not times:
    return figures
  timing = _percentiles(times)
  flops = figures.get("flops_per_step")
  figures.update(step_time_s=timing, examples_per_s=batch_size / timing["median"],
                 flops_per_s=flops / timing["median"] if flops else None)
  if figures.get("losses"):
    figures["final_loss"] = figures["losses"][-1]
  return figures


def _measure(spec: RunSpec, model: base.Model, source, batch_size: int, placement: Placement,
             figures: dict, say: Callable, run_dir: Optional[str] = None) -> None:
  """Compiles the step and times it, filling `figures` as it goes."""
  train = spec.mode == "train"
  device = placement.mesh.devices.flat[0]
  replicated = placement.replicated
  # Compiled from shapes alone, so a batch too large for the device is caught by the memory
  # check below before any of it is allocated.
  batch_shape = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=placement.batch),
      jax.eval_shape(lambda key: model.synthetic_batch(key, batch_size), jax.random.key(0)))
  key_shape = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype,
                                   sharding=replicated)
  with_sharding = lambda tree: jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), tree)
  if train:
    state_shape = with_sharding(
        jax.eval_shape(functools.partial(init_train_state, model), key_shape, batch_shape))
    step_fn = jax.jit(make_train_step(model), donate_argnums=0, out_shardings=replicated)
    args_shape = (state_shape, batch_shape)
  else:
    variables_shape = with_sharding(jax.eval_shape(model.init, key_shape, batch_shape))
    step_fn = jax.jit(make_infer_step(model))
    args_shape = (variables_shape, batch_shape, key_shape)
  t0 = time.perf_counter()
  lowered = step_fn.lower(*args_shape)
  t1 = time.perf_counter()
  # Eager runs compile too: the compiled program's cost and memory analyses describe the step.
  compiled, dropped = compile_step(
      lowered, spec.execution, model.compiler_options.get((device.platform, spec.mode), {}))
  t2 = time.perf_counter()
  if dropped:
    figures["compiler_options_dropped"] = dropped
    say(f"this XLA does not take the model's options ({dropped['error']}); compiled without them")
  say(f"compiled in {t2 - t0:.2f} s (lower {t1 - t0:.2f} s, compile {t2 - t1:.2f} s)")
  cost = _cost(compiled)
  figures.update(
      lower_time_s=t1 - t0, compile_time_s=t2 - t1, flops_per_step=cost.get("flops"),
      flops_source="xla_cost_analysis", bytes_accessed_per_step=cost.get("bytes_accessed"),
      compiled_memory=_memory(compiled))
  needed, available = _needed_bytes(figures["compiled_memory"]), _available_bytes(device)
  if available is not None and needed > available:
    raise _out_of_memory(spec, batch_size, needed, available)

  batches = _batches(source, batch_size, spec.seed, train)
  put = _placer(source, placement)
  first = put(next(batches))
  _check_batch(first, batch_shape, spec.workload)
  # Keys are made inside jit: a host-side key cannot be placed on other hosts' devices.
  make_key = jax.jit(lambda: jax.random.key(spec.seed), out_shardings=replicated)
  if train:
    state = compiling.run_once(functools.partial(init_train_state, model), make_key(), first,
                               platform=device.platform, out_shardings=replicated)
  else:
    rng = make_key()
    variables = compiling.run_once(model.init, rng, first, platform=device.platform,
                                   out_shardings=replicated)
    infer_rng = jax.jit(lambda k: jax.random.fold_in(k, 1), out_shardings=replicated)(rng)

  call = compiled
  if spec.execution == "eager":
    call = eager_step(make_train_step(model) if train else make_infer_step(model))
  total = spec.warmup_steps + spec.steps
  observe = getattr(source, "observe", None)
  batch = first
  log_every = max(1, total // 10)
  last_log = time.perf_counter()
  with _interrupt_between_steps() as interrupted:
    for i in range(total):
      if interrupted():
        raise KeyboardInterrupt
      if i > 0:
        if observe is not None:
          observe(state if train else variables)
        batch = put(next(batches))
        _block(batch)
      start = time.perf_counter()
      if train:
        state, metrics = call(state, batch)
        out = _block(metrics)
      else:
        out = _block(call(variables, batch, infer_rng))
      elapsed = time.perf_counter() - start
      warm = i < spec.warmup_steps
      loss = float(out["loss"]) if train else None
      if not warm:
        figures["step_times_s"].append(elapsed)
        if train:
          figures["losses"].append(loss)
      if train and not np.isfinite(loss):
        message = f"{spec.workload}: non-finite loss ({loss}) at step {i + 1}"
        if not spec.allow_nonfinite:
          raise RunFailed(message + "; --allow_nonfinite continues past it")
        figures.setdefault("nonfinite_steps", []).append(i + 1)
      now = time.perf_counter()
      if i <= spec.warmup_steps or i % log_every == 0 or i == total - 1 or now - last_log > 2.0:
        last_log = now
        tag = "warm-up " if warm else ""
        loss_text = f" loss {loss:.4f}" if train else ""
        say(f"{tag}step {i + 1}/{total}{loss_text} {elapsed * 1e3:.1f} ms")
  if spec.profile:  # the same number of steps again, traced; see fathom_jax.profiling
    from fathom_jax import profiling

    def prepare():
      if observe is not None:
        observe(state if train else variables)
      return _block(put(next(batches)))

    def run(batch):
      nonlocal state
      if train:
        state, metrics = call(state, batch)
        return _block(metrics)
      return _block(call(variables, batch, infer_rng))

    # An eager step runs one small program per op (the trace embeds them), not this one.
    programs = None if spec.execution == "eager" else (lowered, compiled)
    figures["profile"] = profiling.capture(
        run_dir, spec.mode, spec.steps, prepare, run, programs, figures["step_times_s"],
        say, f"{spec.workload} {spec.mode} ({spec.preset})")
  figures["peak_device_memory_bytes"] = _peak_device_memory(device)


@contextlib.contextmanager
def _interrupt_between_steps():
  """Ctrl-C during the measured loop takes effect between steps: a KeyboardInterrupt raised
  inside a dispatch can leave the runtime's threads waiting at exit. A second Ctrl-C interrupts
  at once. Yields a function that tells whether Ctrl-C was pressed."""
  if threading.current_thread() is not threading.main_thread():
    yield lambda: False
    return
  pressed = []

  def handler(signum, frame):
    if pressed:
      raise KeyboardInterrupt
    pressed.append(signum)
  previous = signal.signal(signal.SIGINT, handler)
  try:
    yield lambda: bool(pressed)
  finally:
    signal.signal(signal.SIGINT, previous)


def _placer(source, placement: Placement) -> Callable:
  """Puts a host batch on the devices. A synthetic source cycles a fixed pool of batches (kept
  alive by its iterator, so their ids are stable): each is placed once, not on every step."""
  if not isinstance(source, data_lib.SyntheticSource):
    return lambda batch: place_batch(batch, placement)
  placed = {}

  def put(batch):
    if id(batch) not in placed:
      placed[id(batch)] = place_batch(batch, placement)
    return placed[id(batch)]
  return put


# What XLA says when it does not know an option, or not one of its values (options and their
# enums come and go between jaxlib releases).
_UNKNOWN_OPTION_ERRORS = ("No such compile option", "While setting option")


def compile_step(lowered, execution: str, model_options=None) -> tuple:
  """`lowered` compiled with `compile_options`, and None; or, where this XLA rejects one of the
  model's own options (they are speed choices, not semantics), compiled without them and a
  record of what was dropped and why."""
  try:
    return lowered.compile(**compile_options(execution, model_options)), None
  except jax.errors.JaxRuntimeError as e:
    message = str(e).strip()
    if not model_options or not any(m in message for m in _UNKNOWN_OPTION_ERRORS):
      raise
  compiled = lowered.compile(**compile_options(execution))
  return compiled, {"options": {k: str(v) for k, v in model_options.items()},
                    "error": message.splitlines()[0]}


def compile_options(execution: str, model_options=None) -> dict:
  """Keyword arguments of `Lowered.compile`: the model's own XLA options for this platform and
  mode, and for unfused runs the fusion passes turned off."""
  options = dict(model_options or {})
  if execution == "unfused":
    options = compiling.combined(options, {"xla_disable_hlo_passes": ",".join(FUSION_PASSES)})
  return {"compiler_options": options} if options else {}


def eager_step(step: Callable) -> Callable:
  """`step` dispatched primitive by primitive: jit disabled inside it, loops run in Python."""
  def run(*args):
    with jax.disable_jit():
      return step(*args)
  return run


def _si(value: Optional[float], unit: str) -> str:
  if value is None:
    return "n/a"
  for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(value) >= scale:
      return f"{value / scale:.2f} {prefix}{unit}"
  return f"{value:.2f} {unit}"


def format_summary(record: dict) -> str:
  f = record["figures"]
  if not f["step_times_s"]:
    return (f"== {record['workload']} {record['mode']}: {record['status']} before any measured "
            f"step: {record.get('error', '')}")
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
      f"{record['environment']['backend']}, {record.get('implementation', 'tuned')}) ==",
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
  bad = (record.get("data") or {}).get("bad_samples")
  if bad:  # only under --bad_samples=skip
    more = bad["skipped"] - len(bad["first"])
    detail = "; ".join(bad["first"] + ([f"{more} more"] if more else []))
    lines.append(f"  bad samples  {bad['skipped']} skipped" + (f": {detail}" if detail else ""))
  if record.get("run_dir"):
    lines.append(f"  result       {os.path.join(record['run_dir'], results.RESULT_FILE)}")
  return "\n".join(lines)
