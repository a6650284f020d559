"""The jitted data-parallel train step `(state, x, y, key) -> (state, metrics)`.

The step is written for one device: it makes the training inputs (the
objective, see `jaxrobust.training.objectives`), computes the cross-entropy
gradient, averages gradients and metrics over devices with `lax.pmean`, and
applies the optax update. Every device keeps identical state and the result
equals a single-device step on the whole batch; docs/training.md says how
(BatchNorm, spectral normalisation, the random draws).

Randomness: the key of step s is `fold_in(seed_key, s)`, split into an
attack, a noise and an EOT key (and `fold_in(step key, 3)` is the
augmentation's key); example i of the global batch gets
`fold_in(attack_key, i)` for its attack and `fold_in(noise_key, i)` for its
training noise, and the EOT draws of `rat` (shared by the batch) come from
the EOT key, so the draws depend neither on the device count nor on whether
the run was resumed.

Precision: the step runs the model it is given. A model of
`models.precision.with_precision(model, precision="bfloat16")` (what
`config.build_model` gives for `precision = "bfloat16"`) computes its forward
and backward passes in bfloat16, in the attack and in the loss, while the
state (parameters, optimizer state, batch statistics), the loss and the
attack's iterates stay float32.
"""

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from jaxrobust import checks, data, fastpath, models, parallel
from jaxrobust import keys as keys_lib
from jaxrobust.training import objectives
from jaxrobust.training.optimizer import make_optimizer, make_schedule
from jaxrobust.training.state import TrainState, check_ema, for_evaluation, init_state
from jaxrobust.types import Images, Labels, LogitsFn, PRNGKey, Variables

__all__ = [
  "TrainState",
  "awp_perturbation",
  "check_awp",
  "check_divisible",
  "check_ema",
  "for_evaluation",
  "gaussian_noise",
  "global_index",
  "init_state",
  "make_input_fn",
  "make_optimizer",
  "make_schedule",
  "make_train_step",
]

Metrics = dict[str, jax.Array]
StepFn = Callable[[TrainState, Images, Labels, PRNGKey], tuple[TrainState, Metrics]]
MUTABLE = ("batch_stats", "spectral")


def make_input_fn(
  objective: str,
  attack_cfg: Mapping[str, Any] | None = None,
  model_cfg: Mapping[str, Any] | None = None,
  settings: Mapping[str, Any] | None = None,
) -> objectives.Objective:
  """How a batch becomes training inputs, `(logits_fn, x, y, keys) -> x_train`.

  Args:
    objective: one of `objectives.NAMES` ("natural", "pgd_at", ...).
    attack_cfg: its attack spec (a dict with the attack's `name` and
      settings, e.g. PGD as in Madry et al. 2018).
    model_cfg: the config's `model`; when given, an objective that needs a
      randomized model is refused unless the model has `noise`
      (`make_train_step` checks the same on the model itself).
    settings: the objective's (`objective_settings`, e.g. TRADES's beta).

  Returns:
    An `objectives.Objective`.
  """
  made = objectives.create(objective, attack_cfg, settings)
  if model_cfg is not None:
    objectives.check_model(made, bool(dict(model_cfg).get("noise")))
  return made


def gaussian_noise(keys: jax.Array, shape: tuple[int, ...], sigma: float) -> jax.Array:
  """sigma * N(0, I) of `shape` [B, ...], example i drawn from `keys[i]`.

  Args:
    keys: B keys.
    shape: the noise's shape, B first.
    sigma: the standard deviation.

  Returns:
    The noise.
  """
  return sigma * jax.vmap(lambda k: jax.random.normal(k, shape[1:]))(keys)


def global_index(local_batch: int) -> jax.Array:
  """The global indices of this device's examples in the step's batch.

  Args:
    local_batch: the examples on each device.

  Returns:
    [local_batch] int indices (inside `shard_map` over the batch axis).
  """
  return jax.lax.axis_index(parallel.BATCH_AXIS) * local_batch + jnp.arange(local_batch)


def awp_perturbation(params: Any, grads: Any, *, gamma: float) -> Any:
  """Adversarial weight perturbation, per weight array w_l.

  .. math::
    v_l = \\gamma \\, \\|w_l\\| \\, g_l / \\|g_l\\|

  with g_l the gradient of the training loss with respect to w_l (the ascent
  direction: one step of the authors' proxy optimizer, normalised), for every
  weight array with more than one axis (kernels); biases and scales are not
  perturbed (v = 0). So ||v_l|| = gamma ||w_l||: the relative size of the
  perturbation is gamma in every layer (5e-3 in the paper).

  Args:
    params: the parameters w.
    grads: the loss gradient at w.
    gamma: the relative size.

  Returns:
    v, of the structure of `params`.

  References:
    Wu et al., 2020: https://arxiv.org/abs/2004.05884
  """

  def one(w: jax.Array, g: jax.Array) -> jax.Array:
    if w.ndim <= 1:
      return jnp.zeros_like(w)
    return gamma * jnp.linalg.norm(w) * g / (jnp.linalg.norm(g) + 1e-20)

  return jax.tree.map(one, params, grads)


def check_awp(gamma: float) -> float:
  """AWP's gamma (config `awp`), checked: 0 (off) or in (0, 1).

  Args:
    gamma: the relative size of the weight perturbation.

  Returns:
    `gamma`.
  """
  return checks.in_interval("awp", gamma, 0.0, 1.0, closed=(True, False))


def _attack_logits_fn(
  model: Any,
  objective: objectives.Objective,
  variables: Variables,
  eot_key: PRNGKey,
  shape: tuple[int, ...],
) -> LogitsFn:
  """The classifier the objective's attack sees: the base classifier, or the
  randomized one averaged over `eot_samples` draws shared by the batch."""
  if models.is_randomized(model) and objective.eot_samples:
    draws = gaussian_noise(
      jax.random.split(eot_key, objective.eot_samples),
      (objective.eot_samples, 1, *shape),
      model.sigma,
    )
    return lambda xb: model.apply(variables, xb, train=False, noise=draws)
  return functools.partial(models.inference_fn(model, base=True), variables)


def _training_inputs(
  model: Any,
  objective: objectives.Objective,
  augment: Callable[[Images, jax.Array], Images] | None,
  state: TrainState,
  x: Images,
  y: Labels,
  key: PRNGKey,
) -> tuple[Images, Images, dict[str, jax.Array]]:
  """(x augmented, the objective's training inputs, the model's noise kwargs)
  of this device's examples, from the step's key (see the module's doc)."""
  step_key = jax.random.fold_in(key, state.step)
  attack_key, noise_key, eot_key = jax.random.split(step_key, 3)
  logits_fn = _attack_logits_fn(model, objective, state.variables, eot_key, x.shape[1:])
  index = global_index(x.shape[0])
  if augment is not None:
    x = augment(x, keys_lib.example_keys(jax.random.fold_in(step_key, 3), index))
  with checks.trusted():  # the data were checked on the host
    x_train = jax.lax.stop_gradient(
      objective(logits_fn, x, y, keys_lib.example_keys(attack_key, index))
    )
  apply_kwargs = {}
  if models.is_randomized(model):
    noise_keys = keys_lib.example_keys(noise_key, index)
    apply_kwargs["noise"] = gaussian_noise(noise_keys, x.shape, model.sigma)
  return x, x_train, apply_kwargs


def _loss_fn(
  model: Any,
  objective: objectives.Objective,
  state: TrainState,
  x: Images,
  x_train: Images,
  y: Labels,
  apply_kwargs: Mapping[str, Any],
) -> Callable[[Any], tuple[jax.Array, Any]]:
  """`params -> (this device's share of the loss, (loss, logits, updates))`.

  The share is the loss over the device count: the gradient with respect to
  the replicated parameters is summed over the devices by shard_map (the
  transpose of their broadcast), which makes it the global mean's."""

  def loss_fn(params: Any) -> tuple[jax.Array, Any]:
    variables = {**state.variables, "params": params}
    collections = [c for c in MUTABLE if c in variables]

    def apply(variables: Variables, inputs: Images) -> tuple[jax.Array, Any]:
      return model.apply(variables, inputs, train=True, mutable=collections, **apply_kwargs)

    if objective.loss is None:
      logits, updates = apply(variables, x_train)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    else:  # clean, then training inputs (statistics updated twice, as in PyTorch)
      clean, updates = apply(variables, x)
      logits, updates = apply({**variables, **updates}, x_train)
      loss = objective.loss(clean, logits, y).mean()
    return loss / jax.lax.axis_size(parallel.BATCH_AXIS), (loss, logits, updates)

  return loss_fn


def _awp_point(
  fast_loss: Callable[[Any], tuple[jax.Array, Any]],
  state: TrainState,
  gamma: float,
  from_step: int,
) -> Any:
  """The weights the gradient is taken at: w, or w + v with AWP (from state
  step `from_step` on, when it is > 0)."""

  def perturbed(params: Any) -> Any:  # ascend in weight space first, to w + v
    grads = jax.grad(lambda p: fast_loss(p)[0])(params)
    return jax.tree.map(jnp.add, params, awp_perturbation(params, grads, gamma=gamma))

  if gamma and from_step:
    return jax.lax.cond(state.step >= from_step, perturbed, lambda p: p, state.params)
  return perturbed(state.params) if gamma else state.params


def _updated(
  state: TrainState, tx: optax.GradientTransformation, grads: Any, updates: Any, ema: float
) -> TrainState:
  """The state after the optax update, with the model's collections averaged
  over the devices and the parameters' EMA moved."""
  param_updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, param_updates)
  ema_params = state.ema_params
  if ema and ema_params is not None:
    ema_params = jax.tree.map(lambda e, p: ema * e + (1 - ema) * p, ema_params, params)
  return state.replace(
    step=state.step + 1,
    params=params,
    ema_params=ema_params,
    model_state={**state.model_state, **jax.lax.pmean(dict(updates), parallel.BATCH_AXIS)},
    opt_state=opt_state,
  )


def make_train_step(
  model: nn.Module,
  tx: optax.GradientTransformation,
  input_fn: Callable[..., Images] | objectives.Objective,
  mesh: jax.sharding.Mesh,
  *,
  augment: Callable[[Images, jax.Array], Images] | None = None,
  ema: float = 0.0,
  awp: float = 0.0,
  awp_from_step: int = 0,
) -> StepFn:
  """The jitted, data-parallel step `(state, x, y, key) -> (state, metrics)`.

  For a randomized model (`models.Randomized`, noise sigma) the step trains
  the base classifier on x_train + d, one fresh d ~ N(0, sigma^2 I) per
  example; the objective's attack sees the base classifier or, when the
  objective has `eot_samples` (`rat`), the randomized classifier averaged
  over that many fresh draws (shared by the batch).

  Args:
    model: the Flax model.
    tx: the optimizer.
    input_fn: an `objectives.Objective`, or any `(logits_fn, x, y, keys) ->
      x_train` (such as an attack).
    mesh: the devices; `x`, `y` are the global batch, split over them.
    augment: `(x, keys) -> x` (`augment.create`): the batch is augmented on
      device first, example i with `fold_in(fold_in(step_key, 3), i)`.
    ema: the decay d > 0 of `ema <- d * ema + (1 - d) * params` (with a
      state that keeps `ema_params`); 0: off.
    awp: AWP's gamma > 0: the gradient is taken at the perturbed weights
      w + v (`awp_perturbation`) and applied to w, which costs one more
      forward and backward pass; the batch statistics are those of the
      perturbed pass. 0: off.
    awp_from_step: steps before this state step are plain steps (a warm-up).

  Returns:
    The jitted step, its state argument donated. Metrics: the mean
    cross-entropy `loss` and the `accuracy` on the training inputs.

  References:
    Wu et al., 2020 (AWP): https://arxiv.org/abs/2004.05884
  """
  check_ema(ema)
  check_awp(awp)
  checks.integer_at_least("awp_from_step", awp_from_step, 0)
  objective = (
    input_fn
    if isinstance(input_fn, objectives.Objective)
    else objectives.Objective("custom", input_fn)
  )
  objectives.check_model(objective, models.is_randomized(model))

  def device_step(
    state: TrainState, x: Images, y: Labels, key: PRNGKey
  ) -> tuple[TrainState, Metrics]:
    x = data.as_float(x)  # uint8 batches (records:) become floats on the device
    x, x_train, apply_kwargs = _training_inputs(model, objective, augment, state, x, y, key)
    # The CPU fast path (identity elsewhere), before differentiating and after.
    fast_loss = fastpath.fast(_loss_fn(model, objective, state, x, x_train, y, apply_kwargs))
    value_and_grad = fastpath.fast(jax.value_and_grad(fast_loss, has_aux=True))
    at = _awp_point(fast_loss, state, awp, awp_from_step)
    (_, (loss, logits, updates)), grads = value_and_grad(at)
    metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == y)}
    new_state = _updated(state, tx, grads, updates, ema)
    return new_state, jax.lax.pmean(metrics, parallel.BATCH_AXIS)

  batch = P(parallel.BATCH_AXIS)
  step = parallel.data_parallel(
    device_step, mesh, in_specs=(P(), batch, batch, P()), out_specs=(P(), P())
  )
  return jax.jit(step, donate_argnums=0)


def check_divisible(batch_size: int, mesh: jax.sharding.Mesh) -> None:
  """Refuses a global batch that does not split evenly over the devices.

  Args:
    batch_size: the global batch.
    mesh: the devices.

  Raises:
    InputError: naming a batch size that would split.
  """
  devices = mesh.devices.size
  checks.require(
    batch_size % devices == 0,
    f"batch_size {batch_size} is not divisible by the {devices} devices; "
    f"choose a multiple of {devices} (or set XLA_FLAGS to use fewer "
    f"host devices)",
  )
