"""Any JAX program: a flax and optax training loop written without fathom_jax, profiled with
jax.profiler, broken down by the analysis command."""

import csv
import json
import os
import subprocess
import sys

import pytest

from fathom_jax.analysis import breakdown, categories

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "plain_training.py")


@pytest.fixture(scope="module")
def plain_breakdown(tmp_path_factory):
  trace_dir = str(tmp_path_factory.mktemp("plain"))
  proc = subprocess.run([sys.executable, SCRIPT, trace_dir], capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  with open(SCRIPT) as f:
    assert "fathom" not in f.read().replace("fathom_jax, no named", "")
  out = tmp_path_factory.mktemp("breakdown")
  proc = subprocess.run([sys.executable, "-m", "fathom_jax.analysis", "breakdown", trace_dir,
                         f"--output_dir={out}"], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  with open(out / breakdown.BREAKDOWN_FILE) as f:
    summary = json.load(f)
  with open(out / breakdown.OPS_FILE) as f:
    ops = list(csv.DictReader(f))
  return summary, ops, proc.stdout


def test_the_optimizer_of_a_plain_optax_loop_is_found_and_the_output_says_how(plain_breakdown):
  summary, ops, printed = plain_breakdown
  assert summary["by_class"][categories.OPTIMIZATION]["time_s"] > 0
  assert summary["optimization_found_by"]["source file in optax"] > 0
  assert summary["optimization_found_by"]["scope fathom.optimization"] == 0
  assert "optimization found by: source file in optax" in printed
  # AdamW's update is optimization; optax's loss function is not.
  update = [r for r in ops if "/optax/" in r["source"] and "/losses/" not in r["source"]]
  assert update and all(r["fathom_class"] == categories.OPTIMIZATION for r in update)
  assert all(r["fathom_class"] != categories.OPTIMIZATION for r in ops
             if "/optax/losses/" in r["source"])
  # The model's matmuls keep their class.
  assert summary["by_class"][categories.MATRIX]["time_s"] > 0
