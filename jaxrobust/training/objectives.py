"""Training objectives: how a batch becomes the inputs a training step learns from.

An objective is an `Objective`, called as `objective(logits_fn, x, y, keys) ->
x_train` inside the training step, where `logits_fn` is the model in
inference mode and `keys` holds one PRNG key per example. Each is selected by
name in a config (`objective`), with its attack in `train_attack` (an attack
spec as `attacks.create` takes it, nested for the combinators):

| objective    | training inputs                                         | config          |
| ------------ | ------------------------------------------------------- | --------------- |
| `natural`    | the clean images                                         | natural.py      |
| `pgd_at`     | `train_attack` (PGD, Madry et al. 2018) on the model     | pgd_at.py       |
| `cw_pgd_mix` | a `mixture` of C&W-L2 and PGD-Linf examples, 50 % each   | cw_pgd_mix.py   |
| `gaussian`   | x + d, d ~ N(0, sigma^2 I) (Cohen et al. 2019)           | gaussian.py     |
| `rat`        | the attack on the randomized model f~(x) = f(x + d), EOT | rat.py          |
| `mat_rand`   | PGD-L2 or PGD-Linf, drawn uniformly (`random_choice`)    | mat_rand.py     |
| `mat_max`    | per example the larger-loss of the two (`max_loss`)      | mat_max.py      |
| `trades`     | x' maximising KL(f(x) || f(x')); loss CE + beta KL       | trades.py       |
| `mart`       | PGD-CE x'; loss BCE(x') + lambda (1 - p_y(x)) KL         | mart.py         |
| `fast_at`    | FGSM with random start, step 1.25 eps (Wong et al. 2020) | fast_at.py      |

(`adversarial` is another name of `pgd_at`.) MAT-Rand and MAT-Max are the
mixed adversarial training of Araujo et al. 2019 over p in {2, inf}.

Most objectives train on the cross-entropy of the training inputs. `trades`
and `mart` have a loss of their own (`Objective.loss`), of the clean and the
adversarial logits together; their weights come from `objective_settings`
(`beta` for TRADES, `lam` for MART), checked >= 0. `fast_at` trains on the
cross-entropy of its FGSM examples; its cyclic learning rate and its guard
against catastrophic overfitting are settings of the run (config `fast_at`).

Noise belongs to the model: a model with `model.noise = dict(sigma=...)` is
the randomized classifier f~ (`models.Randomized`), and every training step
adds one fresh Gaussian draw per example to its training inputs, whatever the
objective. `gaussian` and `rat` require such a model. The objectives differ in
what their attack sees: `pgd_at` (and the other attack objectives) attack the
base classifier f, and the step then trains f on x_adv + d (PGD-AT with
noise); `rat` attacks f~ itself, its gradients averaged over `eot_samples`
draws (expectation over transformation), so the examples are adversarial for
the randomized network. RAT's EOT maximises the loss of the mean prediction,
-log (1/S) sum_s softmax(f(x' + d_s))_y (docs/training.md says why not the
mean loss).

MAT-Max trains on the inner maximum over p in {2, inf}: per example the
perturbation of larger cross-entropy (`attacks.max_loss`), whether or not
it is misclassified; `attacks.worst_case` (first misclassified in list
order) is the evaluation's rule and not used for training.
"""

import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxrobust import attacks, checks
from jaxrobust.types import Images, Labels, Logits, LogitsFn

# The combinator each mixed objective's `train_attack` must use.
_COMBINATORS = {"cw_pgd_mix": "mixture", "mat_rand": "random_choice", "mat_max": "max_loss"}
ALIASES = {"adversarial": "pgd_at"}
NAMES = (
  "natural",
  "pgd_at",
  "cw_pgd_mix",
  "gaussian",
  "rat",
  "mat_rand",
  "mat_max",
  "trades",
  "mart",
  "fast_at",
  *ALIASES,
)
# The settings (`objective_settings`) each objective takes, with their defaults.
SETTINGS = {"trades": {"beta": 6.0}, "mart": {"lam": 6.0}}


class Objective(NamedTuple):
  """A training objective.

  Attributes:
    name: its name (one of `NAMES`).
    inputs: `(logits_fn, x, y, keys) -> x_train`.
    randomized: it needs a model with noise (`models.Randomized`).
    eot_samples: 0, or the number of noise draws the attack averages over:
      the step gives `inputs` the randomized model, not the base classifier.
    loss: None (the cross-entropy of the training inputs), or
      `loss(logits_clean, logits_train, y) -> [B]`, the per-example loss of
      the model's logits on the clean and on the training inputs (both in
      training mode); the step minimises its mean.
  """

  name: str
  inputs: Callable[..., Any]
  randomized: bool = False
  eot_samples: int = 0
  loss: Callable[..., Any] | None = None

  def __call__(self, logits_fn: LogitsFn, x: Images, y: Labels, keys: jax.Array) -> Images:
    """The training inputs of the batch (x, y), example i drawn from `keys[i]`."""
    return self.inputs(logits_fn, x, y, keys)


def _clean(logits_fn, x, y, keys):
  del logits_fn, y, keys
  return x


def trades_loss(logits_clean: Logits, logits_adv: Logits, y: Labels, *, beta: float) -> jax.Array:
  """The TRADES loss (eq. 5), per example.

  .. math::
    \\mathrm{CE}(f(x), y) + \beta\\, \\mathrm{KL}(\\mathrm{softmax} f(x) \\,\\|\\,
    \\mathrm{softmax} f(x'))

  with KL(p || q) = sum_k p_k (log p_k - log q_k); the gradient flows through
  both f(x) and f(x') (as in the authors' code).

  Args:
    logits_clean: f(x).
    logits_adv: f(x').
    y: the labels.
    beta: the KL's weight (6 in the paper's CIFAR-10 results; 1/lambda in its
      notation).

  Returns:
    [B] losses.

  References:
    Zhang et al., 2019: https://arxiv.org/abs/1901.08573
  """
  log_p = jax.nn.log_softmax(logits_clean)
  kl = jnp.sum(jnp.exp(log_p) * (log_p - jax.nn.log_softmax(logits_adv)), -1)
  return optax.softmax_cross_entropy_with_integer_labels(logits_clean, y) + beta * kl


def mart_loss(logits_clean: Logits, logits_adv: Logits, y: Labels, *, lam: float) -> jax.Array:
  """The MART loss (eq. 9), per example, with p = softmax f(x), p' = softmax f(x').

  .. math::
    \\mathrm{BCE}(p', y) + \\lambda\\, \\mathrm{KL}(p \\,\\|\\, p')\\, (1 - p_y), \\quad
    \\mathrm{BCE}(p', y) = -\\log p'_y - \\log(1 - \\max_{k \ne y} p'_k)

  (the boosted cross-entropy: CE plus a margin term on the strongest wrong
  class), with the authors' code's guards against log 0: log(1.0001 - p'_k),
  log(p' + 1e-12) inside the KL, and 1.0000001 - p_y.

  Args:
    logits_clean: f(x).
    logits_adv: f(x').
    y: the labels.
    lam: the KL's weight lambda.

  Returns:
    [B] losses.

  References:
    Wang et al., 2020: https://openreview.net/forum?id=rklOg6EFwS
  """
  p_adv = jax.nn.softmax(logits_adv)
  wrong = jnp.max(jnp.where(jax.nn.one_hot(y, p_adv.shape[-1]) > 0, -1.0, p_adv), -1)
  bce = optax.softmax_cross_entropy_with_integer_labels(logits_adv, y) - jnp.log(
    1.0001 - wrong + 1e-12
  )
  p = jax.nn.softmax(logits_clean)
  kl = jnp.sum(jax.scipy.special.xlogy(p, p) - p * jnp.log(p_adv + 1e-12), -1)
  p_true = jnp.take_along_axis(p, y[:, None], -1)[:, 0]
  return bce + lam * kl * (1.0000001 - p_true)


def _trades_inputs(attack):
  """x' maximising KL(f(x) || f(x')) by `attack` (PGD with the KL loss, soft
  labels: the clean prediction, in inference mode)."""

  def inputs(logits_fn, x, y, keys):
    del y
    p = jax.nn.softmax(jax.lax.stop_gradient(logits_fn(x)))
    return attack(logits_fn, x, p, keys)

  return inputs


def _settings(name, settings):
  """`objective_settings` of `name`: its defaults, updated and checked."""
  allowed = SETTINGS.get(name, {})
  settings = dict(settings or {})
  if not allowed:
    checks.require(
      not settings, f"objective {name!r} takes no objective_settings, got {sorted(settings)}"
    )
    return {}
  checks.known_keys(f"objective_settings of {name!r}", settings, allowed)
  merged = {**allowed, **settings}
  for key, value in merged.items():
    checks.non_negative(f"objective_settings.{key}", value)
  return merged


def create(
  name: str,
  attack_cfg: Mapping[str, Any] | None = None,
  settings: Mapping[str, Any] | None = None,
) -> Objective:
  """The objective `name`.

  `trades` takes a `pgd` spec whose loss it sets to the KL divergence from the
  clean prediction (`attacks.losses.kl_divergence`); `fast_at` an `fgsm` spec.

  Args:
    name: one of `NAMES`.
    attack_cfg: its attack spec (a dict, or None).
    settings: its `objective_settings` (`beta` of trades, `lam` of mart).

  Returns:
    The `Objective`.

  Raises:
    InputError: an unknown name, a missing or wrong attack spec, a setting
      the objective does not take or a negative weight, or `eot_samples` < 1.
  """
  checks.one_of("objective", name, NAMES)
  name = ALIASES.get(name, name)
  options = _settings(name, settings)
  if name in ("natural", "gaussian"):
    return Objective(name, _clean, randomized=name == "gaussian")
  checks.require(
    attack_cfg is not None and "name" in attack_cfg,
    f"objective {name!r} needs train_attack, an attack spec with a name",
  )
  assert attack_cfg is not None
  spec = dict(attack_cfg)
  eot_samples = 0
  if name == "rat":
    eot_samples = checks.integer_at_least("train_attack.eot_samples", spec.pop("eot_samples", 4), 1)
  else:
    checks.require(
      "eot_samples" not in spec,
      f"train_attack.eot_samples is a setting of objective 'rat', not of {name!r}",
    )
  combinator = _COMBINATORS.get(name)
  checks.require(
    combinator is None or spec["name"] == combinator,
    f"objective {name!r} takes a {combinator!r} attack, got train_attack.name {spec['name']!r}",
  )
  if name == "trades":
    checks.require(
      spec["name"] == "pgd" and "loss" not in spec,
      f"objective 'trades' takes a 'pgd' attack without a loss (its loss is "
      f"the KL divergence), got {dict(attack_cfg)!r}",
    )
    attack = attacks.create(**spec, loss=attacks.losses.kl_divergence)
    return Objective(
      name, _trades_inputs(attack), loss=functools.partial(trades_loss, beta=options["beta"])
    )
  if name == "fast_at":
    checks.require(
      spec["name"] == "fgsm",
      f"objective 'fast_at' takes an 'fgsm' attack, got train_attack.name {spec['name']!r}",
    )
  attack = attacks.create(**spec)
  if name == "mart":
    return Objective(name, attack, loss=functools.partial(mart_loss, lam=options["lam"]))
  return Objective(name, attack, randomized=name == "rat", eot_samples=eot_samples)


def check_model(objective: Objective, randomized: bool) -> None:
  """Refuses an objective that needs noise for a model without noise.

  Args:
    objective: the objective.
    randomized: the model (or its config) has `noise`.

  Raises:
    InputError: `objective.randomized` and not `randomized`.
  """
  checks.require(
    not objective.randomized or randomized,
    f"objective {objective.name!r} trains a randomized model: set "
    "model.noise = dict(sigma=..., samples=...)",
  )
