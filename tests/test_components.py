"""Model components from op_name metadata: the parser on JAX's names, the split of fusions, and
the component view of a real program."""

import collections
import functools

import jax
import pytest

from fathom_jax import model_steps
from fathom_jax.analysis import categories, components, cost, hlo
from tests import workload_checks as checks


@pytest.mark.parametrize("op_name, path, pass_", [
    ("jit(train_step)/transpose(jvp(ResNet))/Bottleneck_3/Conv_1/conv_general_dilated",
     ("ResNet", "Bottleneck_3", "Conv_1"), components.BACKWARD),
    ("jit(train_step)/jit(main)/jvp(ResNet)/Bottleneck_3/BatchNorm_0/rsqrt",
     ("ResNet", "Bottleneck_3", "BatchNorm_0"), components.FORWARD),
    # Control flow, jnp's private helpers and einsum-labelled vmaps are JAX's, not the model's.
    ("jit(infer_step)/decode/while/body/closed_call/GPT/block_0/attention/"
     "vmap(BTNH,BSNH->BNTS)/dot_general", ("decode", "GPT", "block_0", "attention"),
     components.NO_PASS),
    ("jit(infer_step)/prefill/GPT/token_embedding/jit(_take)/jit(_where)/select_n",
     ("prefill", "GPT", "token_embedding"), components.NO_PASS),
    ("jit(train_step)/fathom.optimization/mul", ("fathom.optimization",), components.NO_PASS),
    ("reduce_sum", (), components.NO_PASS),
    ("", (), components.NO_PASS),
    # XLA joins merged ops' names with ';': the first stands for them.
    ("jit(f)/vmap()/transpose;jit(f)/Dense_0/vmap(BNTS,BSNH->BTNH)/transpose", (),
     components.NO_PASS),
    # A slash inside parentheses belongs to its token.
    ("jit(f)/vmap(a/b)/Model/Dense_0/add", ("Model", "Dense_0"), components.NO_PASS),
])
def test_op_names_parse_to_the_models_path_and_pass(op_name, path, pass_):
  assert components.parse(op_name) == (path, pass_)


def test_depths():
  path = ("ResNet", "Bottleneck_3", "Conv_1", "inner")
  assert components.name(path, components.depth_of("model")) == "ResNet"
  assert components.name(path, components.depth_of("block")) == "ResNet/Bottleneck_3"
  assert components.name(path, components.depth_of("layer")) == "ResNet/Bottleneck_3/Conv_1"
  assert components.name(path, components.depth_of("full")) == "ResNet/Bottleneck_3/Conv_1/inner"
  assert components.name(path, components.depth_of("2")) == "ResNet/Bottleneck_3"
  assert components.name((), 3) == components.TOP_LEVEL
  for bad in ("0", "-1", "deep", "", "1.5"):
    with pytest.raises(ValueError, match="component depth must be one of"):
      components.depth_of(bad)


@pytest.fixture(scope="module")
def decoding_program():
  """The tiny transformer's inference program (prefill, then a decode loop), compiled."""
  _, model = checks.build("transformer")
  batch = checks.synthetic_batch(model, 1, 2)
  key = jax.random.key(0)
  variables = jax.eval_shape(functools.partial(model.init, key), batch)
  text = jax.jit(model_steps.make_infer_step(model)).lower(variables, batch, key).compile(
      ).as_text()
  module = hlo.parse_module(text)
  return module, cost.CostModel(module)


def test_every_op_of_a_real_program_is_shared_out_whole(decoding_program):
  module, model = decoding_program
  fusions = 0
  for computation in module.computations.values():
    for inst in computation.instructions:
      if inst.opcode == "fusion":
        fusions += 1
      parts = components.shares(inst, module, model)
      assert sum(parts.values()) == pytest.approx(1.0)
      assert all(frac > 0 for frac in parts.values())
      # Classes summed over components are the classes the breakdown files the op under.
      classes = collections.Counter()
      for (_, _, cls), frac in parts.items():
        classes[cls] += frac
      want = categories.class_shares(inst, module, model)
      assert classes.keys() == want.keys()
      for cls, frac in want.items():
        assert classes[cls] == pytest.approx(frac)
  assert fusions > 10


def test_the_decoding_programs_work_splits_into_its_phases_and_layers(decoding_program):
  module, model = decoding_program
  work = collections.Counter()
  for computation in module.computations.values():
    for inst in computation.instructions:
      if inst.opcode in ("fusion", "while", "call", "conditional"):
        continue  # fusions' bodies and loops' bodies are counted where they are
      w = categories.work(inst, model)
      path, _ = components.parse(inst.op_name)
      work[components.name(path, components.depth_of("model"))] += w
      if len(path) >= 4:  # phase/model/block/layer: the phase's layer of that kind
        work[f"{path[0]}/{path[3]}"] += w
  total = sum(w for k, w in work.items() if "/" not in k)
  # The named scopes of the two phases hold nearly all the work; each phase runs attention.
  assert (work["prefill"] + work["decode"]) / total > 0.9
  assert work["prefill/attention"] > 0 and work["decode/attention"] > 0


def test_kinds_sum_repeated_blocks():
  assert components.kind(("decode", "GPT", "block_11", "attention")) == \
      "decode/GPT/block_*/attention"
  assert components.kind(("ResNet", "Bottleneck_3", "Conv_1")) == "ResNet/Bottleneck_*/Conv_*"
  assert components.kind(("fathom.optimization",)) == "fathom.optimization"
  assert components.kind(()) == components.TOP_LEVEL
