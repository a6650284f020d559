"""The train state: what a run updates, its step-0 value and its structure.

A `TrainState` is never mutated: every step returns a new one. With config
`ema` = d > 0 it also keeps the exponential moving average of the parameters,
and `for_evaluation` gives the state a run is evaluated with.
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from jaxrobust import checks, parallel
from jaxrobust.types import PRNGKey, Variables


class TrainState(flax.struct.PyTreeNode):
  """Everything a run updates. Never mutated: every step returns a new one.

  .. math::
    \\mathrm{ema}_0 = \\theta_0, \\quad
    \\mathrm{ema}_t = d\\, \\mathrm{ema}_{t-1} + (1 - d)\\, \\theta_t

  Attributes:
    step: number of optimizer steps taken.
    params: the model's "params" collection.
    model_state: the model's other collections (e.g. "batch_stats").
    opt_state: the optax optimizer state.
    ema_params: None, or the exponential moving average of the parameters
      (config `ema`, the decay d above), evaluated in place of the parameters
      (`for_evaluation`) with the model's other collections as trained.
  """

  step: jax.Array
  params: Any
  model_state: Any
  opt_state: Any
  ema_params: Any = None

  @property
  def variables(self) -> Variables:
    """The model's variables: `{"params": ..., **model_state}`."""
    return {"params": self.params, **self.model_state}


def init_state(
  model: nn.Module,
  tx: optax.GradientTransformation,
  input_shape: Sequence[int],
  key: PRNGKey,
  *,
  ema: bool = False,
) -> TrainState:
  """A fresh TrainState for `model` on inputs of shape [1, *input_shape].

  Args:
    model: the Flax model.
    tx: the optimizer.
    input_shape: one example's shape.
    key: the initialisation key.
    ema: keep a moving average of the parameters, starting at them.

  Returns:
    The step-0 state.
  """
  variables = model.init(key, jnp.zeros((1, *input_shape), jnp.float32))
  params = variables.pop("params")
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    model_state=dict(variables),
    opt_state=tx.init(params),
    ema_params=jax.tree.map(jnp.copy, params) if ema else None,
  )


def check_ema(decay: float) -> float:
  """The EMA decay of config `ema`, checked: 0 (off) or in (0, 1).

  Args:
    decay: the decay d.

  Returns:
    `decay`.
  """
  return checks.in_interval("ema", decay, 0.0, 1.0, closed=(True, False))


def for_evaluation(state: Any) -> Any:
  """The state a run is evaluated with: its parameters, or their EMA when kept.

  Args:
    state: a TrainState, or any state with `variables` (one without
      `ema_params`, such as a PyTorch checkpoint's, is returned as it is).

  Returns:
    The state with `params` replaced by `ema_params` when those are kept.
  """
  if getattr(state, "ema_params", None) is None:
    return state
  return state.replace(params=state.ema_params)


def _init_fn(
  resolved: Mapping[str, Any], model: nn.Module, tx: optax.GradientTransformation
) -> Callable[[PRNGKey], TrainState]:
  shape = resolved["dataset"]["input_shape"]
  ema = bool(resolved.get("ema", 0.0))
  return lambda key: init_state(model, tx, shape, key, ema=ema)


def initial_state(
  resolved: Mapping[str, Any],
  model: nn.Module,
  tx: optax.GradientTransformation,
  mesh: jax.sharding.Mesh,
) -> TrainState:
  """The step-0 TrainState of a run, replicated over `mesh`.

  Its random draws use JAX's original (non-partitionable) threefry whatever
  the `jax_threefry_partitionable` setting: the state is computed whole on
  every device (see docs/training.md for what this saves).

  Args:
    resolved: the run's resolved config (`config.resolve`).
    model: the run's model.
    tx: the run's optimizer.
    mesh: the devices.

  Returns:
    The state, from the key `fold_in(key(seed), 0)`.
  """
  key = jax.random.fold_in(jax.random.key(resolved["seed"]), 0)
  init = jax.jit(_init_fn(resolved, model, tx), out_shardings=parallel.replicated(mesh))
  with jax.threefry_partitionable(False):
    return init(key)


def abstract_state(
  resolved: Mapping[str, Any],
  model: nn.Module,
  tx: optax.GradientTransformation,
  mesh: jax.sharding.Mesh,
) -> Any:
  """The TrainState's structure, shapes and dtypes, replicated over `mesh`.

  Found without running the model: the target a checkpoint is restored into.

  Args:
    resolved: the run's resolved config.
    model: the run's model.
    tx: the run's optimizer.
    mesh: the devices.

  Returns:
    A TrainState of `jax.ShapeDtypeStruct`s.
  """
  shapes = jax.eval_shape(_init_fn(resolved, model, tx), jax.random.key(0))
  sharding = parallel.replicated(mesh)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)
