"""The tuned train step: parameter updates ordered after the backward pass."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fathom_jax import model_steps
from fathom_jax.tuned import updates
from tests import workload_checks as checks


@pytest.fixture
def ordered_always(monkeypatch):
  monkeypatch.setattr(updates, "ORDERED_UPDATES_MIN_BYTES", 0)


def test_after_backward_changes_no_bit(ordered_always):
  # No subnormals: XLA's CPU arithmetic flushes them to zero in any case.
  special = jnp.array([np.nan, np.inf, -np.inf, -0.0, 0.0, 1e-30, -3.5, 7.0], jnp.float32)
  grads = {"a": special, "b": jnp.arange(6.0).reshape(2, 3) - 2.5, "empty": jnp.zeros((0,)),
           "half": special.astype(jnp.bfloat16)}
  out = jax.jit(updates.after_backward)(grads)
  for name in grads:
    assert out[name].dtype == grads[name].dtype
    np.testing.assert_array_equal(np.asarray(out[name]).view(np.uint8),
                                  np.asarray(grads[name]).view(np.uint8), err_msg=name)


def test_small_parameter_trees_are_left_alone():
  grads = {"w": jnp.ones((256, 256)), "b": jnp.ones((256,))}
  assert updates.after_backward(grads) is grads


def _parameter_copies(model, batch):
  """Parameter arrays of more than 64 elements that the compiled train step copies."""
  state = jax.eval_shape(functools.partial(model_steps.init_train_state, model), jax.random.key(0),
                         batch)
  step = jax.jit(model_steps.make_train_step(model), donate_argnums=0)
  text = step.lower(state, batch).compile().as_text()
  copies = re.findall(r"= f32\[([\d,]*)\]\{[\d,]*\} copy\(%state__params(\S*?)\.\d+\)", text)
  return sorted(name for dims, name in copies
                if np.prod([int(d) for d in dims.split(",") if d]) > 64)


def test_ordered_updates_copy_no_parameter(monkeypatch):
  _, model = checks.build("alexnet", implementation="tuned")
  batch = checks.synthetic_batch(model, 1, 2)
  monkeypatch.setattr(updates, "ORDERED_UPDATES_MIN_BYTES", 1 << 60)
  unordered = _parameter_copies(model, batch)
  monkeypatch.setattr(updates, "ORDERED_UPDATES_MIN_BYTES", 0)
  ordered = _parameter_copies(model, batch)
  # Every layer whose input gradient reads its kernel: four convolutions and three dense layers.
  assert len([n for n in unordered if "kernel" in n]) == 7, unordered
  assert ordered == [], ordered


def test_ordered_updates_train_the_same(ordered_always, monkeypatch):
  _, model = checks.build("vgg", implementation="tuned")
  batch = checks.synthetic_batch(model, 1, 2)

  def losses():
    state = checks.init_train_state(model, jax.random.key(0), batch)
    step = jax.jit(model_steps.make_train_step(model))
    out = []
    for _ in range(4):
      state, metrics = step(state, batch)
      out.append(float(metrics["loss"]))
    return out

  ordered = losses()
  monkeypatch.setattr(updates, "ORDERED_UPDATES_MIN_BYTES", 1 << 60)
  np.testing.assert_allclose(ordered, losses(), rtol=1e-5)
  assert ordered[-1] < ordered[0]
