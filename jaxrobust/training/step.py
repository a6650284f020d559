"""Data-parallel robust training: the train state, the step and the loop.

The step `(state, x, y, key) -> (state, metrics)` is written for one device:
it makes the training inputs (the objective, see `jaxrobust.training.objectives`:
clean, or adversarial from any attack run on the model in inference mode;
plus one Gaussian draw per example for a randomized model), computes the
cross-entropy gradient, averages gradients and metrics over devices with
`lax.pmean`, and applies the optax update. BatchNorm statistics are
synchronised inside the model (`axis_name`); the spectral-normalisation
state (collection "spectral") is computed from the kernels alone, so it is
the same on every device, and is averaged all the same. Every device thus
keeps identical state and the result equals a single-device step on the whole
batch. The step is mapped over all devices with `jax.shard_map` under
`jax.jit`, with the state donated.

Randomness: the key of step s is `fold_in(seed_key, s)`, split into an
attack, a noise and an EOT key (and `fold_in(step key, 3)` is the
augmentation's key); example i of the global batch gets
`fold_in(attack_key, i)` for its attack and `fold_in(noise_key, i)` for its
training noise, and the EOT draws of `rat` (shared by the batch) come from
the EOT key, so the draws depend neither on the device count nor on whether
the run was resumed.
"""

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from jaxrobust import checks, fastpath, models, parallel
from jaxrobust.training import objectives
from jaxrobust import keys as keys_lib


class TrainState(flax.struct.PyTreeNode):
  """Everything a run updates. Never mutated: every step returns a new one.

  Attributes:
    step: number of optimizer steps taken.
    params: the model's "params" collection.
    model_state: the model's other collections (e.g. "batch_stats").
    opt_state: the optax optimizer state.
    ema_params: None, or the exponential moving average of the parameters
      (config `ema`, the decay d): ema_0 = params_0 and, after every step t,
      ema_t = d * ema_{t-1} + (1 - d) * params_t. Evaluated in place of the
      parameters (`for_evaluation`), with the model's other collections
      (BatchNorm statistics) as trained.
  """

  step: jax.Array
  params: Any
  model_state: Any
  opt_state: Any
  ema_params: Any = None

  @property
  def variables(self):
    return {"params": self.params, **self.model_state}


def init_state(model, tx, input_shape, key, *, ema=False):
  """A fresh TrainState for `model` on inputs of shape [1, *input_shape]
  (with `ema`, an average of the parameters starting at them)."""
  variables = model.init(key, jnp.zeros((1, *input_shape), jnp.float32))
  params = variables.pop("params")
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    model_state=dict(variables),
    opt_state=tx.init(params),
    ema_params=jax.tree.map(jnp.copy, params) if ema else None,
  )


def check_ema(decay):
  """The EMA decay of config `ema`: 0 (off) or in (0, 1)."""
  return checks.in_interval("ema", decay, 0.0, 1.0, closed=(True, False))


def for_evaluation(state):
  """The state a run is evaluated with: its parameters, or their EMA when kept.

  A state without `ema_params` (variables loaded from elsewhere, such as a
  PyTorch checkpoint's) is evaluated as it is."""
  if getattr(state, "ema_params", None) is None:
    return state
  return state.replace(params=state.ema_params)


def make_schedule(cfg, total_steps):
  """`cfg` is a dict (or ConfigDict) of the optimizer settings.

  The learning-rate schedule: "constant", "cosine" (to 0, after linear
  warm-up over `warmup_steps`) or "piecewise" (multiply by `decay_factor` at
  each fraction of training in `decay_at`) or "cyclic" (Smith's one cycle as
  Wong et al. 2020 use it for Fast-AT: linear from 0 up to the learning rate
  at the fraction `peak_at` of training, default 2/5, then linear down to 0)."""
  lr = checks.positive("optimizer.learning_rate", cfg["learning_rate"])
  name = checks.one_of(
    "optimizer.schedule",
    cfg.get("schedule", "constant"),
    ("constant", "cosine", "piecewise", "cyclic"),
  )
  if name == "constant":
    return optax.constant_schedule(lr)
  if name == "cyclic":
    peak_at = checks.in_interval(
      "optimizer.peak_at", cfg.get("peak_at", 0.4), 0.0, 1.0, closed=(False, False)
    )
    peak = min(max(1, round(peak_at * total_steps)), max(total_steps - 1, 1))
    return optax.join_schedules(
      [
        optax.linear_schedule(0.0, lr, peak),
        optax.linear_schedule(lr, 0.0, max(total_steps - peak, 1)),
      ],
      [peak],
    )
  if name == "cosine":
    warmup = min(cfg.get("warmup_steps", 0), total_steps - 1)
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, total_steps)
  boundaries = {
    int(f * total_steps): cfg.get("decay_factor", 0.1) for f in cfg.get("decay_at", (0.5, 0.75))
  }
  return optax.piecewise_constant_schedule(lr, boundaries)


def make_optimizer(cfg, total_steps):
  """SGD with (Nesterov) momentum, or Adam, with decoupled-from-loss L2 weight decay.

  Weight decay adds `weight_decay * params` to the gradient (PyTorch's SGD
  convention) for "sgd" and "adam", and is AdamW's decoupled decay for "adamw".
  """
  schedule = make_schedule(cfg, total_steps)
  name = checks.one_of("optimizer.name", cfg["name"], ("sgd", "adam", "adamw"))
  decay = checks.non_negative("optimizer.weight_decay", cfg.get("weight_decay", 0.0))
  if name == "adamw":
    return optax.adamw(schedule, weight_decay=decay)
  base = (
    optax.sgd(schedule, momentum=cfg.get("momentum", 0.9), nesterov=cfg.get("nesterov", False))
    if name == "sgd"
    else optax.adam(schedule)
  )
  return optax.chain(optax.add_decayed_weights(decay), base) if decay else base


def make_input_fn(objective, attack_cfg=None, model_cfg=None, settings=None):
  """How a batch becomes training inputs: an `objectives.Objective`, called as
  `(logits_fn, x, y, keys) -> x_train`.

  `objective` names one of `objectives.NAMES` ("natural", "pgd_at", ...);
  `attack_cfg` is its attack spec (a dict with the attack's `name` and
  settings, e.g. PGD as in Madry et al. 2018). With `model_cfg` (the config's
  `model`), an objective that needs a randomized model is refused unless the
  model has `noise`; `make_train_step` checks the same on the model itself.
  `settings` are the objective's (`objective_settings`, e.g. TRADES's beta).
  """
  objective = objectives.create(objective, attack_cfg, settings)
  if model_cfg is not None:
    objectives.check_model(objective, bool(dict(model_cfg).get("noise")))
  return objective


def gaussian_noise(keys, shape, sigma):
  """sigma * N(0, I) of `shape` [B, ...], example i drawn from `keys[i]`."""
  return sigma * jax.vmap(lambda k: jax.random.normal(k, shape[1:]))(keys)


def global_index(local_batch):
  """The global indices of this device's examples in the step's batch."""
  return jax.lax.axis_index(parallel.BATCH_AXIS) * local_batch + jnp.arange(local_batch)


def awp_perturbation(params, grads, *, gamma):
  """Adversarial weight perturbation (Wu et al. 2020), per layer l:

    v_l = gamma * ||w_l|| * g_l / ||g_l||,

  g_l the gradient of the training loss with respect to w_l (the ascent
  direction: one step of the authors' proxy optimizer, normalised), for every
  weight array with more than one axis (kernels); biases and scales are not
  perturbed (v = 0). So ||v_l|| = gamma ||w_l||: the relative size of the
  perturbation is gamma (5e-3 in the paper) in every layer."""

  def one(w, g):
    if w.ndim <= 1:
      return jnp.zeros_like(w)
    return gamma * jnp.linalg.norm(w) * g / (jnp.linalg.norm(g) + 1e-20)

  return jax.tree.map(one, params, grads)


def check_awp(gamma):
  """AWP's gamma (config `awp`): 0 (off) or a number in (0, 1)."""
  return checks.in_interval("awp", gamma, 0.0, 1.0, closed=(True, False))


def make_train_step(model, tx, input_fn, mesh, *, augment=None, ema=0.0, awp=0.0, awp_from_step=0):
  """The jitted, data-parallel step `(state, x, y, key) -> (state, metrics)`.

  With `awp` = gamma > 0 (Wu et al. 2020), the gradient of the objective's
  loss is taken at the perturbed weights w + v (`awp_perturbation`, v from
  the loss gradient at w on the same training inputs) and applied to w: the
  perturbation is removed before the update, which costs one more forward
  and backward pass. The batch statistics are those of the perturbed pass.
  With `awp_from_step` = S > 0, the steps before state step S are plain
  steps (a warm-up; they skip the extra pass).

  With `ema` = d > 0 (and a state with `ema_params`), the step also updates
  ema <- d * ema + (1 - d) * params with the new parameters.

  With `augment` (`augment.create`: `(x, keys) -> x`), the batch is first
  augmented on device, example i with `fold_in(fold_in(step_key, 3), i)` (i
  its global index), and everything after sees the augmented images.

  `input_fn` is an `objectives.Objective` or any `(logits_fn, x, y, keys) ->
  x_train` (such as an attack). `x`, `y` are the global batch, split over
  `mesh`; `key` is the run's key. Metrics: mean cross-entropy `loss` and
  `accuracy` on the training inputs.

  For a randomized model (`models.Randomized`, noise sigma), the step trains
  the base classifier on x_train + d, one fresh draw d ~ N(0, sigma^2 I) per
  example; the attack of the objective sees the base classifier, or, when the
  objective has `eot_samples` (`rat`), the randomized classifier averaged
  over that many fresh draws (shared by the batch).
  """
  check_ema(ema)
  check_awp(awp)
  checks.integer_at_least("awp_from_step", awp_from_step, 0)
  objective = (
    input_fn
    if isinstance(input_fn, objectives.Objective)
    else objectives.Objective("custom", input_fn)
  )
  randomized = models.is_randomized(model)
  objectives.check_model(objective, randomized)
  mutable = ["batch_stats", "spectral"]

  def attack_logits_fn(variables, eot_key, shape):
    if randomized and objective.eot_samples:
      draws = gaussian_noise(
        jax.random.split(eot_key, objective.eot_samples),
        (objective.eot_samples, 1, *shape),
        model.sigma,
      )
      return lambda xb: model.apply(variables, xb, train=False, noise=draws)
    return functools.partial(models.inference_fn(model, base=True), variables)

  def device_step(state, x, y, key):
    step_key = jax.random.fold_in(key, state.step)
    attack_key, noise_key, eot_key = jax.random.split(step_key, 3)
    logits_fn = attack_logits_fn(state.variables, eot_key, x.shape[1:])
    index = global_index(x.shape[0])
    if augment is not None:
      x = augment(x, keys_lib.example_keys(jax.random.fold_in(step_key, 3), index))
    with checks.trusted():  # the data were checked on the host
      x_train = jax.lax.stop_gradient(
        objective(logits_fn, x, y, keys_lib.example_keys(attack_key, index))
      )
    apply_kwargs = {}
    if randomized:
      apply_kwargs["noise"] = gaussian_noise(
        keys_lib.example_keys(noise_key, index), x.shape, model.sigma
      )

    def loss_fn(params):
      variables = {**state.variables, "params": params}
      collections = [c for c in mutable if c in variables]
      if objective.loss is None:
        logits, updates = model.apply(
          variables, x_train, train=True, **apply_kwargs, mutable=collections
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      else:  # clean, then training inputs (statistics updated twice, as in PyTorch)
        clean, updates = model.apply(variables, x, train=True, **apply_kwargs, mutable=collections)
        logits, updates = model.apply(
          {**variables, **updates}, x_train, train=True, **apply_kwargs, mutable=collections
        )
        loss = objective.loss(clean, logits, y).mean()
      # This device's share of the global mean: the gradient with respect to
      # the replicated parameters is summed over the devices by shard_map
      # (the transpose of their broadcast), which makes it the global mean's.
      return loss / jax.lax.axis_size(parallel.BATCH_AXIS), (loss, logits, updates)

    # The CPU fast path (identity elsewhere), before differentiating and after:
    # XLA:CPU's fast forms of the model's pooling and convolutions and of their
    # gradients (a small-channel convolution's kernel gradient: one matmul).
    fast_loss = fastpath.fast(loss_fn)
    value_and_grad = fastpath.fast(jax.value_and_grad(fast_loss, has_aux=True))

    def perturbed(params):  # AWP: ascend in weight space first, to w + v
      grads = jax.grad(lambda p: fast_loss(p)[0])(params)
      return jax.tree.map(jnp.add, params, awp_perturbation(params, grads, gamma=awp))

    at = state.params
    if awp and awp_from_step:
      at = jax.lax.cond(state.step >= awp_from_step, perturbed, lambda p: p, at)
    elif awp:
      at = perturbed(at)
    (_, (loss, logits, updates)), grads = value_and_grad(at)
    param_updates, opt_state = tx.update(grads, state.opt_state, state.params)
    metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == y)}
    params = optax.apply_updates(state.params, param_updates)
    ema_params = state.ema_params
    if ema and ema_params is not None:
      ema_params = jax.tree.map(lambda e, p: ema * e + (1 - ema) * p, ema_params, params)
    new_state = state.replace(
      step=state.step + 1,
      params=params,
      ema_params=ema_params,
      model_state={**state.model_state, **jax.lax.pmean(dict(updates), parallel.BATCH_AXIS)},
      opt_state=opt_state,
    )
    return new_state, jax.lax.pmean(metrics, parallel.BATCH_AXIS)

  batch = P(parallel.BATCH_AXIS)
  step = parallel.data_parallel(
    device_step, mesh, in_specs=(P(), batch, batch, P()), out_specs=(P(), P())
  )
  return jax.jit(step, donate_argnums=0)


def check_divisible(batch_size, mesh):
  """Training refuses a global batch that does not split evenly over the devices."""
  devices = mesh.devices.size
  checks.require(
    batch_size % devices == 0,
    f"batch_size {batch_size} is not divisible by the {devices} devices; "
    f"choose a multiple of {devices} (or set XLA_FLAGS to use fewer "
    f"host devices)",
  )
