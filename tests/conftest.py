import os
import sys

# Tests run on the CPU with a deterministic single-device setup, whatever the machine has.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
