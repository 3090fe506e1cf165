"""The train and inference steps of any workload: pure functions of (state, batch), assembled
from its Model, and its initial train state."""

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fathom_jax import scopes
from fathom_jax.workloads import base


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
