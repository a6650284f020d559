"""Evaluates a trained run: clean accuracy and accuracy under attack.

  python eval.py --workdir runs/pgd_at
  python eval.py --workdir runs/pgd_at --attacks pgd_linf --limit 200 --out report.json

Attacks are those of the run's config (`eval.attacks`), by label.
"""
import json
from pathlib import Path

from jaxrobust import parallel

parallel.use_host_devices()  # before JAX starts: one XLA:CPU device per core

from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from jaxrobust import checkpoints, checks, cli, evaluation, experiment

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by train.py.")
_ATTACKS = flags.DEFINE_string("attacks", "all",
                               "Comma-separated attack labels of the run's config, or 'all'.")
_SPLIT = flags.DEFINE_enum("split", "test", ["train", "test"], "Data split to evaluate.")
_LIMIT = flags.DEFINE_integer("limit", 0, "Evaluate only the first N examples (0: all).")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Examples per batch (0: the config's).")
_OUT = flags.DEFINE_string("out", None, "Write the report as JSON to this file.")


def main(argv):
  cli.parse_flags(argv)
  checks.require(_WORKDIR.value, "--workdir is required")
  resolved, model, state = experiment.restore(_WORKDIR.value)
  report = experiment.evaluate(resolved, model, state, split=_SPLIT.value,
                               names=_ATTACKS.value, limit=_LIMIT.value,
                               batch_size=_BATCH.value or None)
  report.update(workdir=_WORKDIR.value, step=int(state.step), split=_SPLIT.value)
  print(evaluation.format_table(report))
  if _OUT.value:
    checkpoints.write_atomic(Path(_OUT.value), json.dumps(report, indent=2) + "\n")
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  cli.run(main)
