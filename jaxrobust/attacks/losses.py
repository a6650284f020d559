"""Per-example attack losses on logits z [K] and a label y; attacks maximise them
(untargeted) or minimise them (targeted, with y the target)."""
import jax
import jax.numpy as jnp

from jaxrobust import checks


def cross_entropy(logits, y):
  """-log softmax(z)_y."""
  return -jax.nn.log_softmax(logits)[y]


def other_max(logits, y):
  """max_{i != y} z_i."""
  return jnp.max(jnp.where(jnp.arange(logits.shape[-1]) == y, -jnp.inf, logits))


def margin(logits, y):
  """Carlini-Wagner margin max_{i != y} z_i - z_y: positive iff y is not the top class."""
  return other_max(logits, y) - logits[y]


LOSSES = {"ce": cross_entropy, "cw": margin}


def get(loss):
  """A loss by name ("ce", "cw") or a callable `loss(logits [K], y) -> scalar`."""
  if callable(loss):
    return loss
  return LOSSES[checks.one_of("loss", loss, tuple(LOSSES))]
