"""Start-up of a run: the time from the command to the first timed step, by phase.

  python benchmarks/startup.py [--workloads=all] [--preset=tiny]

For each workload, `run.py --steps=1 --warmup_steps=0` in a fresh process (no compilation cache),
and from its result: compile (lower and compile the step), data (the first batch), init
(parameters and optimizer state), and the process's wall time. The target: data and init
together at most 2 s beyond the compile, so that compiling is the only wait.
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workloads", default="all")
  parser.add_argument("--preset", default="tiny")
  args = parser.parse_args()
  sys.path.insert(0, ROOT)
  from fathom_jax.workloads import registry
  print(f"{'workload':<12s} {'compile s':>9s} {'data s':>7s} {'init s':>7s} "
        f"{'data+init':>9s} {'wall s':>7s}  target (data+init <= 2 s)")
  for name in registry.expand(args.workloads):
    with tempfile.TemporaryDirectory() as out:
      start = time.perf_counter()
      proc = subprocess.run(
          [sys.executable, os.path.join(ROOT, "run.py"), f"--workload={name}",
           f"--preset={args.preset}", "--steps=1", "--warmup_steps=0", f"--output_dir={out}",
           "--quiet"], capture_output=True, text=True)
      wall = time.perf_counter() - start
      if proc.returncode != 0:
        print(f"{name:<12s} failed: {proc.stderr.strip().splitlines()[-1:]}")
        continue
      (path,) = glob.glob(os.path.join(out, "*", "result.json"))
      with open(path) as f:
        figures = json.load(f)["figures"]
    data, init = figures["data_time_s"], figures["init_time_s"]
    compile_s = figures["lower_time_s"] + figures["compile_time_s"]
    print(f"{name:<12s} {compile_s:9.2f} {data:7.2f} {init:7.2f} {data + init:9.2f} {wall:7.2f}  "
          f"{'ok' if data + init <= 2 else 'over'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
