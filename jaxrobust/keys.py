"""Per-example PRNG keys: one meaning everywhere.

The key of example i is `fold_in(key, i)`, i the example's index in the whole
batch (or data set), and an attack made of parts gives part j of example i
`fold_in(k_i, j)`. So every random draw of an example depends only on the
key and its index: never on the batch size, the device count, or a resume.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike

PRNGKey = Array  # a typed key or a raw uint32 one (`jaxrobust.types.PRNGKey`)


def example_keys(key: PRNGKey, index: int | ArrayLike) -> PRNGKey:
  """One key per example: `fold_in(key, i)` for every i in `index`.

  Args:
    key: a PRNG key, or already a batch of keys (returned as it is when it
      has one key per example).
    index: the examples' indices, an int array [B], or a batch size B for
      0..B-1.

  Returns:
    The keys [B] (typed) or [B, 2] (raw uint32).
  """
  index = jnp.arange(index) if jnp.ndim(index) == 0 else jnp.asarray(index)
  if _is_key_batch(key, index.shape[0]):
    return key
  return jax.vmap(jax.random.fold_in, (None, 0))(key, index)


def fold(keys: PRNGKey, j: int | ArrayLike) -> PRNGKey:
  """`fold_in(k, j)` for every key k of a batch: part j of every example.

  Args:
    keys: a batch of keys, one per example.
    j: the part's index, the same for every example.

  Returns:
    The folded keys, one per example.
  """
  return jax.vmap(jax.random.fold_in, (0, None))(keys, j)


def _is_key_batch(key: Array, batch_size: int) -> bool:
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    return key.shape == (batch_size,)
  return key.ndim == 2 and key.shape[0] == batch_size  # raw uint32 keys [B, 2]
