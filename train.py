"""Trains a model from a config file, resuming from its workdir's newest checkpoint.

  python train.py                                  # configs/pgd_at.py on digits
  python train.py --config configs/natural.py --workdir runs/natural
  python train.py --config configs/pgd_at.py --config.epochs=5 --config.batch_size=128

At the end it prints the test accuracy, clean and under the config's attacks.
"""
from pathlib import Path

from jaxrobust import parallel

parallel.use_host_devices()  # before JAX starts: one XLA:CPU device per core

from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags

from jaxrobust import cli, evaluation, experiment

ROOT = Path(__file__).resolve().parent
_CONFIG = cli.define_config_flag(str(ROOT / "configs" / "pgd_at.py"))
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Run directory (default: runs/<config file name>).")
_PROGRESS = flags.DEFINE_boolean("progress", True, "Show a progress bar.")


def main(argv):
  cli.parse_flags(argv)
  config = cli.config_value(_CONFIG)
  name = Path(config_flags.get_config_filename(flags.FLAGS["config"])).stem
  workdir = _WORKDIR.value or str(Path("runs") / name)
  experiment.train(config, workdir, progress=_PROGRESS.value)
  resolved, model, state = experiment.restore(workdir)
  report = experiment.evaluate(resolved, model, state, limit=config.eval.limit)
  print(f"\n{workdir}: step {int(state.step)}, test accuracy\n")
  print(evaluation.format_table(report))


if __name__ == "__main__":
  cli.run(main)
