"""What a randomized-smoothing `certify` run certified: accuracy at radii,
a JSON-ready report, its markdown table and its plot."""

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from jaxtyping import ArrayLike

from jaxrobust import checks

REPORT_RADIUS_STEP = 0.25
CURVE_RADIUS_STEP = 0.01


def certified_accuracy(
  pred: ArrayLike, radius: ArrayLike, y: ArrayLike, radii: Sequence[float]
) -> list[float]:
  """Fraction of examples with pred == y and radius >= r, for each r in `radii`.

  Abstentions (pred = -1) never count as correct, so at r = 0 this is the
  accuracy of the smoothed classifier with abstentions counted as errors.

  Args:
    pred: the classes `certify` returned [B] (-1: abstained).
    radius: the certified radii [B].
    y: the true labels [B].
    radii: the radii at which to count.

  Returns:
    One fraction per radius (0.0 for an empty batch).
  """
  predicted, radii_of, labels = _check_results(pred, radius, y)
  correct = predicted == labels
  return [float(np.mean(correct & (radii_of >= r))) if labels.size else 0.0 for r in radii]


def certification_report(
  pred: ArrayLike,
  radius: ArrayLike,
  y: ArrayLike,
  *,
  sigma: float,
  n0: int,
  n: int,
  alpha: float,
  seconds: float,
  radii: Sequence[float] | None = None,
) -> dict[str, Any]:
  """A JSON-ready summary of a `certify` run against the true labels `y`.

  Args:
    pred: the classes `certify` returned [B] (-1: abstained).
    radius: the certified radii `certify` returned [B].
    y: the true labels [B].
    sigma: the noise `certify` ran with (recorded as given).
    n0: its selection draws.
    n: its estimation draws.
    alpha: its failure probability.
    seconds: wall-clock time of the run.
    radii: radii for the table; default 0, 0.25, 0.5, ..., up to the first
      multiple of 0.25 at or above the largest certified radius.

  Returns:
    dict with the settings, `num_examples`, `radii` and `certified_accuracy`
    (same length), `abstain_rate`, `max_radius`, `seconds`,
    `seconds_per_image`, and `curve`: certified accuracy on a 0.01 grid of
    radii up to the last table radius, for plotting.
  """
  predicted, radii_of, labels = _check_results(pred, radius, y)
  checks.non_negative("seconds", seconds)
  max_radius = float(radii_of.max(initial=0.0))
  top = REPORT_RADIUS_STEP * math.ceil(max_radius / REPORT_RADIUS_STEP)
  table = [float(r) for r in (_grid(top, REPORT_RADIUS_STEP) if radii is None else radii)]
  curve_radii = _grid(max([top] + table), CURVE_RADIUS_STEP)
  num_examples = int(labels.size)
  return {
    "method": "randomized smoothing CERTIFY (Cohen et al. 2019)",
    "sigma": float(sigma),
    "n0": int(n0),
    "n": int(n),
    "alpha": float(alpha),
    "num_examples": num_examples,
    "radii": table,
    "certified_accuracy": certified_accuracy(predicted, radii_of, labels, table),
    "abstain_rate": float(np.mean(predicted == -1)) if num_examples else 0.0,
    "max_radius": max_radius,
    "seconds": float(seconds),
    "seconds_per_image": float(seconds) / max(num_examples, 1),
    "curve": {
      "radius": curve_radii,
      "certified_accuracy": certified_accuracy(predicted, radii_of, labels, curve_radii),
    },
  }


def format_certification_table(report: dict[str, Any]) -> str:
  """The report as markdown: a settings line and a radius / certified accuracy table.

  Args:
    report: a `certification_report`.

  Returns:
    The markdown text, ending in a newline.
  """
  lines = [
    f"Randomized smoothing (Cohen et al. 2019): sigma = {report['sigma']:g}, "
    f"n0 = {report['n0']}, n = {report['n']}, alpha = {report['alpha']:g}; "
    f"{report['num_examples']} images, {report['seconds_per_image']:.3g} s "
    f"per image, {100 * report['abstain_rate']:.2f} % abstained.",
    "",
    "| L2 radius | certified accuracy (%) |",
    "| --- | --- |",
  ]
  for r, accuracy in zip(report["radii"], report["certified_accuracy"]):
    lines.append(f"| {r:.2f} | {100 * accuracy:.2f} |")
  return "\n".join(lines) + "\n"


def plot_certified_accuracy(report: dict[str, Any], path: str | os.PathLike[str]) -> None:
  """Saves certified accuracy against L2 radius (a step curve) as a PNG.

  Args:
    report: a `certification_report`.
    path: where to write the PNG.
  """
  # A bare Figure renders with Agg and leaves pyplot's global backend alone.
  from matplotlib.figure import Figure

  curve = report["curve"]
  figure = Figure(figsize=(5, 3.5), dpi=120)
  axes = figure.subplots()
  axes.step(curve["radius"], curve["certified_accuracy"], where="post")
  axes.set_xlabel("L2 radius")
  axes.set_ylabel("certified accuracy")
  axes.set_ylim(0.0, 1.0)
  axes.set_xlim(left=0.0)
  axes.grid(alpha=0.3)
  axes.set_title(f"sigma = {report['sigma']:g}, n = {report['n']}, alpha = {report['alpha']:g}")
  figure.tight_layout()
  figure.savefig(path, format="png")


def _grid(top: float, step: float) -> list[float]:
  """0, step, 2 step, ..., up to the first multiple of `step` at or above `top`."""
  return [round(k * step, 10) for k in range(math.ceil(top / step - 1e-9) + 1)]


def _check_results(
  pred: ArrayLike, radius: ArrayLike, y: ArrayLike
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Checks `certify` outputs against labels `y`: three arrays of one shape [B]."""
  arrays = np.asarray(pred), np.asarray(radius), np.asarray(y)
  shapes = [a.shape for a in arrays]
  checks.require(
    len(shapes[0]) == 1 and shapes[0] == shapes[1] == shapes[2],
    f"pred, radius and labels must have the same shape [batch], "
    f"got {shapes[0]}, {shapes[1]} and {shapes[2]}",
  )
  return arrays
