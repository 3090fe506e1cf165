"""Checks every workload must pass, shared by the per-workload test modules."""

import functools
import weakref

import jax
import numpy as np

from fathom_jax import compiling
from fathom_jax import config as config_lib
from fathom_jax import model_steps, tuned
from fathom_jax.workloads import registry


def build(name: str, preset: str = "tiny", dtype: str = "float32",
          implementation: str = "reference", options=None, **changes):
  """(config, model) of a workload's preset with `changes`, in either implementation; `options`
  (a dict) sets the tuned implementation's options."""
  workload = registry.get(name)
  config = workload.presets[preset]
  if changes:
    config = config_lib.replace(config, **changes)
  if implementation == "tuned":
    tuned_options = None
    if options:
      tuned_options = config_lib.replace(tuned.options_class(name)(), **options)
    return config, tuned.build(workload, config, dtype, tuned_options)
  assert not options, "options belong to the tuned implementation"
  return config, workload.build(config, dtype)


def parameter_count(name: str, preset: str = "paper", **changes) -> int:
  _, model = build(name, preset, **changes)
  return model_steps.count_parameters(model)


# model -> {(kind, argument types): executable}; a program lives as long as its model.
_ONE_SHOT_PROGRAMS = weakref.WeakKeyDictionary()


def _run_once(kind: str, model, fn, *args):
  """fn(*args) run as compiling.run_once runs it, the executable kept while the model lives:
  tests make a model's batches and states from several seeds, and a program loaded back from
  the persistent cache costs a quarter of its compile."""
  leaves, structure = jax.tree.flatten(args)
  programs = _ONE_SHOT_PROGRAMS.setdefault(model, {})
  key = (kind, structure, tuple(jax.typeof(x) for x in leaves))
  if key not in programs:
    programs[key] = compiling.compile_once(fn, *args)
  return programs[key](*args)


def synthetic_batch(model, seed: int, batch_size: int):
  """The model's synthetic batch, made as the runner makes it: one program, compiled to run once
  (op by op, each random op would compile on its own)."""
  return _run_once(("batch", batch_size), model,
                   lambda key: model.synthetic_batch(key, batch_size), jax.random.key(seed))


def init_train_state(model, rng, batch):
  """The initial train state, made as the runner makes it."""
  return _run_once("train state", model,
                   functools.partial(model_steps.init_train_state, model), rng, batch)


def init_variables(model, rng, batch):
  """The model's variables (inference), made as the runner makes them."""
  return _run_once("variables", model, model.init, rng, batch)


def train_losses(model, batch_size: int, steps: int, seed: int = 0, jit: bool = True):
  """Losses of `steps` train steps on one fixed synthetic batch; `jit=False` runs the steps op
  by op (the batch and the initial state are the same either way)."""
  batch = synthetic_batch(model, seed + 1, batch_size)
  state = init_train_state(model, jax.random.key(seed), batch)
  step = model_steps.make_train_step(model)
  if jit:
    step = jax.jit(step)
  losses = []
  for _ in range(steps):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return np.asarray(losses)


def assert_loss_falls(model, batch_size: int, steps: int = 40, factor: float = 0.9):
  losses = train_losses(model, batch_size, steps)
  assert np.all(np.isfinite(losses)), losses
  assert losses[-5:].mean() < factor * losses[:3].mean(), losses


def assert_deterministic(model, batch_size: int, steps: int = 3):
  a = train_losses(model, batch_size, steps, seed=3)
  b = train_losses(model, batch_size, steps, seed=3)
  np.testing.assert_array_equal(a, b)
  c = train_losses(model, batch_size, steps, seed=4)
  assert not np.array_equal(a, c)


def assert_jit_matches_eager(model, batch_size: int, steps: int = 2, rtol: float = 1e-4):
  jitted = train_losses(model, batch_size, steps, jit=True)
  eager = train_losses(model, batch_size, steps, jit=False)
  np.testing.assert_allclose(jitted, eager, rtol=rtol)


def infer_outputs(model, batch_size: int, seed: int = 0):
  batch = synthetic_batch(model, seed + 1, batch_size)
  variables = init_variables(model, jax.random.key(seed), batch)
  return jax.jit(model_steps.make_infer_step(model))(variables, batch, jax.random.key(seed + 2))
