#!/usr/bin/env python3
"""Runs fathom_jax workloads: python run.py --workload=memnet [--mode=both --backend=gpu ...]."""

from fathom_jax import cli

if __name__ == "__main__":
  cli.run()
