"""Deterministic robustness certificates from a bound on a network's Lipschitz constant."""

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from jaxrobust import checks
from jaxrobust.certification import lipschitz
from jaxrobust.types import ApplyFn, Images, Labels, Variables


def lipschitz_certificate(
  apply_fn: ApplyFn,
  variables: Variables,
  x: Images,
  y: Labels,
  radii: Sequence[float],
  *,
  batch_size: int = 500,
) -> dict[str, Any]:
  """Certified L2 accuracy of a network from a bound on its Lipschitz constant.

  With L = `lipschitz.lipschitz_bound(apply_fn, variables, ...)` (an upper
  bound on the L2 Lipschitz constant of the logits), example i is certified
  at radius r when it is classified correctly and
  margin_i / (sqrt(2) L) > r, margin_i the top logit minus the second: no
  perturbation of L2 norm <= r changes its prediction (Tsuzuku, Sato &
  Sugiyama 2018). The guarantee is deterministic (no probability, unlike
  randomized smoothing) and holds for any attack.

  Args:
    apply_fn: `apply_fn(variables, x) -> logits`, inference mode, not jitted.
    variables: the model's variables.
    x: images in [0, 1] [N, ...].
    y: labels [N].
    radii: the L2 radii at which to report certified accuracy.
    batch_size: examples per forward pass.

  Returns:
    `{"lipschitz_bound": L, "median_radius": float (0 for misclassified
    examples), "certified": [{"radius": r, "accuracy": float}]}`.

  References:
    Tsuzuku, Sato & Sugiyama, "Lipschitz-margin training: scalable
    certification of perturbation invariance for deep neural networks",
    NeurIPS 2018.
  """
  checks.check_images(x)
  bound = lipschitz.lipschitz_bound(apply_fn, variables, x.shape[1:])
  logits_of = jax.jit(apply_fn)
  logits = np.concatenate(
    [np.asarray(logits_of(variables, x[i : i + batch_size])) for i in range(0, len(x), batch_size)]
  )
  radius = np.asarray(lipschitz.certified_radius(logits, bound, np.asarray(y)))
  return {
    "lipschitz_bound": float(bound),
    "median_radius": float(np.median(radius)),
    "certified": [{"radius": float(r), "accuracy": float(np.mean(radius > r))} for r in radii],
  }
