"""Target classes for targeted attacks.

A targeted attack (`targeted=True`) takes in place of the labels the class
each example should be classified as. These helpers choose them from the
true labels `y` [B] or the model's logits [B, K]:

  t = jr.attacks.targets.random_other(key, y, num_classes=10)
  attack = jr.attacks.pgd(eps=0.3, steps=20, targeted=True)
  x_adv = attack(logits_fn, x, t, key)
"""

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrobust import checks
from jaxrobust import keys as keys_lib
from jaxrobust.types import Labels, Logits, PRNGKey


def random_other(key: PRNGKey, y: Labels, num_classes: int) -> jax.Array:
  """A target drawn uniformly from the classes other than the true one.

  Per example i, with the key k_i = `fold_in(key, i)` (or the i-th key of
  a batch of keys):

    r_i ~ U{0, ..., K - 2},  t_i = r_i + [r_i >= y_i],

  so each of the K - 1 classes other than y_i has probability 1 / (K - 1).
  Example i's target depends only on k_i and y_i, not on the batch.

  Args:
    key: a PRNG key, or a batch of B keys.
    y: true labels, integers [B] in [0, num_classes).
    num_classes: the number of classes K, >= 2.

  Returns:
    Targets t [B] (int32), t_i != y_i.
  """
  num_classes = checks.integer_at_least("num_classes", num_classes, 2)
  y = _check_labels(y, num_classes)
  keys = keys_lib.example_keys(key, y.shape[0])
  draws = jax.vmap(lambda k: jax.random.randint(k, (), 0, num_classes - 1))(keys)
  return (draws + (draws >= y)).astype(jnp.int32)


def least_likely(logits: Logits) -> jax.Array:
  """The least likely class: per example argmin_k z_k of the logits (the
  "least-likely class" target of Kurakin, Goodfellow & Bengio 2017,
  "Adversarial examples in the physical world"; ties to the lowest class).

  It is the true class only where the model ranks the true class last.

  Args:
    logits: the model's logits [B, K] (K >= 2) on the clean inputs.

  Returns:
    Targets t [B] (int32).
  """
  checks.require(
    jnp.ndim(logits) == 2 and jnp.shape(logits)[1] >= 2,
    f"logits must have shape [batch, classes] with >= 2 classes, got shape "
    f"{tuple(jnp.shape(logits))}",
  )
  if checks.is_concrete(logits):
    checks.require(
      not np.isnan(np.asarray(logits)).any(), "logits contain NaN: no least likely class"
    )
  return jnp.argmin(logits, -1).astype(jnp.int32)


def mapped(y: Labels, mapping: Any, *, num_classes: int | None = None) -> jax.Array:
  """Targets from a fixed map of classes: t_i = mapping[y_i].

  The map sends every class c in 0..K-1 to a class other than c (a
  permutation such as c -> (c + 1) mod K, or any other function).

  Args:
    y: true labels, integers [B] in [0, K).
    mapping: a dict {class: target} or a sequence (list, array) whose entry
      c is the target of class c; it must map every class 0..K-1, none to
      itself, onto classes in [0, K).
    num_classes: K; by default the size of the map. When given, the map must
      cover exactly the classes 0..K-1.

  Returns:
    Targets t [B] (int32), t_i != y_i.
  """
  table = _mapping_table(mapping, num_classes)
  y = _check_labels(y, len(table))
  return jnp.asarray(table)[y]


def _mapping_table(mapping, num_classes):
  """The map as an int32 array [K], validated."""
  if num_classes is not None:
    num_classes = checks.integer_at_least("num_classes", num_classes, 2)
  integer = lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool)
  if isinstance(mapping, dict):
    checks.require(
      all(integer(c) for c in mapping),
      f"mapping's classes must be integers, got {sorted(mapping, key=repr)!r}",
    )
    size = num_classes if num_classes is not None else max(mapping, default=-1) + 1
    unknown = sorted(c for c in mapping if not 0 <= c < size)
    checks.require(not unknown, f"mapping has classes outside [0, {size}): {unknown}")
    missing = [c for c in range(size) if c not in mapping]
    checks.require(
      not missing, f"mapping must map every class 0..{size - 1}; missing classes {missing}"
    )
    values = [mapping[c] for c in range(size)]
  else:
    checks.require(
      isinstance(mapping, (list, tuple, np.ndarray, jax.Array)) and np.ndim(mapping) == 1,
      f"mapping must be a dict {{class: target}} or a sequence of targets, one per class, "
      f"got {mapping!r}",
    )
    values = np.asarray(mapping).tolist()
    if num_classes is not None:
      checks.require(
        len(values) == num_classes,
        f"mapping must map every class 0..{num_classes - 1}: got {len(values)} targets",
      )
  size = len(values)
  checks.require(size >= 2, f"mapping must map at least 2 classes, got {mapping!r}")
  checks.require(
    all(integer(t) for t in values), f"mapping's targets must be integers, got {values!r}"
  )
  outside = {c: t for c, t in enumerate(values) if not 0 <= t < size}
  checks.require(not outside, f"mapping sends classes to targets outside [0, {size}): {outside}")
  to_itself = [c for c, t in enumerate(values) if t == c]
  checks.require(not to_itself, f"mapping sends classes to themselves: {to_itself}")
  return np.asarray(values, np.int32)


def _check_labels(y, num_classes):
  """Integer labels [B] in [0, num_classes) (the range when concrete)."""
  checks.require(
    jnp.ndim(y) == 1, f"labels must have shape [batch], got shape {tuple(jnp.shape(y))}"
  )
  y = jnp.asarray(y) if checks.is_concrete(y) else y
  checks.require(
    jnp.issubdtype(y.dtype, jnp.integer), f"labels must be integers, got dtype {y.dtype}"
  )
  checks.check_labels(y, y.shape[0], num_classes)
  return y
