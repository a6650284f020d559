"""jaxrobust: adversarial attacks, robust training and certification in JAX.

The submodules load when first used (`jr.attacks`, `jr.evaluation`, ...), so
that `import jaxrobust` is quick and the command-line launchers
(`jaxrobust.launch`) can take Ctrl-C before JAX loads.
"""

import importlib
from types import ModuleType
from typing import Any

__version__ = "0.1.0"

SUBMODULES = (
  "attacks",
  "certification",
  "checks",
  "data",
  "evaluation",
  "fastpath",
  "interop",
  "models",
  "parallel",
  "spectral",
  "training",
  "zoo",
)
# Modules used often enough to be reached from the top: `jr.inference.split`.
SHORTCUTS = {
  "inference": "models.inference",
  "report": "evaluation.report",
  "sanity": "evaluation.sanity",
  "smoothing": "certification.smoothing",
}
__all__ = [*SUBMODULES, *SHORTCUTS, "InputError"]


def __getattr__(name: str) -> ModuleType | Any:
  if name in SUBMODULES or name in SHORTCUTS:
    return importlib.import_module(f"jaxrobust.{SHORTCUTS.get(name, name)}")
  if name == "InputError":
    return importlib.import_module("jaxrobust.checks").InputError
  raise AttributeError(f"module 'jaxrobust' has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted([*globals(), *__all__])
