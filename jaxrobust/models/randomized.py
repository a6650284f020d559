"""The randomized classifier f~(x) = f(x + d), d ~ N(0, sigma^2 I), of a base classifier f."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxrobust import checks
from jaxrobust.types import Images, Logits


class Randomized(nn.Module):
  """The randomized classifier f~(x) = f(x + d), d ~ N(0, sigma^2 I), of `classifier` f.

  In inference f~ returns the log of the mean softmax of f over S noise
  draws d_1..d_S,

    log (1 / S) sum_s softmax(f(x + d_s)),

  valid logits for any attack loss: their cross-entropy is the loss of
  expectation over transformation (EOT) over those draws. Without `noise`
  the draws are fixed by `seed` (the same for every call and every example),
  so `lambda x: apply(v, x)` is a pure function whose argmax is the
  prediction, and an attack differentiating it sees exactly the evaluated
  classifier. Calls:

  * `apply(v, x)`: the S = `samples` fixed draws.
  * `apply(v, x, noise=d)`, d of shape [S, B or 1, ...]: the draws d.
  * `apply(v, x, train=True, noise=d)`, d of x's shape: f(x + d), one draw
    per example (training; `training.make_train_step` draws d from the
    run's key).
  * `apply(v, x, method="base")`: the base classifier f, without noise,
    which `smoothing.predict` and `smoothing.certify` take.

  Variables live under "classifier" (e.g. params["classifier"]["Conv_0"]).

  Attributes:
    classifier: the base classifier f, called as `classifier(x, train=...)`.
    sigma: the noise's standard deviation.
    samples: the number S of fixed draws.
    seed: the seed of the fixed draws.

  References:
    Araujo et al., 2019 (https://arxiv.org/abs/1903.10219);
    Cohen et al., 2019 (https://arxiv.org/abs/1902.02918);
    Athalye et al., 2018 (https://arxiv.org/abs/1802.00420)
  """

  classifier: nn.Module
  sigma: float
  samples: int = 8
  seed: int = 0

  def fixed_noise(self, shape: tuple[int, ...], dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """The `samples` fixed draws for one example.

    Args:
      shape: the example's shape.
      dtype: the draws' dtype.

    Returns:
      sigma z, z ~ N(0, I) of shape [S, 1, *shape] drawn from `jax.random.key(seed)`.
    """
    z = jax.random.normal(jax.random.key(self.seed), (self.samples, 1, *shape), dtype)
    return self.sigma * z

  def __call__(self, x: Images, train: bool = False, noise: jax.Array | None = None) -> Logits:
    if noise is None:
      checks.require(
        not train,
        "Randomized in training mode needs noise=d, one draw per example of the input's shape",
      )
      noise = self.fixed_noise(x.shape[1:], x.dtype)
    if noise.shape == x.shape:
      return self.classifier(x + noise, train=train)
    checks.require(
      noise.ndim == x.ndim + 1,
      f"noise must have the input's shape {x.shape} or [draws, batch or 1, ...], got {noise.shape}",
    )
    draws = noise.shape[0]
    noisy = (x[None] + noise).reshape(-1, *x.shape[1:])
    logits = self.classifier(noisy, train=train).reshape(draws, x.shape[0], -1)
    return jax.nn.logsumexp(jax.nn.log_softmax(logits), axis=0) - jnp.log(draws)

  def base(self, x: Images, train: bool = False) -> Logits:
    """The base classifier f(x), without noise."""
    return self.classifier(x, train=train)


def is_randomized(model: object) -> bool:
  """Whether `model` is a randomized classifier (`Randomized`)."""
  return isinstance(model, Randomized)
