"""Data parallelism over every local device.

A step is written for one device, with collectives (`jax.lax.pmean`) over the
named batch axis `BATCH_AXIS`, and mapped over a 1-D mesh of all devices with
`jax.shard_map` under `jax.jit` (pmap's programming model in its current form).

On CPU, XLA uses two cores better as two host devices than as one device with
two threads; `use_host_devices()` asks for one host device per core and must
run before JAX initialises its backends.
"""

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxrobust import checks

BATCH_AXIS = "batch"


def use_host_devices(count: int | None = None) -> bool:
  """Asks XLA:CPU for `count` host devices (default: one per core).

  Does nothing when the user already set `XLA_FLAGS`; has no effect once JAX
  has initialised its backends.

  Args:
    count: the number of host devices; None or 0 for one per core.

  Returns:
    True if it set the flag.
  """
  if "XLA_FLAGS" in os.environ:
    return False
  count = count or len(os.sched_getaffinity(0))
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={count}"
  return True


def mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh named `BATCH_AXIS` over `devices`.

  Args:
    devices: the mesh's devices (default: all devices).

  Returns:
    The mesh.
  """
  return Mesh(list(devices or jax.devices()), (BATCH_AXIS,))


def batch_sharding(m: Mesh) -> NamedSharding:
  """Sharding that splits the leading (batch) axis over the mesh.

  Args:
    m: a mesh over `BATCH_AXIS`.

  Returns:
    The sharding `P(BATCH_AXIS)` on `m`.
  """
  return NamedSharding(m, P(BATCH_AXIS))


def replicated(m: Mesh) -> NamedSharding:
  """Sharding that puts a full copy on every device of the mesh.

  Args:
    m: a mesh.

  Returns:
    The sharding `P()` on `m`.
  """
  return NamedSharding(m, P())


def data_parallel(
  fn: Callable[..., Any], m: Mesh, in_specs: Any, out_specs: Any, *, check_vma: bool = True
) -> Callable[..., Any]:
  """`jax.shard_map(fn)` over mesh `m`: `fn` sees one device's shard.

  Args:
    fn: the step for one device, with collectives over `BATCH_AXIS`.
    m: a mesh over `BATCH_AXIS`.
    in_specs: a pytree of specs for the arguments: `P(BATCH_AXIS)` for
      per-example arrays and `P()` for replicated ones (parameters, keys).
    out_specs: the same for the outputs.
    check_vma: JAX checks that every output declared replicated is (a missing
      `lax.pmean` is an error); False turns that off for a step whose outputs
      are per device by design.

  Returns:
    The mapped function, of global arrays.
  """
  return jax.shard_map(fn, mesh=m, in_specs=in_specs, out_specs=out_specs, check_vma=check_vma)


def global_batch(batch: Any, mesh: Mesh) -> Any:
  """A global batch of numpy arrays as `jax.Array`s split over `mesh`.

  Each process supplies only the rows of its own devices.

  Args:
    batch: a pytree of numpy arrays, the same on every process.
    mesh: a mesh over `BATCH_AXIS`.

  Returns:
    The pytree of global arrays, split along their leading axis.
  """
  sharding = batch_sharding(mesh)

  def put(array: np.ndarray) -> jax.Array:
    indices = sharding.addressable_devices_indices_map(array.shape).values()
    slices = [index[0] for index in indices if index is not None]
    rows = sorted({s.indices(len(array))[:2] for s in slices})
    start, stop = rows[0][0], rows[-1][1]
    assert sum(b - a for a, b in rows) == stop - start, "a process's rows must be contiguous"
    return jax.make_array_from_process_local_data(sharding, array[start:stop], array.shape)

  return jax.tree.map(put, batch)


@contextlib.contextmanager
def on_every_process(what: str) -> Iterator[None]:
  """Runs a block on every process; if it fails on one, it fails on all (no hang).

  Args:
    what: what the block does, for the error on the other processes.

  Yields:
    None.
  """
  try:
    yield
  except BaseException:
    all_ok(False)
    raise
  checks.require(all_ok(True), f"another process failed to {what}; see its error")


def all_ok(ok: bool) -> bool:
  """Whether `ok` holds on every process (a collective on several processes).

  Args:
    ok: this process's answer.

  Returns:
    The logical and of every process's `ok`.
  """
  if jax.process_count() == 1:
    return ok
  return bool(multihost_utils.process_allgather(np.bool_(ok)).all())
