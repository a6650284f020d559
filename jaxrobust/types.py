"""The types of jaxrobust's public API, shapes in jaxtyping's notation.

B is the batch, K the number of classes, `*shape` an example's shape (NHWC
images: H, W, C). Images are floats in [0, 1]; a PRNG key is a typed key
(`jax.random.key`) or a raw uint32 key. Images and labels may be JAX or
numpy arrays (the evaluation takes host arrays and batches them).
"""

from collections.abc import Callable
from typing import Any

import numpy as np
from jaxtyping import Array, Float, Int, Key

Images = Float[Array | np.ndarray, "B *shape"]
Labels = Int[Array | np.ndarray, " B"]
Logits = Float[Array, "B K"]
PRNGKey = Key[Array, ""] | Array
Variables = Any  # a pytree of arrays: `{"params": ..., "batch_stats": ...}`
# eps: one radius, or one per example.
Eps = float | Float[Array, " B"]
LogitsFn = Callable[[Images], Logits]
StochasticLogitsFn = Callable[[Images, PRNGKey], Logits]
ApplyFn = Callable[[Variables, Images], Logits]

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
