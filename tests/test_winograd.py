"""Winograd convolutions compute what XLA's convolution computes, forward and both gradients,
take over only where they should, and are filed under convolution by the breakdown."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fathom_jax import model_steps
from fathom_jax.analysis import categories, hlo
from fathom_jax.tuned import winograd
from tests import workload_checks as checks

SAME = ((1, 1), (1, 1))


def _direct(x, kernel, padding):
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), padding,
                                      dimension_numbers=winograd.DIMENSIONS)


@functools.partial(jax.jit, static_argnums=0)
def _value_and_grads(conv, x, kernel):
  """conv(x, kernel) and the gradients of a fixed random projection of it, as one compiled
  program (op by op, every op of the tiled convolution would compile on its own)."""
  out = conv(x, kernel)
  probe = jax.random.normal(jax.random.key(9), out.shape)
  return out, jax.grad(lambda x, k: (conv(x, k) * probe).sum(), argnums=(0, 1))(x, kernel)


@pytest.mark.parametrize("tiling", [winograd.F2, winograd.F4], ids=["F2", "F4"])
@pytest.mark.parametrize("size,padding", [
    ((8, 8), SAME), ((13, 7), SAME), ((9, 9), ((0, 0), (0, 0))), ((6, 11), ((2, 0), (0, 1))),
    ((3, 3), ((2, 2), (2, 2)))])
def test_tiled_convolution_matches_xla(tiling, size, padding):
  x = jax.random.normal(jax.random.key(0), (2, *size, 5))
  kernel = jax.random.normal(jax.random.key(1), (3, 3, 5, 7))
  got = _value_and_grads(lambda x, k: winograd.tiled_conv3x3(x, k, padding, tiling), x, kernel)
  want = _value_and_grads(lambda x, k: _direct(x, k, padding), x, kernel)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert a.shape == b.shape
    # Float32 rounding; F(4, 3)'s transforms (coefficients up to 8) add a few ulps more.
    np.testing.assert_allclose(a, b, atol=1e-5 * float(jnp.abs(b).max()))


@pytest.mark.parametrize("tiling", [winograd.F2, winograd.F4], ids=["F2", "F4"])
def test_channels_first_tiles_compute_the_same_convolution(tiling):
  # CHWN in and out: the same values and gradients as NHWC's, axes exchanged.
  x = jax.random.normal(jax.random.key(0), (3, 10, 7, 6))
  kernel = jax.random.normal(jax.random.key(1), (3, 3, 6, 4))
  swap = lambda a: jnp.swapaxes(a, 0, 3)
  nhwc = _value_and_grads(lambda x, k: winograd.tiled_conv3x3(x, k, SAME, tiling), x, kernel)
  chwn = _value_and_grads(
      lambda x, k: swap(winograd.tiled_conv3x3(swap(x), k, SAME, tiling, True)), x, kernel)
  for a, b in zip(jax.tree.leaves(chwn), jax.tree.leaves(nhwc)):
    np.testing.assert_allclose(a, b, atol=1e-5 * float(jnp.abs(b).max()))
  # Elsewhere, XLA's convolution with the same layout.
  direct = winograd.conv3x3(swap(x), kernel, SAME, channels_first=True)
  assert direct.shape == (4, 10, 7, 3)


def test_tiling_rule():
  assert winograd.choose_tiling(224, 224, 3, 64) is None  # VGG's first layer
  assert winograd.choose_tiling(56, 56, 32, 64) is None
  assert winograd.choose_tiling(224, 224, 64, 64) is winograd.F4
  assert winograd.choose_tiling(28, 28, 512, 512) is winograd.F4
  assert winograd.choose_tiling(14, 14, 512, 512) is winograd.F2
  assert winograd.choose_tiling(7, 7, 512, 512) is winograd.F2


def _compiled_text(channels, dtype=jnp.float32):
  x = jax.ShapeDtypeStruct((2, 16, 16, channels), dtype)
  kernel = jax.ShapeDtypeStruct((3, 3, channels, channels), dtype)
  return jax.jit(lambda x, k: winograd.conv3x3(x, k, SAME)).lower(x, kernel).compile().as_text()


def test_cpu_computes_wide_float32_layers_with_matmuls():
  assert "convolution(" not in _compiled_text(64) and " dot(" in _compiled_text(64)
  assert "convolution(" in _compiled_text(8)  # too few channels to pay
  assert "convolution(" in _compiled_text(64, jnp.bfloat16)


def test_other_platforms_get_xla_convolution():
  x = jnp.ones((2, 16, 16, 64))
  kernel = jnp.ones((3, 3, 64, 64))
  def lowered(platform):
    return jax.jit(lambda x, k: winograd.conv3x3(x, k, SAME)).trace(x, kernel).lower(
        lowering_platforms=(platform,)).as_text()
  assert "stablehlo.convolution" in lowered("cuda")
  assert "stablehlo.convolution" not in lowered("cpu")


def test_bad_windows_are_rejected():
  with pytest.raises(ValueError, match="3x3 kernel"):
    winograd.conv3x3(jnp.ones((1, 8, 8, 4)), jnp.ones((5, 5, 4, 4)), SAME)
  with pytest.raises(ValueError, match="padding 0-2"):
    winograd.conv3x3(jnp.ones((1, 8, 8, 4)), jnp.ones((3, 3, 4, 4)), ((3, 3), (1, 1)))


def test_breakdown_files_winograd_under_convolution():
  # Every dot of a Winograd layer's train step, and every fusion's share of work, is
  # convolution; XLA's own category still says what ran (a dot).
  x = jnp.ones((2, 16, 16, 64))
  kernel = jnp.ones((3, 3, 64, 64))
  loss = lambda x, k: (winograd.conv3x3(x, k, SAME) ** 2).sum()
  text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, kernel).compile().as_text()
  module = hlo.parse_module(text)
  dots = [i for c in module.computations.values() for i in c.instructions if i.opcode == "dot"]
  assert len(dots) == 3  # forward, input gradient, kernel gradient
  for dot in dots:
    assert categories.fathom_class(dot) == categories.CONVOLUTION
    assert categories.xla_category(dot) == "dot"


def _train(name, enabled, steps, options=None, **changes):
  """Losses of `steps` train steps, the first step's parameter update, and the number of
  convolutions in the compiled step, at widths (64-128 channels) where Winograd takes over."""
  _, model = checks.build(name, implementation="tuned", base_width=16,
                          options={"winograd": enabled, **(options or {})}, **changes)
  batch = checks.synthetic_batch(model, 1, 4)
  state = checks.init_train_state(model, jax.random.key(0), batch)
  step = jax.jit(model_steps.make_train_step(model)).lower(state, batch).compile()
  before, losses, update = state["params"], [], None
  for _ in range(steps):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
    update = update or jax.tree.map(lambda a, b: a - b, state["params"], before)
  return np.asarray(losses), update, step.as_text().count(" convolution(")


def test_vgg_trains_alike_with_and_without_winograd():
  # VGG-11: the same 3x3 layers as VGG-19, half as many to compile.
  losses, _, convolutions = _train("vgg", True, 4, depth=11)
  direct_losses, _, direct_convolutions = _train("vgg", False, 4, depth=11)
  assert convolutions < direct_convolutions
  np.testing.assert_allclose(losses, direct_losses, rtol=1e-5)
  assert losses[-1] < losses[0]


def test_residual_first_step_alike_with_and_without_winograd():
  # ResNet-18, whose basic blocks are all 3x3 convolutions, compiles in a fraction of ResNet-50's
  # time. Batch norm over 4 samples of 1x1 maps makes this small ResNet chaotic: from the second step
  # on, losses part even between XLA's own two convolution kernels (Eigen and YNNPACK, whose
  # first updates differ by 2%). So: the first loss, and the first update to 1% of its size.
  # NHWC throughout: at these 1x1 maps a change of layout alone moves the first update by up
  # to 54% of a leaf (tests/test_vision.py compares the layouts by the whole update's norm).
  nhwc = {"channels_first_stages": ()}
  (loss, *_), update, convolutions = _train("residual", True, 1, nhwc, depth=18)
  (direct_loss, *_), direct_update, direct_convolutions = _train(
      "residual", False, 1, nhwc, depth=18)
  assert convolutions < direct_convolutions
  np.testing.assert_allclose(loss, direct_loss, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(update), jax.tree.leaves(direct_update)):
    np.testing.assert_allclose(a, b, atol=1e-2 * float(jnp.abs(b).max()))
