"""Categoriser on hand-checked instructions of real XLA output, and the FLOP model against XLA's
own cost analysis."""

import os
import sys

import jax
import jax.numpy as jnp
import pytest

from fathom_jax import model_steps
from fathom_jax.analysis import categories as cat
from fathom_jax.analysis import cost, hlo
from tests import workload_checks as checks

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
sys.path.insert(0, DATA)
import make_hlo_samples  # noqa: E402  (the programs the kept samples were compiled from)


def sample(name):
  module = hlo.parse_file(os.path.join(DATA, f"{name}.hlo.txt"))
  return module, cost.CostModel(module)


def describe(module, model, name):
  inst = module.instructions[name]
  return (cat.xla_category(inst), cat.refined_category(inst, module),
          cat.class_shares(inst, module, model))


def test_convolution():
  module, model = sample("conv_net")
  assert describe(module, model, "conv_general_dilated.2") == (
      "convolution", "convolution", {cat.CONVOLUTION: 1.0})
  # 2 x 8x8 outputs x 4 features, each a 3x3x2 window of which the padding hides some: per
  # spatial dim 8 outputs see 3 kernel taps but the two edge outputs only 2: 8*3 - 2 = 22.
  assert model.instruction("conv_general_dilated.2").flops == 2 * 22 * 22 * 2 * 4 * 2


def test_dot_in_a_custom_fusion_is_matrix_work():
  module, model = sample("dot")
  assert describe(module, model, "ynn_fusion") == (
      "custom fusion", "dot fusion", {cat.MATRIX: 1.0})
  assert model.instruction("ynn_fusion").flops == 2 * 16 * 8 * 32


def test_loop_fusion_of_elementwise_ops():
  module, model = sample("dot")
  assert describe(module, model, "add_tanh_fusion") == (
      "loop fusion", "loop fusion", {cat.ELEMENTWISE: 1.0})
  # tanh is a transcendental, add a FLOP: 128 elements each.
  c = model.instruction("add_tanh_fusion")
  assert (c.flops, c.transcendentals) == (128, 128)


def test_fusion_time_split_by_cost_rule():
  module, model = sample("conv_net")
  # Body of reduce_divide_fusion (log-softmax gradient): multiply [2,3] (6 FLOPs), two reduces
  # [2,3]->[2] (4 each), negate and divide [2] (2 each): elementwise 10, reduction 8.
  _, refined, shares = describe(module, model, "reduce_divide_fusion")
  assert refined == "loop fusion"
  assert shares == pytest.approx({cat.ELEMENTWISE: 10 / 18, cat.REDUCTION: 8 / 18})
  # ReLU gradient then layout change: compare (256 FLOPs), select, transpose and copy (256
  # elements moved each): elementwise 1/4, data movement 3/4.
  assert describe(module, model, "transpose_copy_fusion")[2] == pytest.approx(
      {cat.ELEMENTWISE: 0.25, cat.DATA_MOVEMENT: 0.75})
  # A fusion that wraps one op counts as that op, unfused.
  assert describe(module, model, "broadcast_maximum_fusion")[1] == "non-fusion elementwise"
  assert describe(module, model, "wrapped_scatter")[1:] == ("scatter", {cat.REDUCTION: 1.0})


def test_reduce_window():
  module, model = sample("reduce_window")
  assert describe(module, model, "wrapped_reduce-window") == (
      "loop fusion", "reduce-window", {cat.REDUCTION: 1.0})
  # 2x5x5x4 outputs ('SAME', stride 2 on 9x9), 3x3 windows: 8 adds each.
  assert model.instruction("wrapped_reduce-window").flops == 8 * 2 * 5 * 5 * 4


def test_collective():
  module, model = sample("collective")
  assert describe(module, model, "psum_invariant.7") == (
      "all-reduce", "all-reduce", {cat.COMMUNICATION: 1.0})


def test_random_sampling_and_optimizer_found_by_metadata():
  module, model = sample("random_sampling")
  classes = {}
  for inst in module.entry_computation.instructions:
    if inst.opcode not in cost.FREE:
      for c, share in cat.class_shares(inst, module, model).items():
        classes[c] = classes.get(c, 0.0) + share
  assert cat.RANDOM in classes and classes[cat.RANDOM] > 3  # threefry's fusions and its loop
  # `x + noise` is outside the sampling scope: the last fusion splits between the two.
  shares = describe(module, model, "maximum_add_fusion")[2]
  assert set(shares) == {cat.RANDOM, cat.ELEMENTWISE} and shares[cat.RANDOM] > 0.5
  module, model = sample("conv_net")
  assert describe(module, model, "multiply_subtract_fusion")[2] == {cat.OPTIMIZATION: 1.0}


def test_select_and_data_formatting():
  select = hlo.parse_instruction(
      "%s = f32[4]{0} select(pred[4]{0} %p, f32[4]{0} %a, f32[4]{0} %b)")
  assert select.operands == ["p", "a", "b"]
  assert cat.fathom_class(select) == cat.DATA_MOVEMENT  # as in Fathom's 2016 table
  assert cat.xla_category(select) == "non-fusion elementwise"
  copy = hlo.parse_instruction("%c = f32[4,2]{0,1} copy(%a)")
  assert (cat.xla_category(copy), cat.fathom_class(copy)) == ("data formatting",
                                                              cat.DATA_MOVEMENT)


# --- FLOP model against compiled.cost_analysis() -----------------------------------------------

TOLERANCE = 0.005  # FLOPs, relative; the model follows XLA's counting rules, usually exactly


def model_and_xla_flops(lowered):
  compiled = lowered.compile()
  module = hlo.parse_module(compiled.as_text())
  once = cost.CostModel(module, count_loops_once=True).total()
  xla = compiled.cost_analysis()
  # Transcendentals follow XLA's rules exactly; bytes are each instruction's operands and
  # result, where XLA refines what some fusions read (7% apart on tiny programs, <1% at paper
  # sizes).
  assert once.transcendentals == xla.get("transcendentals", 0.0)
  assert abs(once.bytes - xla["bytes accessed"]) <= 0.1 * xla["bytes accessed"]
  return once.flops, float(xla["flops"]), module


def train_step_lowered(name):
  _, model = checks.build(name)
  # Shapes alone: nothing is computed before the step is compiled.
  batch = jax.eval_shape(lambda k: model.synthetic_batch(k, 4), jax.random.key(0))
  state = jax.eval_shape(lambda k, b: model_steps.init_train_state(model, k, b), jax.random.key(1),
                         batch)
  return jax.jit(model_steps.make_train_step(model)).lower(state, batch)


@pytest.mark.parametrize("program", ["conv_net", "memnet", "autoenc"])
def test_flop_model_agrees_with_cost_analysis(program):
  if program == "conv_net":
    lowered, _ = make_hlo_samples.conv_net()
  else:
    lowered = train_step_lowered(program)
  ours, xla, module = model_and_xla_flops(lowered)
  assert xla > 0 and abs(ours - xla) <= TOLERANCE * xla, (ours, xla)
  if program != "conv_net":  # the train steps split their key: threefry's 5-round loops
    assert any(i.opcode == "while" for i in module.instructions.values())


def test_loops_counted_once_per_iteration():
  lowered, _ = make_hlo_samples.while_loop()
  once, xla, module = model_and_xla_flops(lowered)
  assert once == xla  # XLA counts the body once
  full = cost.CostModel(module).total().flops
  (loop,) = [i for i in module.instructions.values() if i.opcode == "while"]
  per_iteration = sum(cost.CostModel(module).computation(c).flops for c in loop.called)
  # The body's dot: 2*8*8*8 FLOPs (tanh is a transcendental, the counter add 1, the compare 1).
  assert per_iteration == 2 * 8 * 8 * 8 + 2
  assert full - once == 4 * per_iteration  # five iterations, not one


def test_unscoped_dropout_mask_is_random_sampling():
  def dropout(key, x):
    keep = jax.random.bernoulli(key, 0.9, x.shape)
    return jnp.where(keep, x / 0.9, 0.0)
  text = jax.jit(dropout).lower(jax.random.key(0), jnp.ones((16, 16))).compile().as_text()
  module = hlo.parse_module(text)
  model = cost.CostModel(module)
  drawn = [i for i in module.instructions.values() if "jit(_bernoulli)" in i.op_name
           and i.opcode not in cost.FREE]
  assert drawn and all(cat.fathom_class(i) == cat.RANDOM for i in drawn)
  time = {}
  for inst in module.entry_computation.instructions:
    for c, share in cat.class_shares(inst, module, model).items():
      time[c] = time.get(c, 0.0) + share
  assert time.get(cat.RANDOM, 0) > 1
