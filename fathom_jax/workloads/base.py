"""The interface every workload implements.

A workload is a name, a frozen config dataclass with named size presets, and `build(config, dtype)`,
which returns a `Model`: pure functions closed over the config. Training and inference steps are
assembled from a `Model` by `fathom_jax.model_steps`, never by the workloads.
"""

import dataclasses
from typing import Any, Callable, Mapping, Optional

import jax
import optax

Batch = Mapping[str, jax.Array]
Variables = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Model:
  """A workload bound to one config and compute dtype.

  init(rng, batch) -> variables: {'params': ..., plus any non-trainable collections}.
  apply(variables, batch, *, train, rng) -> (outputs, state_updates): `state_updates` holds the
    non-trainable collections the call changed (e.g. batch statistics), {} if none. With
    train=False, outputs are the inference results (logits, decoded sequences, ...).
  loss(outputs, batch) -> (scalar loss, metrics dict).
  optimizer: the optax transformation used for training.
  synthetic_batch(rng, batch_size) -> batch with the real data's shapes, dtypes and value ranges.
  on_update(variables, step) -> variables: optional hook run inside the jitted train step after
    the optimizer update (e.g. copying DQN's target network every N updates).
  before_update(grads) -> grads: optional, the gradients as the optimizer gets them (the tuned
    implementation orders the updates after the backward pass with it; the values are the same).
  compiler_options: XLA options for the compiled steps, by (platform, mode), e.g.
    {("cpu", "train"): {...}}: where a backend's default lowering of the model's ops measured
    slower (benchmarks/NOTES.md). They change how ops are computed, never what.
  """
  init: Callable[..., Variables]
  apply: Callable[..., tuple[Any, Variables]]
  loss: Callable[[Any, Batch], tuple[jax.Array, dict]]
  optimizer: optax.GradientTransformation
  synthetic_batch: Callable[[jax.Array, int], Batch]
  on_update: Optional[Callable[[Variables, jax.Array], Variables]] = None
  before_update: Optional[Callable[[Any], Any]] = None
  compiler_options: Mapping[tuple[str, str], Mapping[str, Any]] = dataclasses.field(
      default_factory=dict, hash=False, compare=False)


@dataclasses.dataclass(frozen=True)
class Workload:
  """A registry entry.

  presets: name -> config instance ('paper' is the paper's sizes; 'small', 'tiny' for quick runs).
  build(config, dtype) -> Model; dtype is the compute dtype ('float32' or 'bfloat16'); parameters
    and optimizer state stay float32.
  load_data(config, path, bad_samples='fail') -> (data source, config): reads the real dataset
    format at `path`; the returned config carries what the data decides (e.g. vocabulary size).
    `bad_samples` is 'fail' (a damaged sample is a DataError naming it) or 'skip' (it is left
    out and counted in the source's summary, see data.BadSamples); damage to a whole file is an
    error either way.
  default_source(config, model) -> data source used when no path is given (synthetic otherwise);
    a source may define `observe(state)`, which the runner calls before each batch with the
    latest train state (or inference variables), e.g. for an agent acting in an environment.
  tokens_per_example(config, mode) -> int: for a sequence model, the tokens one example of a step
    trains on or generates, so that throughput is also stated in tokens.
  phase_tokens(config, mode) -> {named scope: tokens per example}: a step whose phases run under
    named scopes (a language model's prefill and decode), timed and broken down apart in a
    profiled run, per token.
  large_host_buffers: its paper-size steps allocate and free host buffers of tens to hundreds of
    MB every step, so a CPU run keeps freed memory for reuse (host_memory.py); for small steps
    the one allocator arena that takes costs more than it saves.
  """
  name: str
  description: str
  config_cls: type
  presets: Mapping[str, Any]
  build: Callable[[Any, str], Model]
  load_data: Optional[Callable[..., tuple[Any, Any]]] = None
  default_source: Optional[Callable[[Any, Model], Any]] = None
  example_unit: str = "examples"
  tokens_per_example: Optional[Callable[[Any, str], int]] = None
  phase_tokens: Optional[Callable[[Any, str], dict]] = None
  large_host_buffers: bool = False
