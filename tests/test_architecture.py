"""The layering the README's architecture section promises, read from the imports."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "jaxrobust"
# Attacks are pure functions of a logits function: they never see how the model
# was built, where the data came from, or how it is trained.
ATTACKS_MAY_NOT_IMPORT = {
  "models",
  "data",
  "training",
  "objectives",
  "experiment",
  "config",
  "configs",
  "checkpoints",
  "evaluation",
  "programs",
  "cli",
}


def _jaxrobust_imports(path):
  """The first-level jaxrobust modules that the file at `path` imports."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jaxrobust"):
      parts = node.module.split(".")
      found.update([parts[1]] if len(parts) > 1 else [a.name for a in node.names])
    elif isinstance(node, ast.Import):
      found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("jaxrobust."))
  return found


@pytest.mark.parametrize("path", sorted((PACKAGE / "attacks").glob("*.py")), ids=lambda p: p.name)
def test_attacks_import_no_model_data_or_training(path):
  assert not _jaxrobust_imports(path) & ATTACKS_MAY_NOT_IMPORT


def test_the_import_reader_sees_imports():
  # The check above would pass vacuously if the reader found nothing.
  assert {"data", "models", "training"} <= _jaxrobust_imports(PACKAGE / "config.py")
