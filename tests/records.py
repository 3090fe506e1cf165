"""A result record as a run writes it, for tests that need one on disk without running."""


def valid_record(**changes) -> dict:
  """A completed memnet train run's result.json, valid under the package's schema."""
  record = {
      "schema_version": 1, "status": "completed", "workload": "memnet", "mode": "train",
      "preset": "tiny", "implementation": "tuned", "example_unit": "questions",
      "spec": {"workload": "memnet", "mode": "train", "preset": "tiny", "steps": 3, "seed": 0},
      "config": {"batch_size": 8}, "data": {"kind": "synthetic"},
      "provenance": {"fathom_jax": "0.1.0", "command": "python run.py --workload=memnet",
                     "started_utc": "2026-12-07T23:00:00+00:00", "duration_s": 2.5},
      "environment": {"python": "3.11.9", "platform": "Linux", "processor": "x", "cpu_count": 2,
                      "jax": "0.10.2", "jaxlib": "0.10.2", "flax": "0.12.8", "optax": "0.2.8",
                      "backend": "cpu", "device_kind": "cpu", "device_count": 1},
      "parallelism": {"num_devices": 1, "per_device_batch": 8},
      "figures": {"parameters": 10, "losses": [2.0, "NaN"], "step_times_s": [0.1, 0.2]},
  }
  record.update(changes)
  return record
