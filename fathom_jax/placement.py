"""Data parallelism: a 1-D mesh over the devices; batches sharded on their leading axis, state
replicated, so XLA reduces the gradients with collectives."""

import dataclasses
from typing import Callable, Optional, Sequence

import jax
import numpy as np

from fathom_jax import data as data_lib
from fathom_jax.errors import UsageError

DATA_AXIS = "data"


@dataclasses.dataclass(frozen=True)
class Placement:
  mesh: jax.sharding.Mesh
  batch: jax.sharding.NamedSharding
  replicated: jax.sharding.NamedSharding

  @property
  def num_devices(self) -> int:
    return self.mesh.devices.size


def make_placement(devices: Sequence, num_devices: Optional[int], batch_size: int) -> Placement:
  n = len(devices) if num_devices is None else num_devices
  if not 1 <= n <= len(devices):
    raise UsageError(f"--num_devices must be between 1 and {len(devices)} (the "
                     f"{devices[0].platform} devices present), got {n}")
  if batch_size % n:
    raise UsageError(f"global batch {batch_size} does not divide evenly over {n} devices")
  if batch_size % jax.process_count():
    raise UsageError(f"global batch {batch_size} does not divide evenly over "
                     f"{jax.process_count()} processes")
  mesh = jax.sharding.Mesh(np.asarray(devices[:n]), (DATA_AXIS,))
  P = jax.sharding.PartitionSpec
  return Placement(mesh, jax.sharding.NamedSharding(mesh, P(DATA_AXIS)),
                   jax.sharding.NamedSharding(mesh, P()))


def place_batch(batch, placement: Placement):
  """Global numpy batch -> global jax arrays; each process contributes only its own slice."""
  count, index = jax.process_count(), jax.process_index()

  def put(x):
    x = np.asarray(x)
    local = x.shape[0] // count
    return jax.make_array_from_process_local_data(
        placement.batch, x[index * local:(index + 1) * local], x.shape)

  return jax.tree.map(put, batch)


def placer(source, placement: Placement) -> Callable:
  """Puts a host batch on the devices. A synthetic source cycles a fixed pool of batches (kept
  alive by its iterator, so their ids are stable): each is placed once, not on every step."""
  if not isinstance(source, data_lib.SyntheticSource):
    return lambda batch: place_batch(batch, placement)
  placed = {}

  def put(batch):
    if id(batch) not in placed:
      placed[id(batch)] = place_batch(batch, placement)
    return placed[id(batch)]
  return put


# What XLA says when it does not know an option, or not one of its values (options and their
# enums come and go between jaxlib releases).
