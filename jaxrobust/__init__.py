"""jaxrobust: adversarial attacks, robust training and certification in JAX."""

from jaxrobust import (
  attacks,
  checks,
  data,
  evaluation,
  inference,
  interop,
  models,
  parallel,
  report,
)
from jaxrobust import sanity, smoothing, spectral
from jaxrobust.checks import InputError

__version__ = "0.1.0"
