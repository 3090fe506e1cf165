"""The reference and the tuned implementation of every workload: the same variables, and from
the same parameters and batch the same loss, gradients and inference outputs (float32); the
reference's accelerator programs keep XLA's own ops."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fathom_jax import model_steps, runner, tuned
from fathom_jax.errors import UsageError
from fathom_jax.workloads import registry
from tests import workload_checks as checks

NAMES = registry.expand("all")
# Batch norm over few samples of 1x1 maps amplifies float32 rounding: ResNet-50's tiny preset at
# batch 4 parts by 3e-5 in the loss and 5e-4 in the gradients, at batch 16 by 7e-6 and 5e-5
# (the other workloads by under 1e-6).
BATCH = {"residual": 16}


def _loss_grads_and_outputs(model, variables, batch, rng):
  """(loss, gradients) of one training step's loss, and the inference outputs: one program."""
  def loss_fn(params):
    outputs, _ = model.apply({**variables, "params": params}, batch, train=True, rng=rng)
    return model.loss(outputs, batch)[0]
  loss, grads = jax.value_and_grad(loss_fn)(variables["params"])
  return loss, grads, model_steps.make_infer_step(model)(variables, batch, rng)


def _compiled_for_comparison(name, fn, *args):
  """fn(*args) compiled as the suite compiles (XLA's lowest backend optimisation level), except
  ResNet-50's, compiled at the default level as runs compile it: at the lowest level the float32
  rounding differs, and its batch norm over few samples amplifies that until the same reference
  program's gradients move by 1.3e-2 (the other workloads agree at either level)."""
  options = {"xla_backend_optimization_level": 3} if name == "residual" else {}
  return jax.jit(fn).lower(*args).compile(**({"compiler_options": options} if options else {}))(
      *args)


def _structure(tree):
  return jax.tree.map(lambda x: (x.shape, x.dtype), tree)


def _relative_error(a, b) -> float:
  flat = lambda tree: np.concatenate([np.ravel(np.asarray(x, np.float64))
                                      for x in jax.tree.leaves(tree)])
  return float(np.linalg.norm(flat(a) - flat(b)) / max(np.linalg.norm(flat(b)), 1e-30))


@pytest.mark.parametrize("name", NAMES)
def test_reference_and_tuned_compute_the_same(name):
  _, reference = checks.build(name)
  _, tuned_model = checks.build(name, implementation="tuned")
  batch = checks.synthetic_batch(reference, 1, BATCH.get(name, 4))
  key = jax.random.key(0)
  assert _structure(jax.eval_shape(tuned_model.init, key, batch)) == \
      _structure(jax.eval_shape(reference.init, key, batch))
  variables = checks.init_variables(reference, key, batch)
  rng = jax.random.key(2)
  want, got = (_compiled_for_comparison(name, functools.partial(_loss_grads_and_outputs, model),
                                        variables, batch, rng)
               for model in (reference, tuned_model))
  (loss, grads, outputs), (want_loss, want_grads, want_outputs) = got, want
  np.testing.assert_allclose(loss, want_loss, rtol=5e-5)
  assert _structure(grads) == _structure(want_grads)
  assert _relative_error(grads, want_grads) < 5e-4, _relative_error(grads, want_grads)
  assert _structure(outputs) == _structure(want_outputs)
  for a, b in zip(jax.tree.leaves(outputs), jax.tree.leaves(want_outputs)):
    if jnp.issubdtype(b.dtype, jnp.floating):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()))
    else:  # decoded labels and tokens
      np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["alexnet", "vgg", "residual"])
def test_paper_parameter_counts_hold_for_both(name):
  _, reference = checks.build(name, "paper")
  _, tuned_model = checks.build(name, "paper", implementation="tuned")
  assert model_steps.count_parameters(reference) == model_steps.count_parameters(tuned_model) > 0


@functools.lru_cache(maxsize=None)
def _traced_train_step(name: str):
  """The reference train step of the tiny preset, traced from shapes (batch 8)."""
  _, model = checks.build(name)
  batch = jax.eval_shape(lambda k: model.synthetic_batch(k, 8), jax.random.key(0))
  state = jax.eval_shape(functools.partial(model_steps.init_train_state, model), jax.random.key(0),
                         batch)
  return jax.jit(model_steps.make_train_step(model)).trace(state, batch)


def _lowered_train_step(name: str, platform: str) -> str:
  return _traced_train_step(name).lower(lowering_platforms=(platform,)).as_text()


# Conditionals that a model's own algorithm holds: DQN copies its target network every N updates.
CONDITIONALS = {"deepq": 1}


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("name", NAMES)
def test_reference_programs_for_accelerators_hold_nothing_of_ours(name, platform):
  text = _lowered_train_step(name, platform)
  assert "stablehlo.custom_call" not in text
  assert text.count("stablehlo.case") + text.count("stablehlo.if") == CONDITIONALS.get(name, 0)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_resnet50_accelerator_programs_keep_xlas_own_ops(platform):
  text = _lowered_train_step("residual", platform)
  # 53 convolutions forward (the stem, 48 in blocks, 4 projections: 36 of them 1x1), each with
  # an input and a kernel gradient but the stem's input gradient: 158. The 1x1 layers' forward
  # and input-gradient convolutions take a 1x1 kernel: 72.
  convolutions = [line for line in text.splitlines() if "stablehlo.convolution" in line]
  assert len(convolutions) == 158
  assert sum(bool(re.search(r": \(tensor<[^>]*>, tensor<1x1x", c)) for c in convolutions) == 72
  assert "stablehlo.reduce_window" in text and "stablehlo.select_and_scatter" in text
  assert "stablehlo.dot_general" in text  # the classifier
  for ours in ("stablehlo.custom_call", "stablehlo.case", "stablehlo.if"):
    assert ours not in text, ours
  assert text.count("stablehlo.transpose") <= 1  # the classifier's kernel gradient; no layouts


def test_tuned_applies_only_where_it_was_measured():
  assert tuned.choose(None, "cpu") == "tuned" and tuned.choose(None, "gpu") == "reference"
  assert tuned.choose(None, "tpu") == "reference"
  assert tuned.choose("reference", "cpu") == "reference"
  with pytest.raises(UsageError, match="cpu only.*on gpu run --implementation=reference"):
    tuned.choose("tuned", "gpu")
  with pytest.raises(UsageError, match="unknown implementation 'fast'"):
    tuned.choose("fast", "cpu")


def test_tuned_options_live_beside_the_papers_config():
  # The tuning's own choices are no field of any workload's config, and every workload whose
  # tuning has options keeps them apart from its config's fields.
  for name in NAMES:
    options = tuned.options_class(name)
    fields = set(registry.get(name).config_cls.__dataclass_fields__)
    assert not {"winograd", "channels_first_stages"} & fields, name
    if options is not None:
      assert not set(options.__dataclass_fields__) & fields, name


def test_tuned_options_are_set_with_overrides():
  spec = lambda implementation, *overrides: runner.RunSpec(
      "residual", overrides=("depth=18",) + overrides, implementation=implementation)
  resolved = runner.resolve(spec("tuned", "winograd=false", "channels_first_stages=1,2"))
  assert resolved.config.depth == 18
  assert resolved.options == tuned.options_class("residual")(False, (1, 2))
  assert runner.resolve(spec("tuned")).options == tuned.options_class("residual")()
  assert runner.resolve(spec("reference")).options is None
  with pytest.raises(UsageError, match="'winograd' is an option of the tuned implementation"):
    runner.resolve(spec("reference", "winograd=false"))
  with pytest.raises(UsageError, match="stage numbers 0-3"):
    runner.resolve(spec("tuned", "channels_first_stages=1,4"))
  with pytest.raises(UsageError, match="unknown config field 'winograd'"):
    runner.resolve(runner.RunSpec("memnet", overrides=("winograd=false",)))
