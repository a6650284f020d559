"""The types of jaxrobust's public API, shapes in jaxtyping's notation.

B is the batch, K the number of classes, `*shape` an example's shape (NHWC
images: H, W, C). Images are floats in [0, 1]; a PRNG key is a typed key
(`jax.random.key`) or a raw uint32 key.
"""

from collections.abc import Callable
from typing import Any, TypeAlias

from jaxtyping import Array, Float, Int, Key

Images: TypeAlias = Float[Array, "B *shape"]
Labels: TypeAlias = Int[Array, " B"]
Logits: TypeAlias = Float[Array, "B K"]
PRNGKey: TypeAlias = Key[Array, ""] | Array
Variables: TypeAlias = Any  # a pytree of arrays: `{"params": ..., "batch_stats": ...}`
# eps: one radius, or one per example.
Eps: TypeAlias = float | Float[Array, " B"]
LogitsFn: TypeAlias = Callable[[Images], Logits]
StochasticLogitsFn: TypeAlias = Callable[[Images, PRNGKey], Logits]
ApplyFn: TypeAlias = Callable[[Variables, Images], Logits]

__all__ = [
  "ApplyFn",
  "Eps",
  "Images",
  "Labels",
  "Logits",
  "LogitsFn",
  "PRNGKey",
  "StochasticLogitsFn",
  "Variables",
]
