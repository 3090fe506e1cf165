"""Where a JAX program's time goes, from a profiler trace and the program's HLO.

  hlo          parser for XLA's HLO text (optimised or not, any backend)
  trace        reader for jax.profiler traces (op events, step windows, embedded HLO)
  cost         FLOPs, transcendentals and bytes per instruction, loops times trip counts
  categories   XLA's categories and Fathom's classes, and the rule that splits a fusion's time
  breakdown    attribution of step time to ops; ops.csv, breakdown.json, breakdown.png, table
  xprof_check  cross-check against xprof's hlo_stats (GPU/TPU traces)

Command line: python -m fathom_jax.analysis breakdown <trace_dir> [--output_dir=DIR]
"""
