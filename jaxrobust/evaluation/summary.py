"""The JSON-ready summary of an evaluation, and RobustBench's shape of one row."""

from typing import Any

import numpy as np

from jaxrobust import attacks as attacks_lib
from jaxrobust.evaluation import plan
from jaxrobust.evaluation.outcome import Outcome


def report(
  clean: np.ndarray,
  outcomes: dict[str, Outcome],
  attack_fns: dict[str, attacks_lib.Attack],
  *,
  individual: bool = False,
) -> dict[str, Any]:
  """The summary of a cascade's results.

  A row's accuracy is the robust accuracy after its attack (cascade: and
  the attacks of its threat model before it); a threat model's is after all
  of its attacks; the worst case counts an example robust when it is robust
  to every threat model. `median_l2` and `max_perturbation` are over the
  successful adversarial examples (None if there are none).

  Args:
    clean: bool [N], the examples classified correctly clean.
    outcomes: `{label: Outcome}` from `Evaluator.run`.
    attack_fns: `{label: Attack}`, in order.
    individual: whether the attacks ran individually (the report's "mode").

  Returns:
    `{"n_examples", "clean_accuracy", "mode": "cascade" | "individual",
    "results": [{"attack", "name", "norm", "eps", "accuracy", "attacked",
    "seconds", "median_l2", "max_perturbation", "outside_ball", "settings",
    "stages": [{"stage", "uses_gradients", "accuracy", "attacked",
    "seconds"}]}],
    "threat_models": [{"norm", "eps", "attacks", "accuracy"}],
    "worst_case_accuracy"}`, accuracies in [0, 1].
  """
  rows = []
  groups: dict[tuple, dict[str, Any]] = {}
  for label, attack in attack_fns.items():
    o = outcomes[label]
    rows.append(_row(label, attack, o))
    group = plan.threat_model(attack)
    entry = groups.setdefault(
      group, {"norm": attack.norm, "eps": attack.eps, "attacks": [], "robust": clean.copy()}
    )
    entry["attacks"].append(label)
    entry["robust"] = entry["robust"] & o.robust
  worst = np.logical_and.reduce([clean] + [g["robust"] for g in groups.values()])
  threat_models = [
    {
      "norm": g["norm"],
      "eps": g["eps"],
      "attacks": g["attacks"],
      "accuracy": float(g["robust"].mean()),
    }
    for g in groups.values()
  ]
  return {
    "n_examples": int(len(clean)),
    "clean_accuracy": float(clean.mean()),
    "mode": "individual" if individual else "cascade",
    "results": rows,
    "threat_models": threat_models,
    "worst_case_accuracy": float(worst.mean()),
  }


def _row(label, attack, o):
  """One attack's row of the report (see `report`)."""
  fooled = o.fooled_by >= 0
  stages = attack.stages or (attack,)
  robust_after = [(o.robust | (o.fooled_by > j)).mean() for j in range(len(stages))]
  # A stage's first round ran on all it attacked; its time is its rounds'.
  first_round: dict[int, int] = {}
  seconds = np.zeros(len(stages))
  for r, (j, _, _) in enumerate(plan.rounds(attack)):
    first_round.setdefault(j, r)
    seconds[j] += o.seconds[r]
  return {
    "attack": label,
    "name": attack.name,
    "norm": attack.norm,
    "eps": attack.eps,
    "accuracy": float(o.robust.mean()),
    "attacked": int(o.attacked[0].sum()),
    "seconds": float(o.seconds.sum()),
    "median_l2": float(np.median(o.l2[fooled])) if fooled.any() else None,
    "max_perturbation": float(np.max(o.size[fooled])) if fooled.any() else None,
    "outside_ball": o.outside_ball,
    "settings": {k: v for k, v in attack.spec.items() if k not in ("name", "norm", "eps")},
    "stages": [
      {
        "stage": s.label,
        "uses_gradients": s.uses_gradients,
        "accuracy": float(a),
        "attacked": int(o.attacked[first_round[j]].sum()),
        "seconds": float(seconds[j]),
      }
      for j, (s, a) in enumerate(zip(stages, robust_after))
    ],
  }


def robustbench_report(rep: dict[str, Any], row: str) -> dict[str, Any]:
  """One row of a report in the shape RobustBench records a result.

  Args:
    rep: a report (`report`, `evaluate`).
    row: the label of the attack whose row to give.

  Returns:
    `{"clean_acc", "robust_acc" (%), "threat_model" ("Linf", "L2", "L1"),
    "eps", "n_examples", "version", "stages": {stage: robust accuracy (%)
    after it}, "seconds"}`.
  """
  r = next(r for r in rep["results"] if r["attack"] == row)
  return {
    "clean_acc": 100 * rep["clean_accuracy"],
    "robust_acc": 100 * r["accuracy"],
    "threat_model": {"linf": "Linf", "l2": "L2", "l1": "L1"}.get(r["norm"], r["norm"]),
    "eps": r["eps"],
    "n_examples": rep["n_examples"],
    "version": r["settings"].get("version", r["name"]),
    "stages": {s["stage"]: 100 * s["accuracy"] for s in r["stages"]},
    "seconds": r["seconds"],
  }
