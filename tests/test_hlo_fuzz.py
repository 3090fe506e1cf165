"""Property tests: the HLO parser on mutated real HLO either parses or raises our DataError."""

import os

from hypothesis import given, settings, strategies as st

from fathom_jax.analysis import hlo
from fathom_jax.errors import DataError

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
SAMPLES = sorted(f for f in os.listdir(DATA) if f.endswith(".hlo.txt"))
TEXTS = [open(os.path.join(DATA, f)).read() for f in SAMPLES]


def _parse_or_clear_error(text: str) -> None:
  try:
    hlo.parse_module(text, path="mutated.hlo.txt")
  except DataError as e:
    assert str(e).startswith("mutated.hlo.txt"), e
    assert "\n" not in str(e)


@settings(max_examples=150, deadline=None)
@given(sample=st.sampled_from(TEXTS), data=st.data())
def test_truncated_or_cut_hlo(sample, data):
  start = data.draw(st.integers(0, len(sample)))
  end = data.draw(st.integers(start, min(len(sample), start + 200)))
  _parse_or_clear_error(sample[:start])
  _parse_or_clear_error(sample[:start] + sample[end:])


@settings(max_examples=150, deadline=None)
@given(sample=st.sampled_from(TEXTS), data=st.data(),
       junk=st.text(alphabet=st.sampled_from(list("{}[]()=,%:\"'\n x0.-/*")), max_size=12))
def test_hlo_with_inserted_junk(sample, data, junk):
  at = data.draw(st.integers(0, len(sample)))
  _parse_or_clear_error(sample[:at] + junk + sample[at:])


def test_a_frame_id_cut_with_its_brace_still_parses():
  # Found by the fuzzer above: a text cut inside an instruction's metadata left the frame id
  # as '13}' among the attributes.
  text = ("HloModule m\n\nStackFrames\n1 {file_location_id=1 parent_frame_id=1}\n\n"
          "ENTRY %main (p: f32[2]) -> f32[2] {\n  %p = f32[2]{0} parameter(0)\n"
          "  ROOT %n = f32[2]{0} negate(%p), stack_frame_id=13}\n}\n")
  module = hlo.parse_module(text)
  assert module.entry_computation.root.opcode == "negate"


def test_a_damaged_location_table_row_leaves_the_source_empty():
  # Found by the fuzz test: a quote inserted into the tables made a location a string.
  text = """HloModule m

FileNames
1 "a.py"

FileLocations
1 "broken"

StackFrames
1 {file_location_id=1 parent_frame_id=1}

ENTRY %main (p: f32[]) -> f32[] {
  ROOT %p = f32[] parameter(0), metadata={op_name="x" stack_frame_id=1}
}
"""
  module = hlo.parse_module(text)
  assert module.instructions["p"].source_file == ""
