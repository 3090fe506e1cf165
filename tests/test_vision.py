import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fathom_jax import model_steps
from fathom_jax.errors import UsageError
from fathom_jax.tuned import alexnet as tuned_alexnet
from fathom_jax.tuned import layers
from fathom_jax.workloads import alexnet, vision
from tests import workload_checks as checks


def conv(k, cin, cout, bias=True):
  return k * k * cin * cout + (cout if bias else 0)


def dense(nin, nout):
  return nin * nout + nout


def key(seed, impl=None):
  """A PRNG key. Tests that are not about randomness pass impl='rbg': the same models and steps,
  but XLA compiles its random-bit generator far faster than threefry on two cores."""
  return jax.random.key(seed, impl=impl)


@functools.lru_cache(maxsize=None)
def jitted(model):
  """One compiled init and train step per model, shared by the runs of a test."""
  return (functools.partial(checks.init_train_state, model),
          jax.jit(model_steps.make_train_step(model)))


def train(model, batch_size, steps, seed=0, impl=None):
  """(losses, final state) of `steps` jitted train steps on one fixed synthetic batch."""
  batch = checks.synthetic_batch(model, seed + 1, batch_size)
  init, step = jitted(model)
  state = init(key(seed, impl), batch)
  losses = []
  for _ in range(steps):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return np.asarray(losses), state


def assert_trains_deterministically(model, batch_size, steps, factor, impl=None):
  """Loss falls; the same seed repeats it bit for bit, another seed does not."""
  losses, state = train(model, batch_size, steps, impl=impl)
  assert np.all(np.isfinite(losses)), losses
  assert losses[-5:].mean() < factor * losses[:3].mean(), losses
  np.testing.assert_array_equal(train(model, batch_size, 4, impl=impl)[0], losses[:4])
  assert not np.array_equal(train(model, batch_size, 4, seed=1, impl=impl)[0], losses[:4])
  return state


# --- parameter counts, derived from the architectures -----------------------------------------


def test_alexnet_parameter_count():
  convs = (conv(11, 3, 64) + conv(5, 64, 192) + conv(3, 192, 384) + conv(3, 384, 256)
           + conv(3, 256, 256))
  fcs = dense(256 * 6 * 6, 4096) + dense(4096, 4096) + dense(4096, 1000)
  assert checks.parameter_count("alexnet") == convs + fcs == 61_100_840


def vgg_count(blocks):
  total, cin = 0, 3
  for convs, width in zip(blocks, (64, 128, 256, 512, 512)):
    for _ in range(convs):
      total, cin = total + conv(3, cin, width), width
  return total + dense(512 * 7 * 7, 4096) + dense(4096, 4096) + dense(4096, 1000)


def test_vgg_parameter_counts():
  assert checks.parameter_count("vgg") == vgg_count((2, 2, 4, 4, 4)) == 143_667_240
  assert checks.parameter_count("vgg", depth=16) == vgg_count((2, 2, 3, 3, 3)) == 138_357_544
  assert checks.parameter_count("vgg", depth=11) == vgg_count((1, 1, 2, 2, 2))


def resnet_count(stages, bottleneck):
  bn = lambda c: 2 * c  # scale and bias; running statistics are not trainable
  total, cin = conv(7, 3, 64, bias=False) + bn(64), 64
  for i, blocks in enumerate(stages):
    width = 64 * 2**i
    cout = 4 * width if bottleneck else width
    for j in range(blocks):
      if bottleneck:
        total += (conv(1, cin, width, False) + bn(width) + conv(3, width, width, False) + bn(width)
                  + conv(1, width, cout, False) + bn(cout))
      else:
        total += conv(3, cin, width, False) + bn(width) + conv(3, width, width, False) + bn(width)
      if cin != cout or (i > 0 and j == 0):  # projection shortcut
        total += conv(1, cin, cout, False) + bn(cout)
      cin = cout
  return total + dense(cin, 1000)


def test_residual_parameter_counts():
  assert checks.parameter_count("residual") == resnet_count((3, 4, 6, 3), True) == 25_557_032
  assert checks.parameter_count("residual", depth=18) == resnet_count((2, 2, 2, 2), False) \
      == 11_689_512
  assert checks.parameter_count("residual", depth=101) == resnet_count((3, 4, 23, 3), True) \
      == 44_549_160
  assert checks.parameter_count("residual", depth=34) == resnet_count((3, 4, 6, 3), False)
  # Where the stride sits changes FLOPs, not parameters.
  assert checks.parameter_count("residual", stride_in_3x3=True) == 25_557_032


def test_residual_running_statistics_are_not_trainable():
  _, model = checks.build("residual", "paper")
  batch = jax.eval_shape(lambda: model.synthetic_batch(jax.random.key(0), 1))
  variables = jax.eval_shape(model.init, jax.random.key(0), batch)
  stats = sum(np.prod(x.shape) for x in jax.tree.leaves(variables["batch_stats"]))
  # mean and variance for every normalised channel: one per scale/bias pair.
  scales = sum(np.prod(x.shape) for path, x in jax.tree_util.tree_leaves_with_path(
      variables["params"]) if "BatchNorm" in jax.tree_util.keystr(path))
  assert stats == scales > 0


# --- shapes, training, determinism --------------------------------------------------------------


@pytest.mark.parametrize("name", ["alexnet", "vgg", "residual"])
def test_shapes(name):
  config, model = checks.build(name)
  batch = checks.synthetic_batch(model, 0, 5)
  variables = jax.eval_shape(model.init, jax.random.key(1), batch)
  logits, _ = jax.eval_shape(functools.partial(model.apply, train=False), variables, batch, rng=None)
  assert logits.shape == (5, config.num_classes) and logits.dtype == jnp.float32
  assert batch["images"].shape == (5, config.image_size, config.image_size, 3)
  assert batch["labels"].dtype == jnp.int32
  assert 0 <= int(batch["labels"].min()) and int(batch["labels"].max()) < config.num_classes
  # Normalised ImageNet range: (0 - 0.485) / 0.229 ... (1 - 0.406) / 0.225.
  assert -2.2 < float(batch["images"].min()) and float(batch["images"].max()) < 2.7


def test_dropout_only_in_training():
  _, model = checks.build("alexnet")
  batch = checks.synthetic_batch(model, 0, 4)
  variables = checks.init_variables(model, key(1, "rbg"), batch)
  apply = jax.jit(model.apply, static_argnames="train")
  run = lambda train, seed: np.asarray(
      apply(variables, batch, train=train, rng=key(seed, "rbg"))[0])
  np.testing.assert_array_equal(run(False, 0), run(False, 1))
  assert np.all(np.isfinite(run(False, 0)))
  assert not np.allclose(run(True, 0), run(True, 1))


def test_alexnet_at_other_image_sizes_pools_to_six():
  # 96x96 leaves 2x2 before the adaptive pool; the fc layer still sees 6x6.
  _, model = checks.build("alexnet", image_size=96, pooled_size=6)
  batch = checks.synthetic_batch(model, 0, 2)
  variables = jax.eval_shape(model.init, jax.random.key(0), batch)
  logits, _ = jax.eval_shape(functools.partial(model.apply, train=False), variables, batch, rng=None)
  assert logits.shape == (2, 4)
  params = variables["params"]
  assert params["Dense_0"]["kernel"].shape == (16 * 6 * 6, 128)


def test_adaptive_pool_matches_bin_averages():
  x = np.random.default_rng(0).normal(size=(2, 5, 7, 3)).astype(np.float32)
  out = np.asarray(vision.adaptive_avg_pool(jnp.asarray(x), 3))
  for i in range(3):
    for j in range(3):
      h0, h1 = (i * 5) // 3, -(-(i + 1) * 5 // 3)
      w0, w1 = (j * 7) // 3, -(-(j + 1) * 7 // 3)
      np.testing.assert_allclose(out[:, i, j], x[:, h0:h1, w0:w1].mean((1, 2)), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(vision.adaptive_avg_pool(jnp.asarray(x[:, :4, :4]), 2)),
                             x[:, :4, :4].reshape(2, 2, 2, 2, 2, 3).mean((2, 4)), rtol=1e-5)


@pytest.mark.parametrize("lrn", [alexnet.local_response_norm, tuned_alexnet.local_response_norm],
                         ids=["reference", "tuned"])
def test_local_response_norm_formula(lrn):
  x = np.random.default_rng(1).normal(size=(1, 2, 2, 7)).astype(np.float32)
  out = np.asarray(lrn(jnp.asarray(x), 5, 2.0, 1e-4, 0.75))
  for c in range(7):
    window = (x[..., max(0, c - 2):c + 3] ** 2).sum(-1)
    np.testing.assert_allclose(out[..., c], x[..., c] / (2.0 + 1e-4 * window) ** 0.75, rtol=1e-5)


def _plain_lrn(x):
  # The formula as written, differentiated by autodiff.
  window = sum(jnp.pad(x * x, ((0, 0),) * 3 + ((2, 2),))[..., i:i + x.shape[-1]] for i in range(5))
  return x / (2.0 + 1e-4 * window) ** 0.75


def test_local_response_norm_gradient_matches_autodiff():
  x = jax.random.normal(jax.random.key(0), (2, 3, 3, 9)) * 30  # large enough that t moves
  cotangent = jax.random.normal(jax.random.key(1), x.shape)
  expected = jax.vjp(_plain_lrn, x)[1](cotangent)[0]
  ours = lambda x, *r: tuned_alexnet.local_response_norm(x, 5, 2.0, 1e-4, 0.75, *r)
  np.testing.assert_allclose(jax.vjp(ours, x)[1](cotangent)[0], expected, rtol=1e-5, atol=1e-6)
  # With a run-time scalar (a jit argument, so XLA keeps the conditional): the same gradient.
  written = jax.jit(lambda x, r: jax.vjp(lambda x: ours(x, r), x)[1](cotangent)[0])
  np.testing.assert_allclose(written(x, jnp.float32(1)), expected, rtol=1e-5, atol=1e-6)


def test_local_response_norm_writes_a_pool_gradient_out_once():
  # A max pool's gradient is a sum of nine strided shares, which the LRN's backward pass reads
  # twice. Without the replicated scalar XLA wrote every share out for the two readers.
  x = jax.ShapeDtypeStruct((2, 15, 15, 8), jnp.float32)
  def full_size_fusions(*lrn_scalar):
    def loss(x, pool_scalar, *lrn_scalar):
      y = tuned_alexnet.local_response_norm(x, 5, 2.0, 1e-4, 0.75, *lrn_scalar)
      return (layers.max_pool(y, 3, 2, replicated=pool_scalar) ** 2).sum()
    text = jax.jit(jax.grad(loss)).trace(x, jnp.float32(1), *lrn_scalar).lower().compile().as_text()
    entry = text[text.index("ENTRY"):]
    return len(re.findall(r"= f32\[2,15,15,8\]\{[0-9,]*\} fusion\(", entry))
  assert full_size_fusions() >= 9
  assert full_size_fusions(jnp.float32(1)) < 9


def test_alexnet_trains_deterministically():
  # The default PRNG, as runs use it: parameters and dropout masks come from threefry keys.
  _, model = checks.build("alexnet")
  assert_trains_deterministically(model, 8, steps=80, factor=0.8)


def test_vgg_trains_deterministically():
  _, model = checks.build("vgg")
  assert_trains_deterministically(model, 8, steps=100, factor=0.8, impl="rbg")


def test_residual_trains_deterministically():
  _, model = checks.build("residual")
  state = assert_trains_deterministically(model, 8, steps=30, factor=0.5, impl="rbg")
  # The train step carries the batch statistics forward: every running average has left its
  # initial value (mean 0, variance 1).
  for path, stat in jax.tree_util.tree_leaves_with_path(state["model_state"]["batch_stats"]):
    start = 0.0 if jax.tree_util.keystr(path).endswith("['mean']") else 1.0
    assert not np.allclose(stat, start), path


def test_residual_batch_norm_statistics():
  # Depth 18 compiles faster than 50 and normalises the same way.
  _, model = checks.build("residual", depth=18)
  batch = checks.synthetic_batch(model, 1, 4)
  variables = checks.init_variables(model, key(0, "rbg"), batch)
  apply = jax.jit(model.apply, static_argnames="train")
  # Training normalises with the batch's statistics and returns new running averages; an
  # example's logits depend on the rest of its batch.
  other = checks.synthetic_batch(model, 2, 4)
  mixed = {k: v.at[0].set(batch[k][0]) for k, v in other.items()}
  logits, updates = apply(variables, batch, train=True, rng=None)
  assert set(updates) == {"batch_stats"}
  moved = jax.tree.map(lambda a, b: not np.allclose(a, b), variables["batch_stats"],
                       updates["batch_stats"])
  assert all(jax.tree.leaves(moved))
  assert not np.allclose(logits[0], apply(variables, mixed, train=True, rng=None)[0][0], atol=1e-3)
  # Inference uses the frozen running averages: no updates, and the example's logits are its own.
  variables = {**variables, **updates}
  logits, updates = apply(variables, batch, train=False, rng=None)
  assert updates == {}
  np.testing.assert_allclose(logits[0], apply(variables, mixed, train=False, rng=None)[0][0],
                             rtol=1e-4, atol=1e-5)


def test_residual_stage_layout_changes_no_result():
  # Stages stored CHWN in training (the default: 0, 1, 2) or none: the same parameters, the same
  # loss and running statistics, and the same first update, to float32 rounding: 1.6e-4 of the
  # update's norm here, where scaling the images by 1 + 1e-6 moves it by 3.2e-4 (batch norm at
  # this size amplifies rounding, and single elements differ more). ResNet-18: the same stages
  # as ResNet-50, fewer layers to compile.
  def first_step(stages):
    _, model = checks.build("residual", implementation="tuned", depth=18,
                            options={"channels_first_stages": stages})
    batch = checks.synthetic_batch(model, 1, 8)
    init, step = jitted(model)
    state = init(key(0, "rbg"), batch)
    new, metrics = step(state, batch)
    return (float(metrics["loss"]), new["model_state"],
            jax.tree.map(lambda a, b: a - b, new["params"], state["params"]))

  loss, stats, update = first_step((0, 1, 2))
  want_loss, want_stats, want_update = first_step(())
  assert jax.tree.map(jnp.shape, update) == jax.tree.map(jnp.shape, want_update)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-4)
  for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(want_stats)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])
  error = np.linalg.norm(flat(update) - flat(want_update)) / np.linalg.norm(flat(want_update))
  assert error < 1e-3, error


@pytest.mark.parametrize("name,changes", [("alexnet", {}), ("vgg", {}), ("residual", {"depth": 18})])
def test_bfloat16_computes_in_bf16_with_f32_params(name, changes):
  _, model = checks.build(name, dtype="bfloat16", **changes)
  batch = checks.synthetic_batch(model, 1, 4)
  init = functools.partial(model_steps.init_train_state, model)
  shapes = jax.eval_shape(init, jax.random.key(0), batch)
  assert {x.dtype for x in jax.tree.leaves(shapes["params"])} == {jnp.dtype(jnp.float32)}
  assert {x.dtype for x in jax.tree.leaves(shapes["opt_state"])
          if jnp.issubdtype(x.dtype, jnp.floating)} == {jnp.dtype(jnp.float32)}
  logits, _ = jax.eval_shape(functools.partial(model.apply, train=False),
                             {**shapes["model_state"], "params": shapes["params"]}, batch, rng=None)
  assert logits.dtype == jnp.bfloat16
  state = checks.init_train_state(model, key(0, "rbg"), batch)
  lowered = jax.jit(model_steps.make_train_step(model)).lower(state, batch)
  # Every convolution (forward and backward) computes in bf16.
  conv_types = re.findall(r"= (\w+)\[[^\]]*\]\S* convolution\(", lowered.as_text(dialect="hlo"))
  assert conv_types and set(conv_types) == {"bf16"}
  step = lowered.compile()
  for _ in range(2):
    state, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"]))


# --- config validation --------------------------------------------------------------------------


@pytest.mark.parametrize("name,changes,message", [
    ("alexnet", {"image_size": 48}, "too small"),
    ("alexnet", {"lrn_size": 4}, "odd"),
    ("vgg", {"depth": 17}, "depth"),
    ("vgg", {"image_size": 16}, "too small"),
    ("residual", {"depth": 42}, "depth"),
    ("residual", {"optimizer": "rmsprop"}, "optimizer"),
])
def test_bad_configs_are_usage_errors(name, changes, message):
  with pytest.raises(UsageError, match=message):
    checks.build(name, **changes)


def test_adam_is_a_config_choice():
  config, _ = checks.build("alexnet", optimizer="adam", learning_rate=1e-3, weight_decay=0.0)
  optimizer = vision.make_optimizer(config)
  grads = {"w": jnp.array([1.0, -4.0])}
  updates, state = optimizer.update(grads, optimizer.init(grads))
  assert isinstance(state[0], optax.ScaleByAdamState)
  np.testing.assert_allclose(updates["w"], [-1e-3, 1e-3], rtol=1e-4)  # Adam's first step: -lr*sign


def test_sgd_rate_scales_linearly_with_batch():
  grads = {"w": jnp.ones(3)}
  for batch_size, expected in ((64, -0.005), (256, -0.02)):
    config, _ = checks.build("alexnet", "paper", batch_size=batch_size, momentum=0.0,
                             weight_decay=0.0)
    optimizer = vision.make_optimizer(config)
    updates, _ = optimizer.update(grads, optimizer.init(grads))
    np.testing.assert_allclose(updates["w"], expected, rtol=1e-6)
  # Weight decay adds decay * w to the gradient before the SGD step.
  config, _ = checks.build("residual", "paper", batch_size=256, momentum=0.0)
  optimizer = vision.make_optimizer(config)
  params = {"w": jnp.full(3, 2.0)}
  updates, _ = optimizer.update(grads, optimizer.init(params), params)
  np.testing.assert_allclose(updates["w"], -0.1 * (1 + 1e-4 * 2.0), rtol=1e-6)
