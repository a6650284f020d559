"""The experiment configs shipped with jaxrobust, by name.

`--config pgd_at` (or `pgd_at:cifar10`, a setting passed to `get_config`) names
a file of this package; any other value is a path to the user's own config
file, which may import `jaxrobust.configs.common` for the shared settings.
"""

from pathlib import Path

from jaxrobust.checks import InputError

DIRECTORY = Path(__file__).resolve().parent
NAMES = tuple(
  sorted(p.stem for p in DIRECTORY.glob("*.py") if p.stem not in ("__init__", "common"))
)


def resolve(value: str) -> str:
  """The file of config `value` (a packaged name or a path), its `:setting` kept."""
  file, colon, setting = value.partition(":")
  if file in NAMES:
    return f"{DIRECTORY / file}.py{colon}{setting}"
  if not file.endswith(".py") and "/" not in file and not Path(file).exists():
    raise InputError(
      f"unknown config {file!r}; the packaged configs are "
      f"{', '.join(NAMES)} (or pass the path of a .py file)"
    )
  return value
