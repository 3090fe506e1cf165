"""The synthetic source: a fixed pool of the workload's own batches, cycled."""

import jax
import numpy as np

from fathom_jax import data
from tests import workload_checks as checks


def test_synthetic_pool_holds_the_batches_of_its_keys_and_cycles():
  _, model = checks.build("memnet")
  source = data.SyntheticSource(model.synthetic_batch, pool_size=3)
  batches = source.batches(5, seed=7, train=True)
  drawn = [next(batches) for _ in range(4)]
  keys = jax.random.split(jax.random.fold_in(jax.random.key(7), 1), 3)
  for got, key in zip(drawn, keys):
    want = jax.jit(lambda k: model.synthetic_batch(k, 5))(key)
    assert set(got) == set(want)
    for name in want:
      assert isinstance(got[name], np.ndarray) and got[name].shape[0] == 5
      np.testing.assert_array_equal(got[name], want[name])
  for name in drawn[0]:
    np.testing.assert_array_equal(drawn[3][name], drawn[0][name])
  assert not np.array_equal(drawn[0]["stories"], drawn[1]["stories"])
  # Inference draws from its own pool; the same seed gives the same pool.
  infer = next(source.batches(5, seed=7, train=False))
  assert not np.array_equal(infer["stories"], drawn[0]["stories"])
  again = next(data.SyntheticSource(model.synthetic_batch, pool_size=3).batches(
      5, seed=7, train=True))
  np.testing.assert_array_equal(again["stories"], drawn[0]["stories"])
