"""Per-example attack losses on logits z [K] and a label y; attacks maximise them
(untargeted) or minimise them (targeted, with y the target)."""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxrobust import checks


def cross_entropy(logits: jax.Array, y: jax.Array) -> jax.Array:
  """-log softmax(z)_y."""
  return -jax.nn.log_softmax(logits)[y]


def other_max(logits: jax.Array, y: jax.Array) -> jax.Array:
  """max_{i != y} z_i."""
  return jnp.max(jnp.where(jnp.arange(logits.shape[-1]) == y, -jnp.inf, logits))


def margin(logits: jax.Array, y: jax.Array) -> jax.Array:
  """Carlini-Wagner margin max_{i != y} z_i - z_y: positive iff y is not the top class."""
  return other_max(logits, y) - logits[y]


def _top(logits, k):
  """The k largest logits, largest first."""
  return jax.lax.top_k(logits, k)[0]


def dlr(logits: jax.Array, y: jax.Array) -> jax.Array:
  """Difference of logits ratio (Croce & Hein 2020), for K >= 3 classes:

    -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12),

  z_pi1 >= z_pi2 >= ... the sorted logits. Invariant to shifting and scaling
  the logits, so it cannot be defeated by rescaling them.
  """
  top = _top(logits, 3)
  return margin(logits, y) / (top[0] - top[2] + 1e-12)


def _dlr_t_scale(logits):
  top = _top(logits, 4)
  return top[0] - (top[2] + top[3]) / 2 + 1e-12


def dlr_targeted(logits: jax.Array, t: jax.Array) -> jax.Array:
  """A targeted DLR loss that needs only the target t, for K >= 4 classes;
  attacks minimise it:

    (max_{i != t} z_i - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12).

  The strongest class other than t stands in for the true class y of Croce &
  Hein's loss (`dlr_t`); it is y wherever the model classifies x correctly.
  """
  return margin(logits, t) / _dlr_t_scale(logits)


def dlr_t(logits: jax.Array, y: jax.Array, t: jax.Array) -> jax.Array:
  """Croce & Hein's targeted DLR loss (APGD-T), for K >= 4 classes, which
  attacks maximise: y the true class, t the target,

    -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12).
  """
  return -(logits[y] - logits[t]) / _dlr_t_scale(logits)


LOSSES = {"ce": cross_entropy, "cw": margin, "dlr": dlr}


def get(loss: str | Callable) -> Callable:
  """A loss by name ("ce", "cw", "dlr") or a callable `loss(logits [K], y) -> scalar`."""
  if callable(loss):
    return loss
  return LOSSES[checks.one_of("loss", loss, tuple(LOSSES))]


def kl_divergence(logits: jax.Array, p: jax.Array) -> jax.Array:
  """KL(p || softmax(z)) = sum_k p_k (log p_k - log softmax(z)_k), for soft
  labels p [K] (0 log 0 = 0): TRADES's inner loss (Zhang et al. 2019), with p
  the model's prediction on the clean input. A callable loss of `pgd`."""
  return jnp.sum(jax.scipy.special.xlogy(p, p) - p * jax.nn.log_softmax(logits))
