"""Certified robustness: guarantees that hold for every attack in a ball.

* `smoothing`: randomized smoothing (Cohen et al. 2019), a probabilistic L2
  certificate for the smoothed classifier; built on `noise` (the classes of
  noisy copies, counted on every device) and `smoothing_report` (the report
  of a run).
* `lipschitz`: an upper bound on a feed-forward network's Lipschitz constant
  and the deterministic L2 radii it certifies (Tsuzuku et al. 2018); built on
  `layer_factors` (the network's pieces whose constants multiply).
* `certificates`: the certified accuracy of a data set at given radii.
"""

from jaxrobust.certification import (
  certificates,
  layer_factors,
  lipschitz,
  noise,
  smoothing,
  smoothing_report,
)

__all__ = [
  "certificates",
  "layer_factors",
  "lipschitz",
  "noise",
  "smoothing",
  "smoothing_report",
]
