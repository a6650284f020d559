"""`python -m jaxrobust.data`: the `jaxrobust-data` command line (`jaxrobust.data.cli`)."""

from jaxrobust.data.cli import main

if __name__ == "__main__":
  raise SystemExit(main())
