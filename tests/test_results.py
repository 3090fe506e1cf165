"""Result files: strict JSON, whole or none, the reader's permissions, provenance, the schema."""

import json
import math
import os
import re
import stat

import jsonschema
import numpy as np
import pytest

from fathom_jax import environment, results
from tests import records


def _strict_load(text):
  def refuse(name):
    raise ValueError(f"{name} is not strict JSON")
  return json.loads(text, parse_constant=refuse)


def test_non_finite_numbers_are_written_by_name_and_the_rest_as_numbers():
  payload = {"losses": [1.5, math.nan, np.float32(np.inf)], "ratio": -math.inf,
             "steps": np.int64(3), "shape": (2, 3), "array": np.array([0.5, np.nan]),
             "nested": {"ok": True, "none": None}}
  loaded = _strict_load(results.dumps(payload))
  assert loaded == {"losses": [1.5, "NaN", "Infinity"], "ratio": "-Infinity", "steps": 3,
                    "shape": [2, 3], "array": [0.5, "NaN"],
                    "nested": {"ok": True, "none": None}}


def test_files_are_whole_and_readable_as_the_umask_says(tmp_path):
  old = os.umask(0o027)
  try:
    results.write_json_atomic(str(tmp_path / "a.json"), {"x": 1})
    results.write_text_atomic(str(tmp_path / "b.csv"), "a,b\n")
  finally:
    os.umask(old)
  for name in ("a.json", "b.csv"):
    assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o640
  assert sorted(os.listdir(tmp_path)) == ["a.json", "b.csv"]  # no temporary left behind
  # A payload that cannot be written leaves the old file as it was and nothing else.
  with pytest.raises(TypeError):
    results.write_json_atomic(str(tmp_path / "a.json"), {"x": object()})
  assert _strict_load(open(tmp_path / "a.json").read()) == {"x": 1}
  assert sorted(os.listdir(tmp_path)) == ["a.json", "b.csv"]


def test_provenance_says_what_produced_a_result():
  p = environment.provenance()
  assert p["fathom_jax"] and p["command"]
  assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", p["started_utc"])
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if os.path.exists(os.path.join(root, ".git")):  # run from a checkout
    assert re.fullmatch(r"[0-9a-f]{40}", p["git_commit"]) and isinstance(p["git_dirty"], bool)


def test_the_schema_refuses_what_a_script_could_not_trust():
  with open(results.SCHEMA_FILE) as f:
    validator = jsonschema.Draft202012Validator(json.load(f))
  good = records.valid_record()
  assert not list(validator.iter_errors(good))
  for change in ({"status": "done"}, {"provenance": {"fathom_jax": "0.1.0"}},
                 {"figures": {"parameters": 10, "losses": ["nan"]}},
                 {"figures": {"parameters": 10, "step_times_s": [-1.0]}}):
    assert list(validator.iter_errors({**good, **change})), change
  missing = dict(good)
  del missing["environment"]  # a run, not a target compile: the machine is part of the result
  assert list(validator.iter_errors(missing))
