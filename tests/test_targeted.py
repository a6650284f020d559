"""Targeted attacks: the target helpers, the targeted rule of the combinators,
targeted MI-FGSM, M-DI2-FGSM and Square, and settings that round-trip."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrobust as jr
from jaxrobust import checks

A = jr.attacks
T = jr.attacks.targets


# --- target helpers --------------------------------------------------------------


def test_random_other_is_never_y_and_uniform_over_the_others():
  num_classes, n = 5, 20_000
  y = jnp.asarray(np.arange(n) % num_classes)
  t = np.asarray(T.random_other(jax.random.key(0), y, num_classes))
  assert t.dtype == np.int32 and t.shape == (n,)
  assert np.all(t != np.asarray(y)) and t.min() >= 0 and t.max() < num_classes
  for c in range(num_classes):
    counts = np.bincount(t[np.asarray(y) == c], minlength=num_classes)
    others = np.delete(counts, c)
    # 4,000 draws over 4 classes: 1,000 each, binomial sd ~27; 5 sd apart.
    assert counts[c] == 0 and np.all(np.abs(others - 1000) < 140), counts
  # Per example from fold_in(key, i): independent of the batch around it.
  keys = jax.random.split(jax.random.key(3), 4)
  batch = T.random_other(keys, y[:4], num_classes)
  np.testing.assert_array_equal(T.random_other(keys[2:3], y[2:3], num_classes), batch[2:3])
  one = T.random_other(jax.random.key(0), y[:8], num_classes)
  np.testing.assert_array_equal(one, t[:8])


def test_least_likely_is_the_argmin():
  logits = np.random.default_rng(0).standard_normal((50, 7)).astype(np.float32)
  t = T.least_likely(jnp.asarray(logits))
  np.testing.assert_array_equal(t, np.argmin(logits, -1))
  assert t.dtype == jnp.int32


def test_mapped_applies_the_map():
  y = jnp.array([0, 1, 2, 2, 1])
  expected = [1, 2, 0, 0, 2]
  np.testing.assert_array_equal(T.mapped(y, {0: 1, 1: 2, 2: 0}), expected)
  np.testing.assert_array_equal(T.mapped(y, [1, 2, 0]), expected)
  np.testing.assert_array_equal(T.mapped(y, np.array([1, 2, 0]), num_classes=3), expected)
  # Not a permutation: several classes to one target.
  np.testing.assert_array_equal(T.mapped(y, [1, 0, 0]), [1, 0, 0, 0, 0])
  # Under jit, y traced (the map is static).
  np.testing.assert_array_equal(jax.jit(lambda y: T.mapped(y, [1, 2, 0]))(y), expected)


@pytest.mark.parametrize(
  "build, message",
  [
    (lambda: T.random_other(jax.random.key(0), jnp.array([0, 3]), 3), r"\[0, 3\).*3"),
    (lambda: T.random_other(jax.random.key(0), jnp.array([0, 1]), 1), "num_classes.*>= 2"),
    (lambda: T.random_other(jax.random.key(0), jnp.array([0.0, 1.0]), 3), "integers"),
    (lambda: T.random_other(jax.random.key(0), jnp.zeros((2, 2), int), 3), "shape"),
    (lambda: T.least_likely(jnp.zeros(4)), r"\[batch, classes\]"),
    (lambda: T.least_likely(jnp.array([[0.0, jnp.nan]])), "NaN"),
    (lambda: T.mapped(jnp.array([0, 1]), {0: 1, 1: 2, 3: 0}), r"missing classes \[2\]"),
    (lambda: T.mapped(jnp.array([0, 1]), {0: 1, 1: 0}, num_classes=3), r"missing classes \[2\]"),
    (lambda: T.mapped(jnp.array([0, 1]), [1, 0], num_classes=3), "every class 0..2"),
    (lambda: T.mapped(jnp.array([0, 1]), {0: 1, 1: 1}), r"to themselves: \[1\]"),
    (lambda: T.mapped(jnp.array([0, 1]), [0, 2, 1]), r"to themselves: \[0\]"),
    (lambda: T.mapped(jnp.array([0, 1]), [1, 5, 0]), r"outside \[0, 3\).*5"),
    (lambda: T.mapped(jnp.array([0, 1]), [1.0, 0.0]), "integers"),
    (lambda: T.mapped(jnp.array([0, 4]), [1, 2, 0]), r"\[0, 3\).*4"),
    (lambda: T.mapped(jnp.array([0, 1]), 3), "dict"),
  ],
)
def test_bad_target_inputs(build, message):
  with pytest.raises(checks.InputError, match=message):
    build()
