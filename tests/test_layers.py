"""The CPU-friendly layers compute what flax's layers compute: outputs, gradients, variables."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fathom_jax import compiling
from fathom_jax.analysis import categories, hlo
from fathom_jax.tuned import layers


def _grads(f, *args):
  """f(*args) and the gradients of a fixed random projection of it with respect to args."""
  out = f(*args)
  probe = jax.random.normal(jax.random.key(9), out.shape, out.dtype)
  return out, jax.grad(lambda *a: (f(*a) * probe).sum(), argnums=tuple(range(len(args))))(*args)


def _close(a, b, tol=1e-5):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.shape == y.shape
    np.testing.assert_allclose(x, y, rtol=tol, atol=tol * float(jnp.abs(y).max()))


@pytest.mark.parametrize("window,strides,padding", [
    (1, 1, "VALID"), (1, 2, "VALID"), (3, 1, [(1, 1), (1, 1)]), (3, 2, [(1, 1), (1, 1)]),
    (7, 2, [(3, 3), (3, 3)]), (5, 1, "VALID")])
def test_conv_matches_flax(window, strides, padding):
  x = jax.random.normal(jax.random.key(0), (2, 9, 9, 5))
  kwargs = dict(features=6, kernel_size=(window, window), strides=(strides, strides),
                padding=padding)
  ours, theirs = layers.Conv(**kwargs), nn.Conv(**kwargs)
  variables = theirs.init(jax.random.key(1), x)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x)) == \
      jax.tree.map(jnp.shape, variables)
  _close(ours.init(jax.random.key(1), x), variables, 0)  # same initial values
  _close(_grads(lambda v, x: ours.apply(v, x), variables, x),
         _grads(lambda v, x: theirs.apply(v, x), variables, x))


@pytest.mark.parametrize("window,strides,padding", [
    (1, 1, "VALID"), (1, 2, "VALID"), (3, 1, [(1, 1), (1, 1)]), (3, 2, [(1, 1), (1, 1)])])
def test_channels_first_conv_is_the_same_layer(window, strides, padding):
  # Same variables; CHWN in and out, the NHWC layer's values and gradients with axes exchanged.
  x = jax.random.normal(jax.random.key(0), (2, 9, 9, 5))
  kwargs = dict(features=6, kernel_size=(window, window), strides=(strides, strides),
                padding=padding)
  nhwc, chwn = layers.Conv(**kwargs), layers.Conv(**kwargs, channels_first=True)
  swap = lambda a: jnp.swapaxes(a, 0, 3)
  variables = nhwc.init(jax.random.key(1), x)
  _close(chwn.init(jax.random.key(1), swap(x)), variables, 0)
  out, (dv, dx) = _grads(lambda v, x: swap(chwn.apply(v, swap(x))), variables, x)
  _close((out, dv, dx), _grads(lambda v, x: nhwc.apply(v, x), variables, x))


def test_batch_norm_over_the_first_axis():
  # (A smaller mean than below: E[x^2] - E[x]^2 loses more to the order of the sums at 3.)
  x = 1.0 + jax.random.normal(jax.random.key(0), (4, 5, 5, 6)) * jnp.linspace(0.1, 2.0, 6)
  last, first = layers.BatchNorm(False, 0.9), layers.BatchNorm(False, 0.9, axis=0)
  swap = lambda a: jnp.swapaxes(a, 0, 3)
  variables = last.init(jax.random.key(1), x)
  variables = {**variables, "params": {"scale": jnp.linspace(0.5, 1.5, 6),
                                       "bias": jnp.linspace(-1.0, 1.0, 6)}}
  assert jax.tree.map(jnp.shape, first.init(jax.random.key(1), swap(x))) == \
      jax.tree.map(jnp.shape, variables)

  def train(module, layout):
    def f(params, x):
      y, stats = module.apply({**variables, "params": params}, layout(x), mutable=["batch_stats"])
      return layout(y), stats
    return f

  ours = _grads(lambda p, x: train(first, swap)(p, x)[0], variables["params"], x)
  _close(ours, _grads(lambda p, x: train(last, lambda a: a)(p, x)[0], variables["params"], x),
         1e-4)
  _close(train(first, swap)(variables["params"], x)[1],
         train(last, lambda a: a)(variables["params"], x)[1])
  infer = lambda m, layout: layout(m.clone(use_running_average=True).apply(variables, layout(x)))
  _close(infer(first, swap), infer(last, lambda a: a))


def test_batch_norm_matches_flax():
  # Channels with a large mean and a small spread, as after a ReLU, test the statistics.
  x = 3.0 + jax.random.normal(jax.random.key(0), (4, 5, 5, 6)) * jnp.linspace(0.1, 2.0, 6)
  kwargs = dict(momentum=0.9, epsilon=1e-5)
  ours = layers.BatchNorm(use_running_average=False, **kwargs)
  theirs = nn.BatchNorm(use_running_average=False, **kwargs)
  variables = theirs.init(jax.random.key(1), x)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x)) == \
      jax.tree.map(jnp.shape, variables)
  # Non-trivial scale and bias, so that their gradients and the input's mix.
  params = {"scale": jnp.linspace(0.5, 1.5, 6), "bias": jnp.linspace(-1.0, 1.0, 6)}
  variables = {**variables, "params": params}

  def train(module):
    def f(params, x):
      y, _ = module.apply({**variables, "params": params}, x, mutable=["batch_stats"])
      return y
    return f

  _close(_grads(train(ours), params, x), _grads(train(theirs), params, x), 1e-4)
  stats = lambda m: m.apply(variables, x, mutable=["batch_stats"])[1]
  _close(stats(ours), stats(theirs))
  infer = lambda m: m.clone(use_running_average=True).apply({**variables, **stats(theirs)}, x)
  _close(infer(ours), infer(theirs))


@pytest.mark.parametrize("window,stride,padding", [(3, 2, 1), (3, 2, 0), (2, 2, 0), (3, 1, 1)])
def test_max_pool_matches_flax(window, stride, padding):
  # ReLU outputs: many windows hold ties (zeros), whose gradient goes to the first of them.
  x = jax.nn.relu(jax.random.normal(jax.random.key(0), (2, 11, 11, 3)))
  x = x.at[0, 2, 2, 0].set(x[0, 2, 3, 0])  # a tie of positive values too
  pads = [(padding, padding)] * 2
  ours = lambda x: layers.max_pool(x, window, stride, padding)
  theirs = lambda x: nn.max_pool(x, (window, window), (stride, stride), pads)
  _close(_grads(ours, x), _grads(theirs, x), 1e-6)
  # With a run-time scalar (a jit argument, so XLA keeps the conditional) the window offset of
  # each maximum is written out first: same values.
  written = jax.jit(lambda x, r: layers.max_pool(x, window, stride, padding, replicated=r))
  _close(_grads(lambda x: written(x, jnp.float32(1)), x), _grads(theirs, x), 1e-6)


def test_max_pool_gradient_writes_the_maximum_offsets_out_given_a_replicated_scalar():
  x = jax.ShapeDtypeStruct((2, 16, 16, 8), jnp.float32)
  def gradient_text(*replicated):
    pool = lambda x, *r: (layers.max_pool(x, 3, 2, 1, *r) ** 2).sum()
    args = (x, *(jax.ShapeDtypeStruct((), jnp.float32) for _ in replicated))
    return jax.jit(jax.grad(pool)).lower(*args).compile().as_text()
  assert "conditional(" not in gradient_text()
  assert "conditional(" in gradient_text(1.0)
  assert "s8[2,8,8,8]" in gradient_text(1.0)  # one small integer per output, written once


@pytest.mark.parametrize("size", [8, 9])
@pytest.mark.parametrize("window,stride,padding", [
    (3, 1, ((1, 1), (1, 1))), (3, 2, ((1, 1), (1, 1))), (7, 2, ((3, 3), (3, 3))),
    (5, 3, ((0, 0), (0, 0))), (3, 2, ((0, 1), (0, 1)))])
def test_windowed_conv_gradients_are_autodiffs_exactly(size, window, stride, padding):
  x = jax.random.normal(jax.random.key(0), (2, size, size, 3))
  w = jax.random.normal(jax.random.key(1), (window, window, 3, 4))
  def loss(conv):
    return lambda x, w: (conv(x, w, (stride, stride), padding) ** 2).sum()
  ours = jax.jit(jax.grad(loss(layers.windowed_conv), (0, 1)))(x, w)
  autodiff = jax.jit(jax.grad(loss(layers._conv), (0, 1)))(x, w)
  _close(ours, autodiff, 0)


def _shared_relu(materialize):
  def f(x, token):
    y = jnp.maximum(x * 2.0 + 1.0, 0.0)
    y = layers.materialize(y, token) if materialize else y
    return y * 3.0 + jnp.sin(y)
  return f


def test_materialize_is_the_identity_with_its_gradient():
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 16))
  token = jnp.float32(1.0)
  _close(_grads(_shared_relu(True), x, token)[:1], _grads(_shared_relu(False), x, token)[:1], 0)
  _close(_grads(_shared_relu(True), x, token)[1][0], _grads(_shared_relu(False), x, token)[1][0], 0)
  # Even a NaN token, the run-time predicate's other branch, returns x.
  _close(jax.jit(layers.materialize)(x, jnp.float32(jnp.nan)), x, 0)


def test_materialize_writes_a_value_out_once_on_cpu():
  # Without it XLA recomputes the shared relu inside both consumers' fusions; with it the value
  # is computed by one fusion and read by the others.
  x = jax.ShapeDtypeStruct((256, 256), jnp.float32)
  token = jax.ShapeDtypeStruct((), jnp.float32)
  def relu_fusions(materialize):
    text = jax.jit(_shared_relu(materialize)).lower(x, token).compile().as_text()
    fusions = [line for line in text.splitlines() if " fusion(" in line]
    return text, sum("maximum" in line.split("=")[0] for line in fusions)
  text, computed = relu_fusions(False)
  assert "conditional(" not in text
  text, computed_once = relu_fusions(True)
  assert "conditional(" in text and computed_once == 1


def test_materialize_leaves_other_platforms_alone():
  # Only CPU gets the run-time predicate (a conditional on a GPU is a host round trip); the
  # platform switch itself is a constant that XLA folds away.
  def lowered(platform):
    return jax.jit(layers.materialize).trace(jnp.ones(4), jnp.float32(1)).lower(
        lowering_platforms=(platform,)).as_text()
  assert "stablehlo.compare" in lowered("cpu")
  assert "stablehlo.compare" not in lowered("cuda")


def _pooled_then_transposed(relayout):
  def f(x, w, token):
    y = jnp.maximum(x[:, ::2, ::2], x[:, 1::2, 1::2])  # a pool's taps
    perm = (3, 1, 2, 0)
    y = layers.relayout(y, perm, token) if relayout else y.transpose(perm)
    return (jnp.einsum("chwn,cd->dhwn", y, w) ** 2).sum()
  return f


def test_relayout_is_a_transpose_with_its_gradient():
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 16))
  w = jax.random.normal(jax.random.key(1), (16, 8))
  token = jnp.float32(1.0)
  ours = jax.jit(jax.value_and_grad(_pooled_then_transposed(True), (0, 1)))(x, w, token)
  plain = jax.jit(jax.value_and_grad(_pooled_then_transposed(False), (0, 1)))(x, w, token)
  _close(ours, plain, 0)
  _close(jax.jit(layers.relayout, static_argnums=1)(x, (3, 1, 2, 0), jnp.float32(jnp.nan)),
         x.transpose(3, 1, 2, 0), 0)


def test_relayout_keeps_the_transpose_out_of_its_neighbours_on_cpu():
  x = jax.ShapeDtypeStruct((8, 32, 32, 64), jnp.float32)
  w = jax.ShapeDtypeStruct((64, 64), jnp.float32)
  token = jax.ShapeDtypeStruct((), jnp.float32)
  def transposing_fusions(relayout):
    step = jax.jit(jax.grad(_pooled_then_transposed(relayout), (0, 1)))
    computations = step.lower(x, w, token).compile().as_text().split("\n\n")
    # fused computations that compute a pool tap's maximum, or its gradient's select, and
    # transpose in the same pass
    return sum(" transpose(%" in c and (" maximum(%" in c or " select(%" in c)
               for c in computations if c.lstrip().startswith("%fused"))
  assert transposing_fusions(False) > 0
  assert transposing_fusions(True) == 0


def test_dense_matches_flax():
  x = jax.random.normal(jax.random.key(0), (3, 5, 7))
  ours, theirs = layers.Dense(6), nn.Dense(6)
  variables = theirs.init(jax.random.key(1), x)
  _close(ours.init(jax.random.key(1), x), variables, 0)  # same names, shapes and initial values
  _close(_grads(lambda v, x: ours.apply(v, x), variables, x),
         _grads(lambda v, x: theirs.apply(v, x), variables, x))
  half = layers.Dense(6, dtype=jnp.bfloat16).apply(variables, x)
  assert half.dtype == jnp.bfloat16
  _close(half.astype(jnp.float32), theirs.apply(variables, x), 3e-2)


def _products(text):
  """(plain dots, dots that YNNPACK took, convolutions) in a compiled CPU program."""
  module = hlo.parse_module(text)
  instructions = [i for c in module.computations.values() for i in c.instructions]
  taken = [i for i in instructions if i.opcode == "fusion"
           and i.backend_config.get("fusion_config", {}).get("kind") == "__ynn_fusion"]
  return (sum(i.opcode == "dot" for i in instructions) - len(taken), len(taken),
          sum(i.opcode == "convolution" for i in instructions))


def test_eigen_matmul_keeps_its_products_from_ynnpack():
  # The options that give dots to YNNPACK and leave convolutions to XLA: x @ k's forward and input
  # gradient go to YNNPACK, eigen_matmul's stay plain dots (Eigen), and no convolution is left.
  x = jax.random.normal(jax.random.key(0), (4, 64, 128))
  k = jax.random.normal(jax.random.key(1), (128, 96))
  options = layers.ynnpack("dot", "reduce")
  def train_text(matmul):
    loss = lambda x, k: (matmul(x, k) ** 2).sum()
    return jax.jit(jax.grad(loss, (0, 1))).lower(x, k).compile(options).as_text()
  assert _products(train_text(lambda x, k: x @ k)) == (1, 2, 0)  # x^T dy: declined
  assert _products(train_text(layers.eigen_matmul)) == (3, 0, 0)
  _close(_grads(layers.eigen_matmul, x, k), _grads(lambda x, k: x @ k, x, k))


def test_few_rows_matmul_streams_the_kernel_as_the_left_operand():
  # The input gradient is kernel dy^T, which YNNPACK takes with the kernel as its left operand
  # ([in, rows]); the forward product (Eigen) and x^T dy stay plain dots.
  x = jax.random.normal(jax.random.key(0), (2, 8, 96))
  k = jax.random.normal(jax.random.key(1), (96, 64))
  loss = lambda x, k: (layers.few_rows_matmul(x, k) ** 2).sum()
  text = jax.jit(jax.grad(loss, (0, 1))).lower(x, k).compile(layers.ynnpack("dot", "reduce")
                                                            ).as_text()
  assert _products(text) == (2, 1, 0)
  module = hlo.parse_module(text)
  (taken,) = [i for c in module.computations.values() for i in c.instructions
              if i.opcode == "fusion" and "ynn" in i.name]
  assert taken.shape.dims == (96, 16)
  _close(_grads(layers.few_rows_matmul, x, k), _grads(lambda x, k: x @ k, x, k), 1e-5)
  variables = nn.Dense(64).init(jax.random.key(2), x)
  _close(layers.Dense(64, few_rows=True).init(jax.random.key(2), x), variables, 0)


def test_eigen_matmul_is_a_dot_on_other_platforms_and_filed_under_matrix_operations():
  x, k = jnp.ones((8, 16)), jnp.ones((16, 4))
  lowered = lambda platform: jax.jit(layers.eigen_matmul).trace(x, k).lower(
      lowering_platforms=(platform,)).as_text()
  assert "stablehlo.convolution" in lowered("cpu") and "stablehlo.dot" not in lowered("cpu")
  assert "stablehlo.convolution" not in lowered("cuda") and "stablehlo.dot" in lowered("cuda")
  # Before optimisation the CPU program holds convolutions; the breakdown files them as matmuls.
  loss = lambda x, k: (layers.eigen_matmul(x, k) ** 2).sum()
  module = hlo.parse_module(jax.jit(jax.grad(loss, (0, 1))).lower(x, k).as_text("hlo", debug_info=True))
  convolutions = [i for c in module.computations.values() for i in c.instructions
                  if i.opcode == "convolution"]
  assert len(convolutions) == 2  # forward and input gradient
  assert all(categories.fathom_class(i) == categories.MATRIX for i in convolutions)


def test_eigen_convolutions_option_is_valid_and_changes_only_the_kernel():
  x = jax.random.normal(jax.random.key(0), (8, 28, 28, 64))
  w = jax.random.normal(jax.random.key(1), (3, 3, 64, 64))
  lowered = jax.jit(lambda x, w: layers.conv2d(x, w, (1, 1), ((1, 1), (1, 1)))).lower(x, w)
  default = lowered.compile()
  eigen = lowered.compile(compiler_options=layers.EIGEN_CONVOLUTIONS)
  assert "__ynn_fusion" in default.as_text() and "__ynn_fusion" not in eigen.as_text()
  _close(eigen(x, w), default(x, w))


def test_runner_merges_model_options_with_its_own():
  assert compiling.compile_options("compiled", {}) == {}
  merged = compiling.compile_options("unfused", layers.EIGEN_CONVOLUTIONS)["compiler_options"]
  assert merged.keys() == {*layers.EIGEN_CONVOLUTIONS, "xla_disable_hlo_passes"}
  # A model's own disabled passes stay disabled beside the unfused run's.
  merged = compiling.compile_options("unfused", layers.PLAIN_REDUCTIONS)["compiler_options"]
  passes = merged["xla_disable_hlo_passes"].split(",")
  assert "tree_reduction_rewriter" in passes and set(compiling.FUSION_PASSES) <= set(passes)
  twice = compiling.combined(layers.PLAIN_REDUCTIONS, layers.PLAIN_REDUCTIONS)
  assert twice == layers.PLAIN_REDUCTIONS


def test_plain_reductions_leave_a_long_sum_one_reduction():
  x = jax.random.normal(jax.random.key(0), (16, 40000))
  lowered = jax.jit(lambda x: jax.nn.logsumexp(x, axis=-1)).lower(x)
  by_xla = layers.ynnpack("dot")  # reductions compiled by XLA, as in seq2seq's train step
  tree = lowered.compile(by_xla)
  plain = lowered.compile(compiling.combined(by_xla, layers.PLAIN_REDUCTIONS))
  assert "reduce-window(" in tree.as_text() and "reduce-window(" not in plain.as_text()
  _close(plain(x), tree(x), 1e-6)


def test_an_option_this_xla_lacks_is_dropped_and_recorded_not_fatal():
  lowered = jax.jit(lambda x: x * 2.0).lower(jnp.ones(3))
  options = {"xla_option_no_release_has": True}
  compiled, dropped = compiling.compile_step(lowered, "compiled", options)
  np.testing.assert_allclose(compiled(jnp.ones(3)), 2.0)
  assert dropped["options"] == {"xla_option_no_release_has": "True"}
  assert "xla_option_no_release_has" in dropped["error"]
  # A bad value of an option this XLA has is dropped the same way; unfused keeps its own options.
  compiled, dropped = compiling.compile_step(
      lowered, "unfused", {"xla_cpu_experimental_ynn_fusion_type": "no-such-kind"})
  assert dropped is not None and compiled is not None
  assert compiling.compile_step(lowered, "compiled", layers.EIGEN_CONVOLUTIONS)[1] is None


def test_a_run_whose_model_options_this_xla_lacks_still_runs(monkeypatch):
  import dataclasses
  from fathom_jax import runner
  from fathom_jax.workloads import registry
  get = registry.get

  def with_unknown_option(name):
    workload = get(name)
    build = lambda *args, **kwargs: dataclasses.replace(
        workload.build(*args, **kwargs),
        compiler_options={("cpu", "train"): {"xla_option_no_release_has": True}})
    return dataclasses.replace(workload, build=build)
  monkeypatch.setattr(registry, "get", with_unknown_option)
  record = runner.execute(runner.RunSpec(
      workload="autoenc", mode="train", preset="tiny", steps=2, warmup_steps=0, output_dir=None,
      quiet=True))
  dropped = record["figures"]["compiler_options_dropped"]
  assert "xla_option_no_release_has" in dropped["options"]
  assert all(np.isfinite(record["figures"]["losses"]))
