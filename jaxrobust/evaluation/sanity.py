"""Checks that flag an evaluation a reviewer should not trust.

Carlini et al. 2019 ("On evaluating adversarial robustness") and AutoAttack's
own checks (Croce & Hein 2020): results that gradient masking, randomness or
a wrong model interface typically produce. Each check is a dict
`{"check", "passed", "detail"}`; `report.format_sanity` prints them with a
warning when one fails.
"""

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrobust import attacks as attacks_lib
from jaxrobust.attacks.apgd import zero_gradient_fraction
from jaxrobust.types import ApplyFn, Images, Labels, Variables

Spec = dict[str, Any]  # an attack spec, as `attacks.create` takes it
Report = dict[str, Any]  # an evaluation's report
Check = dict[str, Any]  # {"check", "passed", "detail"}

# The checks' budget: examples, and the "large" eps per norm, at which an
# attack that follows gradients must fool almost any undefended model
# (L-inf 0.5 reaches a grey image from any image; L2 0.5 sqrt(d) too).
SANITY_EXAMPLES = 200
LARGE_LINF_EPS = 0.5
NEAR_ZERO = 0.1
# AutoAttack's threshold: Square (no gradients) may break at most this
# fraction of the examples the gradient-based stages left robust.
SQUARE_MARGIN = 0.002


def scaled(spec: Spec, factor: float) -> Spec:
  """The attack spec with its eps (and step size, if set) multiplied by `factor`."""
  spec = dict(spec)
  spec["eps"] = spec["eps"] * factor
  if spec.get("step_size") is not None:
    spec["step_size"] = spec["step_size"] * factor
  return spec


def large_eps(norm: str, input_shape: Sequence[int]) -> float:
  """An eps at which any image can be moved to a grey one (so gradient-based
  attacks should fool an undefended model): 0.5 in L-inf, 0.5 sqrt(d) in
  L2, 0.5 d in L1."""
  if norm == "l2":
    return LARGE_LINF_EPS * math.sqrt(math.prod(input_shape))
  if norm == "l1":
    return LARGE_LINF_EPS * math.prod(input_shape)
  return LARGE_LINF_EPS


def threat_norm(spec: Spec) -> str | None:
  """The norm of attack `spec`'s threat model, as its `Attack` says (C&W-L2's
  is L2 without a `norm` setting); None for an attack without one."""
  return attacks_lib.create(spec).norm or spec.get("norm")


def eps_curve(
  evaluate_specs: Callable[..., Report], spec: Spec, eps_values: Sequence[float]
) -> list[tuple[float, float]]:
  """Accuracy of attack `spec` at each eps in `eps_values`: [(eps, accuracy)],
  every eps run on all clean-correct examples (`evaluate_specs(specs,
  individual=True) -> report` runs the evaluation)."""
  specs = {f"eps={e:g}": scaled(spec, e / spec["eps"]) for e in eps_values}
  rep = evaluate_specs(specs, individual=True)
  return [(e, r["accuracy"]) for e, r in zip(eps_values, rep["results"])]


def attack_checks(
  rep: Report,
  evaluate_specs: Callable[..., Report] | None,
  specs: Mapping[str, Spec],
  input_shape: Sequence[int],
  *,
  certified: bool = False,
) -> list[Check]:
  """Checks of a report's attacks: [{"check", "passed", "detail"}].

  1. No attack's robust accuracy exceeds the clean accuracy, and no
     adversarial example was found outside its ball.
  2. Accuracy does not rise with eps: at eps / 2 it is at least that at eps
     (up to one example in a hundred for the attacks' randomness).
  3. At a large eps (`large_eps`) accuracy is near 0 (<= 10 %), unless the
     model has a certified defence (`certified`: its Lipschitz bound or
     smoothing guarantees robustness that no attack can break).
  4. Square, which uses no gradients, breaks at most 0.2 % of the examples
     the gradient-based stages before it left robust (AutoAttack's check for
     gradient masking).
  `evaluate_specs(specs, individual=True) -> report` runs an evaluation (on a
  subset) for checks 2 and 3.
  """
  results = []
  clean = rep["clean_accuracy"]
  for row in rep["results"]:
    results.append(
      {
        "check": f"{row['attack']}: accuracy <= clean accuracy",
        "passed": row["accuracy"] <= clean,
        "detail": f"{row['accuracy']:.4f} vs clean {clean:.4f}",
      }
    )
    if row["outside_ball"]:
      results.append(
        {
          "check": f"{row['attack']}: adversarial examples lie in the ball",
          "passed": False,
          "detail": f"{row['outside_ball']} outside it (not counted): a bug in the attack",
        }
      )
    results += _square_checks(row)
  swept = {l: s for l, s in specs.items() if s.get("eps") is not None}
  if not swept:
    return results
  assert evaluate_specs is not None, "checks 2 and 3 need evaluate_specs"
  norms = {l: n for l, s in swept.items() if (n := threat_norm(s)) is not None}
  check_specs = {}
  for label, spec in swept.items():
    check_specs[f"{label}@half"] = scaled(spec, 0.5)
    check_specs[f"{label}@full"] = spec
    if label in norms:
      large = large_eps(norms[label], input_shape)
      check_specs[f"{label}@large"] = scaled(spec, large / spec["eps"])
  by_label = {r["attack"]: r for r in evaluate_specs(check_specs)["results"]}
  for label, spec in swept.items():
    half, full = (by_label[f"{label}@{k}"]["accuracy"] for k in ("half", "full"))
    results.append(
      {
        "check": f"{label}: accuracy does not rise with eps",
        "passed": full <= half + 0.01,
        "detail": f"eps {spec['eps'] / 2:g}: {half:.4f}, eps {spec['eps']:g}: {full:.4f}",
      }
    )
    if not certified and label in norms:
      eps = large_eps(norms[label], input_shape)
      large = by_label[f"{label}@large"]["accuracy"]
      results.append(
        {
          "check": f"{label}: accuracy near 0 at a large eps",
          "passed": large <= NEAR_ZERO,
          "detail": f"eps {eps:g}: {large:.4f} (expected <= {NEAR_ZERO})",
        }
      )
  return results


def _square_checks(row):
  """Check 4 for a staged row whose first gradient-free stage follows gradient ones."""
  stages = row["stages"]
  if len(stages) < 2:
    return []
  uses_gradients = [s["uses_gradients"] for s in stages]
  j = uses_gradients.index(False) if False in uses_gradients else 0
  if j == 0:
    return []
  before, stage = stages[j - 1]["accuracy"], stages[j]
  return [
    {
      "check": f"{row['attack']}: {stage['stage']} (no gradients) breaks "
      "almost nothing the gradient attacks missed",
      "passed": before - stage["accuracy"] <= SQUARE_MARGIN,
      "detail": f"robust accuracy {before:.4f} before it, {stage['accuracy']:.4f} after",
    }
  ]


# AutoAttack's randomized-defence check: draws of the model, and the largest
# difference of their L2-normalised logits that still counts as the same.
RANDOMIZED_DRAWS = 5
RANDOMIZED_TOLERANCE = 1e-4


def model_checks(
  apply_fn: ApplyFn,
  variables: Variables,
  x: Images,
  y: Labels,
  *,
  stochastic_apply_fn: Callable | None = None,
) -> list[Check]:
  """AutoAttack's checks of the model itself, on a batch of clean examples.

  1. Deterministic: `RANDOMIZED_DRAWS` forward passes (of the randomized
     model `stochastic_apply_fn(variables, x, key)`, each with its own key,
     when there is one) classify alike and their L2-normalised logits
     differ by at most `RANDOMIZED_TOLERANCE`, as AutoAttack checks; a
     randomized defence needs `version="rand"`, an evaluation through its
     draws.
  2. Logits, not probabilities: rows in [0, 1] summing to 1 make the
     cross-entropy of the attacks vanish (flagged).
  3. Gradients: no example has a zero or non-finite gradient of the
     cross-entropy with respect to the input (zero gradients stall every
     gradient attack: masking).
  4. With 3 classes or more, no correctly classified example (APGD attacks
     those) has a zero gradient of the DLR loss (and with 4 or more, of
     APGD-T's targeted DLR loss towards its first target), as AutoAttack
     checks at every APGD-DLR and APGD-T start.
  """
  x, y = jnp.asarray(x), jnp.asarray(y)
  logits_fn = jax.jit(lambda v, xb: apply_fn(v, xb))
  first = np.asarray(logits_fn(variables, x))
  drift, disagree = _randomness(logits_fn, stochastic_apply_fn, variables, x, y)
  probabilities = bool(
    first.min() > -1e-5 and first.max() < 1 + 1e-5 and np.all(np.abs(first.sum(-1) - 1) < 1e-5)
  )
  grad = jax.jit(
    jax.grad(
      lambda xb, v: optax.softmax_cross_entropy_with_integer_labels(apply_fn(v, xb), y).sum()
    )
  )(x, variables)
  grad = np.asarray(grad).reshape(len(x), -1)
  zero = int(np.sum(np.abs(grad).sum(-1) == 0))
  bad = int(np.sum(~np.isfinite(grad).all(-1)))
  return _dlr_checks(apply_fn, variables, x, y, first) + [
    {
      "check": f"model: {RANDOMIZED_DRAWS} clean passes agree (not a randomized defence)",
      "passed": drift <= RANDOMIZED_TOLERANCE and not disagree,
      "detail": f"largest relative difference {drift:.2g}"
      + ("; the passes classify differently" if disagree else "")
      + ("; use --version rand" if drift > RANDOMIZED_TOLERANCE or disagree else ""),
    },
    {
      "check": "model: outputs are logits, not probabilities",
      "passed": not probabilities,
      "detail": "rows sum to 1 in [0, 1]" if probabilities else "not a distribution",
    },
    {
      "check": "model: input gradients are nonzero and finite",
      "passed": zero == 0 and bad == 0,
      "detail": f"{zero} zero and {bad} non-finite of {len(x)}",
    },
  ]


def _dlr_checks(apply_fn, variables, x, y, logits):
  """Check 4 on the correctly classified examples (those APGD attacks): the
  DLR losses' input gradients are nonzero at x."""
  correct = np.argmax(logits, -1) == np.asarray(y)
  x, y = x[correct], y[correct]
  logits_fn = lambda xb: apply_fn(variables, xb)
  results = []
  for loss, name, needs in (("dlr", "DLR", 3), ("dlr_t", "targeted DLR", 4)):
    if logits.shape[-1] >= needs and len(x):
      zero = round(float(zero_gradient_fraction(logits_fn, x, y, loss=loss)) * len(x))
      results.append(
        {
          "check": f"model: {name} input gradients are nonzero",
          "passed": zero == 0,
          "detail": f"{zero} zero of {len(x)} correctly classified",
        }
      )
  return results


def _randomness(logits_fn, stochastic_apply_fn, variables, x, y):
  """The largest L2 distance between two passes' L2-normalised logits, and
  whether the passes' numbers of correct examples differ."""
  if stochastic_apply_fn is None:
    passes = [np.asarray(logits_fn(variables, x)) for _ in range(RANDOMIZED_DRAWS)]
  else:
    draw = jax.jit(stochastic_apply_fn)
    passes = [np.asarray(draw(variables, x, jax.random.key(k))) for k in range(RANDOMIZED_DRAWS)]
  unit = [p / (np.linalg.norm(p, axis=1, keepdims=True) + 1e-10) for p in passes]
  drift = max(
    float(np.max(np.linalg.norm(a - b, axis=1))) for i, a in enumerate(unit) for b in unit[i + 1 :]
  )
  correct = {int(np.sum(np.argmax(p, -1) == np.asarray(y))) for p in passes}
  return drift, len(correct) > 1


def lipschitz_checks(rep: Report, certificate: Any) -> list[Check]:
  """No L2 attack may do better than a Lipschitz certificate allows: its
  accuracy at eps is at least the certified accuracy at eps."""
  certified = {c["radius"]: c["accuracy"] for c in certificate["certified"]}
  return [
    {
      "check": f"{row['attack']}: accuracy >= Lipschitz-certified accuracy",
      "passed": row["accuracy"] >= certified[row["eps"]],
      "detail": f"eps {row['eps']:g}: {row['accuracy']:.4f} vs certified "
      f"{certified[row['eps']]:.4f}",
    }
    for row in rep["results"]
    if row["norm"] == "l2" and row["eps"] in certified
  ]
