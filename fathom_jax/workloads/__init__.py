"""The eight Fathom workloads; see `registry` for the name -> workload mapping."""
