"""fathom_jax: Fathom's eight reference deep-learning workloads in JAX, with analysis tools."""

__version__ = "0.1.0"
