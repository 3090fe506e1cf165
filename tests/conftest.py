import os
import shutil
import sys
import tempfile

import pytest

# Tests run on the CPU with a deterministic single-device setup, whatever the machine has.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Compiling is most of the suite's time on a small machine, and many tests (and the run.py and
# study processes they start) compile the same programs. JAX's persistent compilation cache, set
# through the environment so that child processes share it, makes each distinct program compile
# once per test run. Op-name metadata stays in the key: the analysis reads it from the HLO, so a
# program must never come back with another call site's names. The folder lives and dies with
# this run, so nothing carries over between runs.
# The process that starts the run (pytest, or xdist's controller) makes the folder; its workers
# inherit the environment and share it, and only the maker removes it.
_OWNER = "FATHOM_JAX_TEST_COMPILE_CACHE" not in os.environ
if _OWNER:
  os.environ["FATHOM_JAX_TEST_COMPILE_CACHE"] = tempfile.mkdtemp(
      prefix="fathom-jax-test-compile-cache-")
os.environ.update({
    "JAX_COMPILATION_CACHE_DIR": os.environ["FATHOM_JAX_TEST_COMPILE_CACHE"],
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
    "JAX_COMPILATION_CACHE_INCLUDE_METADATA_IN_KEY": "true",
    # Locations keep the innermost frame of user code (the source file and line the analysis
    # reads), not the whole call stack, which would put the calling test's line into the key
    # and make the same program compile again for every test that builds it.
    "JAX_TRACEBACK_IN_LOCATIONS_LIMIT": "1",
})
# LLVM's optimisation of the generated code is most of a small program's compile time on CPU, and
# the tests run each program a few times: they compile at XLA's lowest backend level. XLA's own
# passes (fusion, layout, the HLO the analysis reads) run as in any run.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = " ".join(
      [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]).strip()


def pytest_unconfigure(config):
  if _OWNER:
    shutil.rmtree(os.environ.pop("FATHOM_JAX_TEST_COMPILE_CACHE"), ignore_errors=True)


@pytest.fixture(scope="session")
def forked_cli():
  """A warm process that runs bad-input command lines as forks (tests/forked_cli.py)."""
  from tests import forked_cli as forks
  server = forks.Server()
  yield server
  server.close()


@pytest.fixture(scope="session", autouse=True)
def every_result_file_follows_the_schema(tmp_path_factory):
  """After the session, every result.json the suite's runs wrote (under this process's temporary
  folders) is validated against the package's JSON Schema, is strict JSON, and has a memory floor
  no higher than the compiler's figure."""
  yield
  import glob
  import json
  import jsonschema
  from fathom_jax import compiling, results
  with open(results.SCHEMA_FILE) as f:
    validator = jsonschema.Draft202012Validator(json.load(f))
  base = str(tmp_path_factory.getbasetemp())
  problems = []
  for path in glob.glob(os.path.join(base, "**", results.RESULT_FILE), recursive=True):
    with open(path) as f:
      text = f.read()
    try:
      record = json.loads(text, parse_constant=lambda name: _not_strict(name))
    except ValueError as e:
      problems.append(f"{path}: {e}")
      continue
    problems += [f"{path}: {e.json_path}: {e.message}" for e in validator.iter_errors(record)]
    # The floor from the shapes is a lower bound of what the compiler then asked for.
    figures = record.get("figures", {})
    if figures.get("compiled_memory") and "memory_floor_bytes" in figures:
      needed = compiling.bytes_needed(figures["compiled_memory"])
      if figures["memory_floor_bytes"] > needed:
        problems.append(f"{path}: memory floor {figures['memory_floor_bytes']} > {needed}")
  assert not problems, "result files that break the schema:\n" + "\n".join(problems[:20])


def _not_strict(name):
  raise ValueError(f"{name} is not strict JSON")
