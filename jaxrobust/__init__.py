"""jaxrobust: adversarial attacks, robust training and certification in JAX."""
from jaxrobust import attacks, checks, data, interop, models, parallel, smoothing, spectral
from jaxrobust.checks import InputError

__version__ = "0.1.0"
