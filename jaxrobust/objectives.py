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

(`adversarial` is another name of `pgd_at`.) MAT-Rand and MAT-Max are the
mixed adversarial training of Araujo et al. 2019 over p in {2, inf}.

Noise belongs to the model: a model with `model.noise = dict(sigma=...)` is
the randomized classifier f~ (`models.Randomized`), and every training step
adds one fresh Gaussian draw per example to its training inputs, whatever the
objective. `gaussian` and `rat` require such a model. The objectives differ in
what their attack sees: `pgd_at` (and the other attack objectives) attack the
base classifier f, and the step then trains f on x_adv + d (PGD-AT with noise,
the seed's "PGD model with smoothing"); `rat` attacks f~ itself, its
gradients averaged over `eot_samples` draws (expectation over
transformation), so the examples are adversarial for the randomized network.

RAT's EOT maximises the loss of the mean prediction,
-log (1/S) sum_s softmax(f(x' + d_s))_y, not the mean loss
(1/S) sum_s -log softmax(f(x' + d_s))_y: the randomized classifier predicts
argmax of the mean softmax (`models.Randomized`), so this is the loss of the
classifier that is trained and evaluated, and the attack is the one the
evaluation runs (EOT on the same function). The mean of the losses would
attack the average base classifier instead; its log inside the mean lets
draws already misclassified (p_y -> 0, loss -> infinity) dominate the
gradient, spending the steps on noise draws that no longer matter. By
Jensen's inequality the loss of the mean is at most the mean loss.

MAT-Max trains on the inner maximum over p in {2, inf}: per example the
perturbation of larger cross-entropy (`attacks.max_loss`), whether or not
it is misclassified; `attacks.worst_case` (first misclassified in list
order) is the evaluation's rule and not used for training.
"""
from typing import Any, Callable, NamedTuple

from jaxrobust import attacks, checks

# The combinator each mixed objective's `train_attack` must use.
_COMBINATORS = {"cw_pgd_mix": "mixture", "mat_rand": "random_choice",
                "mat_max": "max_loss"}
ALIASES = {"adversarial": "pgd_at"}
NAMES = ("natural", "pgd_at", "cw_pgd_mix", "gaussian", "rat", "mat_rand", "mat_max",
         *ALIASES)


class Objective(NamedTuple):
  """A training objective.

  Attributes:
    name: its name (one of `NAMES`).
    inputs: `(logits_fn, x, y, keys) -> x_train`.
    randomized: it needs a model with noise (`models.Randomized`).
    eot_samples: 0, or the number of noise draws the attack averages over:
      the step gives `inputs` the randomized model, not the base classifier.
  """
  name: str
  inputs: Callable[..., Any]
  randomized: bool = False
  eot_samples: int = 0

  def __call__(self, logits_fn, x, y, keys):
    return self.inputs(logits_fn, x, y, keys)


def _clean(logits_fn, x, y, keys):
  del logits_fn, y, keys
  return x


def create(name, attack_cfg=None):
  """The objective `name` with its attack spec `attack_cfg` (a dict, or None).

  Raises InputError for an unknown name, a missing or wrong attack spec, or
  `eot_samples` < 1.
  """
  checks.one_of("objective", name, NAMES)
  name = ALIASES.get(name, name)
  if name in ("natural", "gaussian"):
    return Objective(name, _clean, randomized=name == "gaussian")
  checks.require(attack_cfg is not None and "name" in attack_cfg,
                 f"objective {name!r} needs train_attack, an attack spec with a name")
  settings = dict(attack_cfg)
  eot_samples = 0
  if name == "rat":
    eot_samples = checks.integer_at_least("train_attack.eot_samples",
                                          settings.pop("eot_samples", 4), 1)
  else:
    checks.require("eot_samples" not in settings,
                   f"train_attack.eot_samples is a setting of objective 'rat', "
                   f"not of {name!r}")
  combinator = _COMBINATORS.get(name)
  checks.require(combinator is None or settings["name"] == combinator,
                 f"objective {name!r} takes a {combinator!r} attack, got "
                 f"train_attack.name {settings['name']!r}")
  attack = attacks.create(**settings)
  return Objective(name, attack, randomized=name == "rat", eot_samples=eot_samples)


def check_model(objective, randomized):
  """Refuses an objective that needs noise for a model without noise
  (`randomized`: the model, or its config, has `noise`)."""
  checks.require(not objective.randomized or randomized,
                 f"objective {objective.name!r} trains a randomized model: set "
                 "model.noise = dict(sigma=..., samples=...)")
