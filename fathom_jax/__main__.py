"""`python -m fathom_jax --workload=...`: the same command line as run.py."""

from fathom_jax import cli

if __name__ == "__main__":
  cli.run()
