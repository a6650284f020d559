"""Certified robustness: guarantees that hold for every attack in a ball.

* `smoothing`: randomized smoothing (Cohen et al. 2019), a probabilistic L2
  certificate for the smoothed classifier.
* `lipschitz`: an upper bound on a feed-forward network's Lipschitz constant
  and the deterministic L2 radii it certifies (Tsuzuku et al. 2018).
* `certificates`: the certified accuracy of a data set at given radii.
"""

from jaxrobust.certification import certificates, lipschitz, smoothing

__all__ = ["certificates", "lipschitz", "smoothing"]
