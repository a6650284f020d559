"""Data parallelism over every local device.

A step is written for one device, with collectives (`jax.lax.pmean`) over the
named batch axis `BATCH_AXIS`, and mapped over a 1-D mesh of all devices with
`jax.shard_map` under `jax.jit` (pmap's programming model in its current form).

On CPU, XLA uses two cores better as two host devices than as one device with
two threads; `use_host_devices()` asks for one host device per core and must
run before JAX initialises its backends.
"""
import os

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXIS = "batch"


def use_host_devices(count=None):
  """Asks XLA:CPU for `count` host devices (default: one per core).

  Does nothing when the user already set `XLA_FLAGS` or JAX has started.
  Returns True if it set the flag.
  """
  if "XLA_FLAGS" in os.environ:
    return False
  count = count or len(os.sched_getaffinity(0))
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={count}"
  return True


def mesh(devices=None):
  """A 1-D mesh named `BATCH_AXIS` over `devices` (default: all devices)."""
  return Mesh(list(devices or jax.devices()), (BATCH_AXIS,))


def batch_sharding(m):
  """Sharding that splits the leading (batch) axis over the mesh."""
  return NamedSharding(m, P(BATCH_AXIS))


def replicated(m):
  """Sharding that puts a full copy on every device of the mesh."""
  return NamedSharding(m, P())


def data_parallel(fn, m, in_specs, out_specs):
  """`jax.shard_map(fn)` over mesh `m`: `fn` sees one device's shard.

  Specs use `P(BATCH_AXIS)` for per-example arrays and `P()` for replicated
  ones (parameters, keys).
  """
  return jax.shard_map(fn, mesh=m, in_specs=in_specs, out_specs=out_specs,
                       check_vma=False)
