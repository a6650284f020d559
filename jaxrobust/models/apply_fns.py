"""A jaxrobust model's apply functions, `(variables, x) -> logits` in inference mode.

They are frozen dataclasses: equal models (Flax modules compare by value)
give equal, equally hashed functions, so a compiled program cached by
function (`jax.jit` with the function static, `functools.cache`) serves every
equal model, with no cache of functions kept here.
"""

import dataclasses
from collections.abc import Callable
from typing import TypeAlias, cast

import flax.linen as nn
import jax

from jaxrobust.models.randomized import Randomized, is_randomized
from jaxrobust.types import Images, Logits, PRNGKey, Variables

StochasticApplyFn: TypeAlias = Callable[[Variables, Images, PRNGKey], Logits]


@dataclasses.dataclass(frozen=True)
class InferenceFn:
  """`(variables, x) -> model.apply(variables, x, train=False)`.

  Attributes:
    model: a jaxrobust model (`create`).
    base: call the base classifier f of a randomized model
      (`method="base"`); ignored for other models.
  """

  model: nn.Module
  base: bool = False

  def __call__(self, variables: Variables, x: Images) -> Logits:
    method = "base" if self.base and is_randomized(self.model) else None
    return cast(Logits, self.model.apply(variables, x, train=False, method=method))


@dataclasses.dataclass(frozen=True)
class StochasticFn:
  """`(variables, x, key) -> logits` of a randomized model with one fresh noise draw.

  The log-softmax of f(x + sigma z), z ~ N(0, I) of x's shape drawn from
  `key` (`Randomized` with one draw, `noise` [1, *x.shape]).

  Attributes:
    model: a `Randomized` model.
  """

  model: Randomized

  def __call__(self, variables: Variables, x: Images, key: PRNGKey) -> Logits:
    noise = self.model.sigma * jax.random.normal(key, (1, *x.shape), x.dtype)
    return cast(Logits, self.model.apply(variables, x, train=False, noise=noise))


def inference_fn(model: nn.Module, base: bool = False) -> InferenceFn:
  """The function `(variables, x) -> logits` of `model` in inference mode.

  Args:
    model: a jaxrobust model.
    base: for a randomized model, its base classifier f instead of f~.

  Returns:
    An `InferenceFn`, equal (and equally hashed) for equal models and settings.
  """
  return InferenceFn(model, base=bool(base) and is_randomized(model))


def stochastic_fn(model: nn.Module) -> StochasticFn | None:
  """The function `(variables, x, key) -> logits` of a randomized model, fresh noise per call.

  Attacks with expectation over transformation (EOT) call it with a new key
  for each gradient.

  Args:
    model: a jaxrobust model.

  Returns:
    A `StochasticFn`, equal for equal models; None for a deterministic model.
  """
  return StochasticFn(model) if isinstance(model, Randomized) else None
