"""The layering docs/architecture.md states, read from the imports.

Every package of jaxrobust sits on one floor; a file may import from its own
package and from packages on lower floors, never from a higher floor or from
another package on its own floor. So the imports flow one way and no
package's tests need what stands above it.
"""

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "jaxrobust"
FLOORS = (
  ("types",),  # the API's types
  ("checks", "keys", "fastpath", "launch"),  # the base
  ("parallel",),  # meshes and shard_map
  ("attacks", "data", "spectral", "configs"),  # pure functions, sources, the layer
  ("models",),  # classifiers (spectral normalisation inside)
  ("interop", "certification", "evaluation"),  # what is done with a model
  ("training", "zoo"),  # learns a model; RobustBench's zoo by name
  ("cli",),  # flags, errors, exit codes
  ("programs",),  # jaxrobust-train, jaxrobust-eval
)
FLOOR = {unit: level for level, units in enumerate(FLOORS) for unit in units}
MAX_LINES = 400
MAX_FUNCTION_LINES = 80


def _unit(path):
  """The package (or top-level module) a file belongs to."""
  return path.relative_to(PACKAGE).with_suffix("").parts[0]


def _jaxrobust_imports(path):
  """The first-level jaxrobust packages or modules that the file imports."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jaxrobust"):
      parts = node.module.split(".")
      found.update([parts[1]] if len(parts) > 1 else [a.name for a in node.names])
    elif isinstance(node, ast.Import):
      found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("jaxrobust."))
  return found


FILES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


def test_every_package_has_a_floor():
  assert {_unit(p) for p in FILES} == set(FLOOR)


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_only_go_down(path):
  unit = _unit(path)
  upward = {m for m in _jaxrobust_imports(path) - {unit} if FLOOR[m] >= FLOOR[unit]}
  assert not upward, f"{path.relative_to(PACKAGE)} ({unit}) imports {sorted(upward)}"


def test_attacks_import_no_model_data_or_training():
  # Attacks are pure functions of a logits function: they never see how the
  # model was built, where the data came from, or how it is trained.
  for path in (PACKAGE / "attacks").glob("*.py"):
    assert _jaxrobust_imports(path) <= {"attacks", "checks", "keys", "fastpath", "types"}, path


def test_the_import_reader_sees_imports():
  # The checks above would pass vacuously if the reader found nothing.
  assert {"data", "models", "evaluation"} <= _jaxrobust_imports(PACKAGE / "training" / "config.py")


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_files_and_functions_are_short(path):
  text = path.read_text()
  assert len(text.splitlines()) <= MAX_LINES, f"over {MAX_LINES} lines"
  for node in ast.walk(ast.parse(text)):
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
      length = node.end_lineno - node.lineno + 1
      assert length <= MAX_FUNCTION_LINES, f"{node.name} has {length} lines"


def _unannotated(text):
  """The public functions and methods in `text` (at module level, or in a
  module-level class) with a parameter or the return value not annotated
  (self and cls aside)."""
  tree = ast.parse(text)
  defs = [*tree.body]
  for node in tree.body:
    if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
      defs += node.body
  missing = []
  for node in defs:
    if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
      continue
    if node.name.startswith("_") and node.name != "__call__":
      continue
    args = node.args
    params = [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]
    params = [a for a in params if a is not None and a.arg not in ("self", "cls")]
    if node.returns is None or any(a.annotation is None for a in params):
      missing.append(node.name)
  return missing


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_public_functions_are_annotated(path):
  missing = _unannotated(path.read_text())
  assert not missing, f"not annotated: {missing}"


def test_the_architecture_page_states_these_floors():
  page = (PACKAGE.parent / "docs" / "architecture.md").read_text()
  rows = re.findall(r"^\| (\d+) \| (.+?) \|", page, re.M)
  stated = tuple(tuple(re.findall(r"`(\w+)`", names)) for _, names in rows)
  assert stated == FLOORS
