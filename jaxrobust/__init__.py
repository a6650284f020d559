"""jaxrobust: adversarial attacks, robust training and certification in JAX.

The submodules load when first used (`jr.attacks`, `jr.evaluation`, ...), so
that `import jaxrobust` is quick and the command-line launchers
(`jaxrobust.launch`) can take Ctrl-C before JAX loads.
"""

import importlib

__version__ = "0.1.0"

SUBMODULES = (
  "attacks",
  "checks",
  "data",
  "evaluation",
  "inference",
  "interop",
  "models",
  "parallel",
  "report",
  "sanity",
  "smoothing",
  "spectral",
)
__all__ = [*SUBMODULES, "InputError"]


def __getattr__(name):
  if name in SUBMODULES:
    return importlib.import_module(f"jaxrobust.{name}")
  if name == "InputError":
    return importlib.import_module("jaxrobust.checks").InputError
  raise AttributeError(f"module 'jaxrobust' has no attribute {name!r}")


def __dir__():
  return sorted([*globals(), *__all__])
