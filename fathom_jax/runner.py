"""The shared runner: resolves a RunSpec into a workload, its model and data, compiles its train
or inference step ahead of time (`model_steps`, `compiling`, `placement`), times it, and writes the
run's result file (`results`)."""

import contextlib
import concurrent.futures
import dataclasses
import functools
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator, Optional

import jax
import numpy as np

from fathom_jax import compiling
from fathom_jax import config as config_lib
from fathom_jax import data as data_lib
from fathom_jax import environment, model_steps, results, tuned
from fathom_jax import placement as placement_lib
from fathom_jax import errors
from fathom_jax.errors import RunFailed, UsageError
from fathom_jax.workloads import base, registry

MODES = ("train", "infer")
DTYPES = ("float32", "bfloat16")
# The compiler's memory figures a run records.
COMPILED_MEMORY = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                   "temp_size_in_bytes", "generated_code_size_in_bytes")
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
  execution: str = "compiled"  # one of compiling.EXECUTIONS
  bad_samples: str = "fail"  # a damaged sample in a real dataset: 'fail', or 'skip' and count it
  quiet: bool = False  # no progress lines
  implementation: Optional[str] = None  # 'reference' or 'tuned'; default: tuned.default(platform)
  component_depth: str = "layer"  # the breakdown's model components (analysis.components)


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
  options: Any = None  # the tuned implementation's options, where it has any


MAX_STEPS = 10**9  # a billion steps: beyond any run, and far below what overflows a counter
MAX_BATCH = 2**31 - 1  # XLA's shapes are 64-bit, but no step holds more examples than this


def resolve(spec: RunSpec, platform: Optional[str] = None) -> Resolved:
  """The spec's workload, config, model and data; `platform` names the devices the program is
  for (default: those of spec.backend on this machine)."""
  if spec.mode not in MODES:
    raise UsageError(f"unknown mode {spec.mode!r}; modes are: {', '.join(MODES)}")
  if spec.dtype not in DTYPES:
    raise UsageError(f"unknown dtype {spec.dtype!r}; dtypes are: {', '.join(DTYPES)}")
  if spec.execution not in compiling.EXECUTIONS:
    raise UsageError(f"unknown execution {spec.execution!r}; executions are: "
                     f"{', '.join(compiling.EXECUTIONS)}")
  from fathom_jax.analysis import components
  try:
    components.depth_of(spec.component_depth)
  except ValueError as e:
    raise UsageError(f"--component_depth: {e}") from None
  if spec.bad_samples not in data_lib.BAD_SAMPLES:
    raise UsageError(f"unknown bad_samples {spec.bad_samples!r}; choices are: "
                     f"{', '.join(data_lib.BAD_SAMPLES)}")
  for name in ("steps", "warmup_steps"):
    if getattr(spec, name) < (1 if name == "steps" else 0):
      raise UsageError(f"--{name} must be {'positive' if name == 'steps' else '>= 0'}, "
                       f"got {getattr(spec, name)}")
    if getattr(spec, name) > MAX_STEPS:
      raise UsageError(f"--{name} must be at most {MAX_STEPS:,}, got {getattr(spec, name)}")
  if not -2**63 <= spec.seed < 2**63:
    raise UsageError(f"--seed must fit in 64 bits (between -2**63 and 2**63 - 1), got {spec.seed}")
  workload = registry.get(spec.workload)
  config = config_lib.preset(workload.presets, spec.preset, workload.name)
  config_overrides, option_overrides = tuned.split_overrides(workload.name, spec.overrides)
  config = config_lib.apply_overrides(config, config_overrides)
  if spec.batch_size is not None:
    if not 0 < spec.batch_size <= MAX_BATCH:
      raise UsageError(f"--batch_size must be positive and at most {MAX_BATCH:,}, got "
                       f"{spec.batch_size}")
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
  platform = platform or environment.select_devices(spec.backend)[0].platform
  implementation = tuned.choose(spec.implementation, platform)
  if option_overrides and implementation != "tuned":
    name = option_overrides[0].partition("=")[0].strip()
    raise UsageError(f"{name!r} is an option of the tuned implementation; it does not apply to "
                     f"the {implementation} implementation")
  options = None
  if implementation == "tuned":
    options = tuned.make_options(workload.name, option_overrides)
    model = tuned.build(workload, config, spec.dtype, options)
  else:
    model = workload.build(config, spec.dtype)
  if source is None:
    source = (workload.default_source(config, model) if workload.default_source
              else data_lib.SyntheticSource(model.synthetic_batch))
  return Resolved(workload, config, model, source, config.batch_size, implementation, options)


# ---------------------------------------------------------------------------------------------
# Timing.


def _block(tree):
  return jax.tree.map(lambda x: x.block_until_ready() if hasattr(x, "block_until_ready") else x,
                      tree)


def _peak_device_memory(device) -> Optional[int]:
  try:
    stats = device.memory_stats()
  except Exception:
    return None
  if not stats:
    return None
  return int(stats.get("peak_bytes_in_use", stats.get("bytes_in_use", 0))) or None


PAUSE_VARIABLE = "FATHOM_JAX_PAUSE_AT"  # a test hook: stop for a signal at a named phase


def pause_at(phase: str, interruptible: bool = True) -> None:
  """Where $FATHOM_JAX_PAUSE_AT names this phase (compile, data, init, profile, write), says so
  on stdout and waits up to a minute, or until a held signal arrives: a test sends its signal
  at a known moment."""
  if os.environ.get(PAUSE_VARIABLE) != phase:
    return
  print(f"paused at {phase}", flush=True)
  deadline = time.monotonic() + 60
  while time.monotonic() < deadline and not errors.pending():
    time.sleep(0.05)
  if interruptible:
    errors.raise_if_interrupted()


def _timed(fn: Callable, *args, **kwargs) -> tuple[Any, float]:
  start = time.perf_counter()
  return fn(*args, **kwargs), time.perf_counter() - start


def _duration(seconds: float) -> str:
  if seconds < 120:
    return f"{seconds:.0f} s"
  return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


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
                   available: Optional[int], from_shapes: bool = False) -> RunFailed:
  """`needed` is the compiler's figure, or with `from_shapes` the lower bound from the step's
  shapes (compiling.memory_floor_bytes)."""
  need = ("memory exhausted" if not needed
          else f"by its shapes the step needs at least {results.si(needed, 'B')}" if from_shapes
          else f"the compiler says the step needs {results.si(needed, 'B')}")
  have = f", the device has {results.si(available, 'B')} free" if available else ""
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
  placement = placement_lib.make_placement(devices, spec.num_devices, batch_size)
  train = spec.mode == "train"
  say = _Printer(f"{spec.workload} {spec.mode}", spec.quiet)
  writes = spec.output_dir and jax.process_index() == 0  # one writer per multi-host run
  run_dir = (results.new_run_dir(spec.output_dir, spec.workload, spec.mode, spec.preset)
             if writes else None)
  figures = {"parameters": model_steps.count_parameters(model), "step_times_s": []}
  if train:
    figures["losses"] = []
  started = time.perf_counter()
  record = {
      "schema_version": results.SCHEMA_VERSION,
      "status": "running",
      "provenance": environment.provenance(),
      "workload": spec.workload,
      "mode": spec.mode,
      "preset": spec.preset,
      "implementation": resolved.implementation,
      "spec": dataclasses.asdict(spec),
      "config": config_lib.to_dict(resolved.config),
      "implementation_options": (config_lib.to_dict(resolved.options)
                                 if resolved.options is not None else None),
      "example_unit": resolved.workload.example_unit,
      "environment": environment.describe(devices),
      "parallelism": {"num_devices": placement.num_devices, "mesh_axes": [placement_lib.DATA_AXIS],
                      "num_processes": jax.process_count(),
                      "per_device_batch": batch_size // placement.num_devices},
      "figures": figures,
  }
  if run_dir:
    record["run_dir"] = run_dir
  try:
    phase_tokens = resolved.workload.phase_tokens
    _measure(spec, model, source, batch_size, placement, figures, say, run_dir,
             phase_tokens(resolved.config, spec.mode) if phase_tokens else None)
    record["status"] = "completed"
  except RunFailed as e:
    record.update(status="failed", error=str(e))
    raise
  except KeyboardInterrupt:
    record.update(status="interrupted", error="interrupted by the user")
    raise
  except jax.errors.JaxRuntimeError as e:
    cause = errors.os_error_in(str(e))  # a full disk reads RESOURCE_EXHAUSTED too
    if cause is not None:
      record.update(status="failed", error=errors.describe_os_error(cause))
      raise cause from None
    if not _is_oom(e):
      raise
    memory = figures.get("compiled_memory", {})
    failure = _out_of_memory(spec, batch_size, compiling.bytes_needed(memory) or None,
                             _available_bytes(device))
    record.update(status="failed", error=str(failure))
    raise failure from None
  except OSError as e:  # the environment's (a full disk): named for its cause, as on stderr
    record.update(status="failed", error=errors.describe_os_error(e))
    raise
  except Exception as e:
    record.update(status="failed", error=f"{type(e).__name__}: {e}".splitlines()[0])
    raise
  finally:
    record["data"] = source.summary()
    tokens = resolved.workload.tokens_per_example
    if tokens is not None:
      figures["tokens_per_example"] = tokens(resolved.config, spec.mode)
    record["figures"] = results.summarise(figures, batch_size)
    record["provenance"]["duration_s"] = time.perf_counter() - started
    if run_dir:
      pause_at("write", interruptible=False)
      results.write_json_atomic(os.path.join(run_dir, results.RESULT_FILE), record)
  errors.raise_if_interrupted()  # a signal that came while the result was written
  return record


def _check_batch(batch, expected, workload: str) -> None:
  got = jax.tree.map(lambda x: (x.shape, str(x.dtype)), batch)
  want = jax.tree.map(lambda x: (x.shape, str(x.dtype)), expected)
  if got != want:
    raise UsageError(f"{workload}: the data yields batches {got}, the model expects {want}")


def _measure(spec: RunSpec, model: base.Model, source, batch_size: int,
             placement: placement_lib.Placement,
             figures: dict, say: Callable, run_dir: Optional[str] = None,
             phases: Optional[dict] = None) -> None:
  """Compiles the step and times it, filling `figures` as it goes; `phases` are the step's
  named phases with their tokens per example (Workload.phase_tokens)."""
  errors.raise_if_interrupted()  # a signal while the process started
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
        jax.eval_shape(functools.partial(model_steps.init_train_state, model), key_shape,
                       batch_shape))
    step_fn = jax.jit(model_steps.make_train_step(model), donate_argnums=0,
                      out_shardings=replicated)
    args_shape = (state_shape, batch_shape)
  else:
    variables_shape = with_sharding(jax.eval_shape(model.init, key_shape, batch_shape))
    step_fn = jax.jit(model_steps.make_infer_step(model))
    args_shape = (variables_shape, batch_shape, key_shape)
  pause_at("compile")
  say(f"compiling the {'train' if train else 'inference'} step")
  t_trace = time.perf_counter()
  traced = step_fn.trace(*args_shape)
  # A batch that cannot fit is refused from the shapes, before minutes of compiling.
  figures["memory_floor_bytes"] = compiling.memory_floor_bytes(
      traced.jaxpr, args_shape, sharded_argnums=(1,), num_devices=placement.num_devices)
  available = _available_bytes(device)
  if available is not None and figures["memory_floor_bytes"] > available:
    raise _out_of_memory(spec, batch_size, figures["memory_floor_bytes"], available,
                         from_shapes=True)
  init_fn = functools.partial(model_steps.init_train_state, model) if train else model.init
  # The one-shot program that makes the parameters compiles beside the step (XLA's compiler
  # releases the GIL): where a core is free, its compile time is hidden behind the step's.
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    init_program = pool.submit(_timed, compiling.compile_once, init_fn, key_shape, batch_shape,
                               platform=device.platform, out_shardings=replicated)
    lowered = traced.lower()
    t1 = time.perf_counter()
    # Eager runs compile too: the compiled program's cost and memory analyses describe the step.
    compiled, dropped = compiling.compile_step(
        lowered, spec.execution, model.compiler_options.get((device.platform, spec.mode), {}))
    t2 = time.perf_counter()
    init_executable, figures["init_compile_time_s"] = init_program.result()
  errors.raise_if_interrupted()
  if dropped:
    figures["compiler_options_dropped"] = dropped
    say(f"this XLA does not take the model's options ({dropped['error']}); compiled without them")
  say(f"compiled in {t2 - t_trace:.2f} s (lower {t1 - t_trace:.2f} s, compile {t2 - t1:.2f} s)")
  cost = compiling.cost_analysis(compiled)
  figures.update(
      lower_time_s=t1 - t_trace, compile_time_s=t2 - t1, flops_per_step=cost.get("flops"),
      flops_source="xla_cost_analysis", bytes_accessed_per_step=cost.get("bytes accessed"),
      compiled_memory=compiling.memory_analysis(compiled, COMPILED_MEMORY))
  needed = compiling.bytes_needed(figures["compiled_memory"])
  if available is not None and needed > available:
    raise _out_of_memory(spec, batch_size, needed, available)

  pause_at("data")
  t0 = time.perf_counter()
  batches = _batches(source, batch_size, spec.seed, train)
  put = placement_lib.placer(source, placement)
  first = _block(put(next(batches)))
  _check_batch(first, batch_shape, spec.workload)
  figures["data_time_s"] = time.perf_counter() - t0
  say(f"first batch ready in {figures['data_time_s']:.2f} s")
  errors.raise_if_interrupted()
  pause_at("init")
  t0 = time.perf_counter()
  # Keys are made inside jit: a host-side key cannot be placed on other hosts' devices.
  make_key = jax.jit(lambda: jax.random.key(spec.seed), out_shardings=replicated)
  if train:
    state = init_executable(make_key(), first)
  else:
    rng = make_key()
    variables = init_executable(rng, first)
    infer_rng = jax.jit(lambda k: jax.random.fold_in(k, 1), out_shardings=replicated)(rng)
  _block(state if train else variables)
  figures["init_time_s"] = time.perf_counter() - t0
  say(f"{'train state' if train else 'parameters'} initialised in "
      f"{figures['init_time_s']:.2f} s (its program compiled in "
      f"{figures['init_compile_time_s']:.2f} s beside the step's)")
  errors.raise_if_interrupted()

  call = compiled
  if spec.execution == "eager":
    step = model_steps.make_train_step(model) if train else model_steps.make_infer_step(model)
    call = compiling.eager_step(step)
  total = spec.warmup_steps + spec.steps
  observe = getattr(source, "observe", None)
  batch = first
  log_every = max(1, total // 10)
  last_log = time.perf_counter()
  with _interrupt_between_steps() as raise_if_interrupted:
    for i in range(total):
      raise_if_interrupted()
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
        timed = figures["step_times_s"]
        remaining = np.median(timed) * (total - i - 1) if timed else 0.0
        left = f", about {_duration(remaining)} left" if remaining >= 1 else ""
        say(f"{tag}step {i + 1}/{total}{loss_text} {elapsed * 1e3:.1f} ms{left}")
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
    pause_at("profile")
    figures["profile"] = profiling.capture(
        run_dir, spec.mode, spec.steps, prepare, run, programs, figures["step_times_s"],
        say, f"{spec.workload} {spec.mode} ({spec.preset})",
        component_depth=spec.component_depth,
        phase_tokens={name: n * batch_size for name, n in (phases or {}).items()})
    errors.raise_if_interrupted()
  figures["peak_device_memory_bytes"] = _peak_device_memory(device)


@contextlib.contextmanager
def _interrupt_between_steps():
  """Ctrl-C or SIGTERM during the measured loop takes effect between steps: an exception raised
  inside a dispatch can leave the runtime's threads waiting at exit. A second signal interrupts
  at once. Yields the check to call between steps (errors.raise_if_interrupted)."""
  if threading.current_thread() is not threading.main_thread():
    yield lambda: None
    return
  previous = {sig: signal.signal(sig, errors._record) for sig in (signal.SIGINT, signal.SIGTERM)}
  try:
    yield errors.raise_if_interrupted
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)


