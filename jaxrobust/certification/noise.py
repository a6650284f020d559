"""The classes a base classifier gives to Gaussian noisy copies of images.

Every forward pass of randomized smoothing goes through `noise_counts`: one
jit-compiled function evaluates a chunk of `batch_size` noisy copies (of one
or many images) split over every device of a mesh, and a host loop calls it
until all the draws are counted. Draw j of example i uses the key
`fold_in(fold_in(key, i), j)`, so the counts depend only on `key`, never on
`batch_size` or on the number of devices.
"""

import functools
from collections.abc import Callable
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jaxtyping import Array

from jaxrobust import checks, parallel
from jaxrobust.models import inference
from jaxrobust.types import ApplyFn, Images, LogitsFn, PRNGKey, Variables

MAX_DRAWS = 2**31 - 1  # counts are int32: at most this many draws per example


def noise_counts(
  logits_fn: LogitsFn | ApplyFn,
  x: Images,
  key: PRNGKey,
  *,
  sigma: float,
  n: int,
  batch_size: int = 1000,
  mesh: Mesh | None = None,
  variables: Variables | None = None,
) -> np.ndarray:
  """Counts the classes the base classifier gives to `n` noisy copies of each image.

  counts[i, c] = #{j < n : argmax logits_fn(x[i] + d_ij) = c}, where
  d_ij = sigma * normal(fold_in(fold_in(key, i), j), x.shape[1:]). The draws
  are evaluated `batch_size` at a time (memory is bounded whatever `n` is),
  each chunk split over the devices of `mesh`; the counts are identical for
  every `batch_size` and every mesh (up to the base classifier giving a
  different argmax for the same input at a different batch size). The
  normals come from JAX's original (non-partitionable) threefry variant
  whatever the `jax_threefry_partitionable` setting, so they do not change
  with it either.

  Runs on the host, as `predict` and `certify` do (each chunk is a compiled
  program; the counts and the confidence bounds are numpy): call it outside
  `jax.jit`, `vmap` and `scan`; `logits_fn` itself may be anything traceable.

  Args:
    logits_fn: base classifier, `logits_fn(x_batch) -> logits [batch, classes]`,
      traceable by `jax.jit`; it is a static argument of the compiled chunk,
      so pass the same function object across calls to reuse the compilation.
    x: images [B, ...] in [0, 1]; they, the noise and the noisy copies are float32.
    key: a threefry2x32 PRNG key (JAX's default: `jax.random.key(seed)` or
      `jax.random.PRNGKey(seed)`).
    sigma: standard deviation of the Gaussian noise, > 0.
    n: number of noisy draws per image, 1 <= n <= 2**31 - 1.
    batch_size: forward passes per compiled chunk (rounded up to a multiple of
      the number of devices, and down to B * n when that is smaller).
    mesh: a 1-D mesh over `parallel.BATCH_AXIS` (default: all devices).
    variables: optional; then `logits_fn` is `apply_fn(variables, x_batch)
      -> logits` and the variables are an argument of the compiled chunk: one
      compilation per `apply_fn`, whatever the weights (`inference.split`).

  Returns:
    int32 numpy array [B, num_classes]; every row sums to n.
  """
  checks.require(
    checks.is_concrete(x) and checks.is_concrete(key),
    "smoothing.noise_counts, predict and certify run on the host (chunks of draws, then "
    "numpy confidence bounds): call them outside jax.jit / vmap / scan, with concrete "
    "images and key",
  )
  check_sigma(sigma)
  check_draws("n", n)
  check_draws("batch_size", batch_size)
  key = threefry_key(key)
  checks.check_images(x)
  x = jnp.asarray(x, jnp.float32)
  mesh = parallel.mesh() if mesh is None else mesh
  apply_fn: Any
  if variables is None:
    apply_fn, variables = inference.constant_apply(cast(LogitsFn, logits_fn)), ()
  else:
    apply_fn = logits_fn
  total = x.shape[0] * n
  per_device = -(-min(batch_size, max(total, 1)) // mesh.devices.size)
  num_classes = _num_classes(functools.partial(apply_fn, variables), x, per_device)
  if total == 0:
    return np.zeros((0, num_classes), np.int32)
  return _count_every_draw(apply_fn, variables, x, key, sigma, n, mesh, per_device, num_classes)


def _count_every_draw(
  apply_fn: ApplyFn,
  variables: Variables,
  x: Array,
  key: PRNGKey,
  sigma: float,
  n: int,
  mesh: Mesh,
  per_device: int,
  num_classes: int,
) -> np.ndarray:
  """`noise_counts` of checked arguments: a host loop over compiled chunks."""
  num_devices, num_examples = mesh.devices.size, x.shape[0]
  counts = jax.device_put(
    np.zeros((num_devices * num_examples, num_classes), np.int32), parallel.batch_sharding(mesh)
  )
  replicate = functools.partial(jax.device_put, device=parallel.replicated(mesh))
  x, key, sigma_array, n_array = map(replicate, (x, key, np.float32(sigma), np.uint32(n)))
  # Each draw's noise is generated on one device from its own key, so the
  # partitionable threefry variant (JAX's default) buys nothing here, and on
  # XLA:CPU it generates normals slower than the original variant. Fixing
  # the variant also makes the noise independent of the user's setting.
  with jax.threefry_partitionable(False):
    for start in range(0, num_examples * n, per_device * num_devices):
      counts = add_chunk_counts(
        counts,
        variables,
        x,
        key,
        sigma_array,
        n_array,
        np.uint32(start // n),
        np.uint32(start % n),
        apply_fn=apply_fn,
        mesh=mesh,
        per_device=per_device,
      )
  per_device_counts = np.asarray(counts).reshape(num_devices, num_examples, -1)
  return per_device_counts.sum(axis=0, dtype=np.int32)


@functools.partial(jax.jit, static_argnames=("apply_fn", "mesh", "per_device"), donate_argnums=0)
def add_chunk_counts(
  counts: Array,
  variables: Variables,
  x: Array,
  key: PRNGKey,
  sigma: Array,
  n: Array,
  start_example: Array,
  start_draw: Array,
  *,
  apply_fn: ApplyFn,
  mesh: Mesh,
  per_device: int,
) -> Array:
  """Adds the classes of one chunk of draws (flat index i * n + j) to `counts`.

  `counts` is [devices * B, classes], one block of B rows per device, so no
  collective is needed; the caller sums the blocks at the end. Draws past
  B * n (the padded tail of the last chunk) are computed and not counted.

  Args:
    counts: int32 [devices * B, classes], sharded over `parallel.BATCH_AXIS`
      (donated).
    variables: the first argument of `apply_fn`.
    x: float32 images [B, ...].
    key: a threefry2x32 key.
    sigma: the noise's standard deviation, float32.
    n: draws per example, uint32.
    start_example: the example of the chunk's first draw, uint32.
    start_draw: that draw's index among the example's draws, uint32.
    apply_fn: `apply_fn(variables, x) -> logits`.
    mesh: a 1-D mesh over `parallel.BATCH_AXIS`.
    per_device: draws evaluated on each device.

  Returns:
    `counts` with the chunk's classes added.
  """

  def count_on_device(counts, variables, x, key, sigma, n, start_example, start_draw):
    device = jax.lax.axis_index(parallel.BATCH_AXIS).astype(jnp.uint32)
    # uint32 cannot overflow: start_draw < n <= 2**31 - 1 and the offset within
    # the chunk is far below 2**31 (a chunk holds that many images in memory).
    offset = start_draw + device * per_device + jnp.arange(per_device, dtype=jnp.uint32)
    example = start_example + offset // n
    draw = offset % n
    counted = example < x.shape[0]
    example = jnp.minimum(example, x.shape[0] - 1)
    noise = jax.vmap(_gaussian_draw, in_axes=(None, 0, 0, None, None))(
      key, example, draw, x.shape[1:], x.dtype
    )
    logits = apply_fn(variables, x[example] + sigma * noise)
    predicted = jnp.argmax(logits, axis=-1)
    return counts.at[example, predicted].add(counted.astype(jnp.int32))

  replicated = P()
  return parallel.data_parallel(
    count_on_device,
    mesh,
    in_specs=(P(parallel.BATCH_AXIS),) + (replicated,) * 7,
    out_specs=P(parallel.BATCH_AXIS),
  )(counts, variables, x, key, sigma, n, start_example, start_draw)


def _gaussian_draw(
  key: PRNGKey, example: Array, draw: Array, shape: tuple[int, ...], dtype: jnp.dtype
) -> Array:
  """Standard normal noise of draw `draw` of example `example`: a counter-based key."""
  key = jax.random.fold_in(jax.random.fold_in(key, example), draw)
  return jax.random.normal(key, shape, dtype)


def _num_classes(logits_fn: Callable[[Array], Array], x: Array, batch: int) -> int:
  """The number of classes `logits_fn` gives, checked on an abstract batch of `batch` images."""
  images = jax.ShapeDtypeStruct((batch,) + x.shape[1:], x.dtype)
  shape = jax.eval_shape(logits_fn, images).shape
  checks.require(
    len(shape) == 2 and shape[0] == batch and shape[1] >= 1,
    f"logits_fn must map images [{batch}, ...] to logits [{batch}, classes], got shape {shape}",
  )
  return shape[1]


def check_sigma(sigma: float) -> None:
  """Raises InputError unless the noise's standard deviation `sigma` is > 0.

  Args:
    sigma: the value to check.
  """
  checks.positive("sigma", sigma)


def check_draws(name: str, value: int) -> None:
  """Raises InputError unless a number of draws is in [1, `MAX_DRAWS`].

  Args:
    name: the argument's name, for the message.
    value: the value to check.
  """
  checks.integer_at_least(name, value, 1)
  checks.require(
    value <= MAX_DRAWS,
    f"{name} must be <= 2**31 - 1 = {MAX_DRAWS} so that int32 "
    f"counts cannot overflow, got {value!r}",
  )


def threefry_key(key: PRNGKey) -> PRNGKey:
  """`key` as a typed threefry2x32 key; a raw uint32 [2] key is read as one.

  Other generators (rbg, unsafe_rbg) give a draw different noise at different
  batch sizes, which would make the counts depend on `batch_size`.

  Args:
    key: a typed PRNG key or a raw uint32 [2] key.

  Returns:
    A typed threefry2x32 key.
  """
  dtype = getattr(key, "dtype", None)
  if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    checks.require(
      np.shape(key) == (),
      f"key must be a single PRNG key, got a key array of shape {np.shape(key)}",
    )
    impl = str(jax.random.key_impl(key))
    checks.require(
      impl == "threefry2x32",
      f"key must be a threefry2x32 key (JAX's default generator), got a {impl} key",
    )
    return key
  checks.require(
    np.shape(key) == (2,) and np.asarray(key).dtype == np.uint32,
    f"key must be a JAX PRNG key (jax.random.key or jax.random.PRNGKey), got {key!r}",
  )
  return jax.random.wrap_key_data(jnp.asarray(key), impl="threefry2x32")
