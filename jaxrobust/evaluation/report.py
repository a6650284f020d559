"""Evaluation reports as text and pictures: markdown tables, sanity checks, plots."""

from pathlib import Path
from typing import Any


def format_table(rep: dict[str, Any]) -> str:
  """A markdown table of an evaluation's report.

  Args:
    rep: a report of `evaluation.evaluate` (`evaluation.summary.report`).

  Returns:
    The table: clean accuracy, each attack's robust accuracy (and each
    stage's, for a staged attack), the worst case, the time each took, and
    the adversarial examples each found outside its ball (not counted; 0
    for a correct attack).
  """
  individual = rep.get("mode") == "individual"
  what = "robust accuracy" if individual else "robust accuracy after it"
  lines = [
    f"| attack | norm | eps | settings | {what} | attacked | seconds | median L2 of successes "
    "| outside ball |",
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    f"| clean | | | | {100 * rep['clean_accuracy']:.2f} % | | | | |",
  ]
  for r in rep["results"]:
    settings = ", ".join(
      f"{k}={v}" for k, v in {"name": r["name"], **r["settings"]}.items() if k != "attacks"
    )
    eps = "" if r["eps"] is None else f"{r['eps']:.4g}"
    l2 = "" if r["median_l2"] is None else f"{r['median_l2']:.4f}"
    lines.append(
      f"| {r['attack']} | {r['norm'] or ''} | {eps} | {settings} | "
      f"{100 * r['accuracy']:.2f} % | {r['attacked']} | {r['seconds']:.1f} | {l2} | "
      f"{r['outside_ball']} |"
    )
    if len(r["stages"]) > 1:
      for s in r["stages"]:
        lines.append(
          f"| - {s['stage']} | | | | {100 * s['accuracy']:.2f} % | "
          f"{s['attacked']} | {s['seconds']:.1f} | | |"
        )
  if rep["results"]:
    lines.append(
      f"| worst case | | | every threat model | "
      f"{100 * rep['worst_case_accuracy']:.2f} % | | "
      f"{rep.get('seconds', 0):.1f} | | |"
    )
  lines.append(
    f"\n{rep['n_examples']} examples; "
    + (
      "each attack on every clean-correct example"
      if individual
      else "each attack on the examples the attacks of its threat model before it left robust"
    )
  )
  return "\n".join(lines)


def format_sanity(results: list[dict[str, Any]]) -> str:
  """The sanity checks as text, with a warning naming gradient masking on failure.

  Args:
    results: the checks of `evaluation.sanity`, each `{"check", "passed", "detail"}`.

  Returns:
    One line a check, and the warning if any failed.
  """
  lines = ["Sanity checks:"]
  for r in results:
    lines.append(f"  [{'ok' if r['passed'] else 'FAILED'}] {r['check']} ({r['detail']})")
  if not all(r["passed"] for r in results):
    lines.append(
      "WARNING: a sanity check failed. Gradient masking (obfuscated or "
      "noisy gradients) is a likely cause: the reported robustness may be "
      "overestimated. Try AutoAttack, more steps or restarts, or transfer attacks."
    )
  return "\n".join(lines)


def format_lipschitz(certificate: dict[str, Any], what: str) -> str:
  """A Lipschitz certificate as text: the bound and a table of certified accuracy.

  Args:
    certificate: `certificates.lipschitz_certificate`'s result.
    what: what it certifies ("the model", ...).

  Returns:
    The bound, the median certified radius, and a markdown table.

  References:
    Tsuzuku, Sato and Sugiyama, "Lipschitz-Margin Training", NeurIPS 2018.
  """
  lines = [
    f"Lipschitz certificate of {what} (Tsuzuku et al. 2018): L <= "
    f"{certificate['lipschitz_bound']:.4g}, median certified L2 radius "
    f"{certificate['median_radius']:.4g}",
    "",
    "| L2 radius | certified accuracy |",
    "| --- | --- |",
  ]
  lines += [f"| {c['radius']:g} | {100 * c['accuracy']:.2f} % |" for c in certificate["certified"]]
  return "\n".join(lines)


def plot_sweep(curves: dict[str, list[tuple[float, float]]], path: str | Path) -> None:
  """Writes a PNG of accuracy against eps, one line per attack.

  Args:
    curves: `{label: [(eps, accuracy in [0, 1])]}` (`sanity.eps_curve`).
    path: the PNG file.
  """
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  fig = Figure(figsize=(6, 4))
  ax = fig.add_subplot()
  for label, curve in curves.items():
    eps, acc = zip(*curve)
    ax.plot(eps, [100 * a for a in acc], marker="o", label=label)
  ax.set_xlabel("eps")
  ax.set_ylabel("accuracy (%)")
  ax.set_ylim(0, 100)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
