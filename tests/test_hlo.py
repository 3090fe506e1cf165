"""The HLO text parser on kept samples of real XLA output (tests/data, written by
tests/data/make_hlo_samples.py) and on text a test compiles now; damaged text raises DataError."""

import os
import re

import jax
import jax.numpy as jnp
import pytest

from fathom_jax.analysis import hlo
from fathom_jax.errors import DataError

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
SAMPLES = ("conv_net", "dot", "while_loop", "reduce_window", "random_sampling", "collective",
           "conv_net.unoptimized")


def sample(name):
  return hlo.parse_file(os.path.join(DATA, f"{name}.hlo.txt"))


def line_of(path, text):
  """1-based line of the first line of `path` containing `text`."""
  with open(path) as f:
    return next(i for i, line in enumerate(f, 1) if text in line)


@pytest.mark.parametrize("name", SAMPLES)
def test_every_sample_parses_completely(name):
  path = os.path.join(DATA, f"{name}.hlo.txt")
  module = hlo.parse_file(path)
  text = open(path).read()
  # Every instruction line of the text is one parsed instruction, every computation is kept.
  lines = [l for l in text.splitlines() if re.match(r"^\s+(ROOT )?%?[\w.\-]+ = ", l)]
  assert len(lines) == sum(len(c.instructions) for c in module.computations.values())
  assert len(module.computations) == len(re.findall(r"\{\s*$", text, re.M))
  assert module.entry_computation.is_entry and module.entry_computation.root is not None
  for inst in module.instructions.values():
    assert all(c in module.computations for c in inst.called), (inst.name, inst.called)
    # Operands resolve to instructions, so their shapes are known.
    assert len(inst.operand_shapes) == len(inst.operands), inst.name


def test_convolution_metadata_and_source_through_stack_frames():
  module = sample("conv_net")
  (conv,) = [i for i in module.instructions.values()
             if i.opcode == "convolution" and "transpose" not in i.op_name]
  assert conv.attrs["dim_labels"] == "b01f_01io->b01f"
  assert conv.attrs["window"] == "{size=3x3 pad=1_1x1_1}"
  assert str(conv.shape) == "f32[2,8,8,4]"
  assert [str(s) for s in conv.operand_shapes] == ["f32[2,8,8,2]", "f32[3,3,2,4]"]
  assert conv.op_name == "jit(step)/jvp()/conv_general_dilated"
  # The FileNames/FileLocations/StackFrames tables name the generator's line of the call.
  generator = os.path.join(DATA, "make_hlo_samples.py")
  assert conv.source_file.endswith("make_hlo_samples.py")
  assert conv.source_line == line_of(generator, "h = jax.lax.conv_general_dilated(")
  update = next(i for i in module.instructions.values() if "fathom.optimization/" in i.op_name)
  assert update.source_line == line_of(generator, "return jax.tree.map(lambda p, g: p - 0.1 * g")


def test_fusion_kind_called_computation_and_backend_config():
  module = sample("dot")
  fusion = module.instructions["ynn_fusion"]
  assert fusion.opcode == "fusion" and fusion.fusion_kind == "kCustom"
  assert fusion.backend_config["fusion_config"]["kind"] == "__ynn_fusion"
  (body,) = fusion.called
  assert [i.opcode for i in module.computations[body].instructions if i.is_root] == ["dot"]
  dot = module.computations[body].root
  assert dot.attrs["lhs_contracting_dims"] == "{1}" and str(dot.shape) == "f32[16,8]"


def test_while_loop_tuple_shapes_and_trip_count():
  module = sample("while_loop")
  (loop,) = [i for i in module.instructions.values() if i.opcode == "while"]
  assert loop.shape.is_tuple
  assert [str(e) for e in loop.shape.elements] == ["s32[]", "f32[8,8]", "f32[8,8]"]
  assert loop.shape.bytes == 4 + 2 * 8 * 8 * 4
  assert loop.backend_config["known_trip_count"]["n"] == "5"
  assert hlo.trip_count(loop, module) == 5
  # Without XLA's annotation the count comes from the condition's compare against a constant.
  del loop.attrs["backend_config"]
  assert hlo.trip_count(loop, module) == 5
  cond = loop.attrs["condition"].lstrip("%")
  assert cond in module.computations and loop.attrs["body"].lstrip("%") in loop.called


def test_collective_attributes():
  module = sample("collective")
  (reduce,) = [i for i in module.instructions.values() if i.opcode == "all-reduce"]
  assert reduce.attrs["replica_groups"] == "{{0,1}}" and reduce.attrs["channel_id"] == "1"
  assert module.computations[reduce.called[0]].root.opcode == "add"
  param = module.entry_computation.instructions[0]
  assert param.attrs["sharding"] == "{devices=[2,1]<=[2]}"
  assert param.op_name == "x"


def test_unoptimized_text_without_percent_signs():
  module = sample("conv_net.unoptimized")
  assert module.name == "jit_step"
  opcodes = {i.opcode for i in module.instructions.values()}
  assert {"convolution", "reduce-window", "select-and-scatter", "dot", "call"} <= opcodes
  assert not any(n.startswith("%") for n in module.instructions)


def test_freshly_compiled_text_parses():
  def f(x):
    parts = jnp.split(x, 2)
    return jnp.concatenate([jnp.sort(parts[0], axis=0), parts[1][::-1]]).astype(jnp.bfloat16)
  text = jax.jit(f).lower(jnp.arange(16.0).reshape(8, 2)).compile().as_text()
  module = hlo.parse_module(text)
  assert module.name == "jit_f"
  assert str(module.entry_computation.root.shape) == "bf16[8,2]"
  assert any(i.opcode == "sort" for i in module.instructions.values())


@pytest.mark.parametrize("text, want", [
    ("f32[2,3]{1,0}", ("f32", (2, 3), 24)),
    ("pred[]", ("pred", (), 1)),
    ("bf16[<=8,4]", ("bf16", (8, 4), 64)),
    ("s4[16]{0:E(4)}", ("s4", (16,), 8)),
    ("token[]", ("token", (), 0)),
])
def test_array_shapes(text, want):
  shape = hlo.parse_shape(text)
  assert (shape.dtype, shape.dims, shape.bytes) == want


def test_nested_tuple_shape_with_index_comments():
  shape = hlo.parse_shape("(s32[], (f32[2]{0}, pred[3]), /*index=2*/u8[0]{0})")
  assert shape.is_tuple and len(shape.elements) == 3
  assert [str(a) for a in shape.arrays()] == ["s32[]", "f32[2]", "pred[3]", "u8[0]"]
  assert shape.bytes == 4 + 8 + 3 + 0


def test_not_hlo_text_names_file_and_line(tmp_path):
  path = tmp_path / "notes.txt"
  path.write_text("HloModule m\n\nthis is not a computation\n")
  with pytest.raises(DataError, match=r"notes.txt:3: not HLO text"):
    hlo.parse_file(str(path))
  path.write_text("")
  with pytest.raises(DataError, match="not HLO text"):
    hlo.parse_file(str(path))
  path.write_bytes(b"\xff\xfe\x00binary")
  with pytest.raises(DataError, match="not UTF-8"):
    hlo.parse_file(str(path))


def test_truncated_and_malformed_modules(tmp_path):
  text = open(os.path.join(DATA, "dot.hlo.txt")).read()
  path = tmp_path / "cut.hlo.txt"
  path.write_text(text[:len(text) * 2 // 3])
  with pytest.raises(DataError, match="truncated"):
    hlo.parse_file(str(path))
  lines = text.splitlines()
  bad = next(i for i, l in enumerate(lines) if " = " in l and "parameter" not in l)
  lines[bad] = "  %broken = f32[2] add(%a"  # unbalanced operand list
  path.write_text("\n".join(lines))
  with pytest.raises(DataError, match=rf"cut.hlo.txt:{bad + 1}: not an HLO instruction"):
    hlo.parse_file(str(path))
