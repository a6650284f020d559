"""Trains a model from a config, resuming from its workdir's newest checkpoint.

  jaxrobust-train                                  # config pgd_at on digits
  jaxrobust-train --config natural --workdir runs/natural
  jaxrobust-train --config pgd_at --config.epochs=5 --config.batch_size=128
  jaxrobust-train --config my_config.py            # a config file of your own

(`python train.py ...` in a clone of the repository is the same program.)

At the end it prints the test accuracy, clean and under the config's
`eval.after_training` attacks (PGD); `python eval.py --workdir ...` then
evaluates with AutoAttack.
Rerunning the same command resumes an interrupted run (kill -9 included) and
ends as an uninterrupted run would; SIGTERM or Ctrl-C saves a checkpoint and
exits (codes 143, 130). Several processes (hosts) train one run together with
--coordinator_address=HOST:PORT --num_processes=N --process_id=I, or
--distributed under SLURM or on a Cloud TPU pod slice.
"""

from collections.abc import Sequence
from pathlib import Path

import jax
from absl import flags

from jaxrobust import cli, configs, parallel
from jaxrobust.training import checkpoints
from jaxrobust.training import loop as experiment
from jaxrobust.evaluation.report import format_table
from jaxrobust.training import step as training
from jaxrobust.training import config as config_lib

_CONFIG = cli.define_config_flag(configs.resolve("pgd_at"))
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: runs/<config file name>).")
_PROGRESS = flags.DEFINE_boolean("progress", True, "Show a progress bar.")
cli.define_distributed_flags()


def main(argv: Sequence[str]) -> None:
  """Trains, then evaluates, as the flags say (`cli.run` calls it)."""
  cli.parse_flags(argv)
  config = cli.config_value(_CONFIG)
  cli.init_distributed()
  name = Path(cli.config_path(_CONFIG)).stem
  workdir = _WORKDIR.value or str(Path("runs") / name)
  state = experiment.train(config, workdir, progress=_PROGRESS.value)
  if jax.process_index() == 0:  # evaluates on its own devices, from memory
    mesh = parallel.mesh(jax.local_devices())
    resolved = checkpoints.load_config(workdir)
    state = jax.device_put(
      jax.device_get(training.for_evaluation(state)), parallel.replicated(mesh)
    )
    rep = experiment.evaluate(
      resolved,
      config_lib.build_model(resolved),
      state,
      names=config.eval.after_training,
      limit=config.eval.limit,
      mesh=mesh,
    )
    averaged = f" (EMA of the parameters, decay {resolved['ema']:g})" if resolved.get("ema") else ""
    print(f"\n{workdir}: step {int(state.step)}{averaged}, test accuracy\n")
    print(format_table(rep))


def run() -> None:
  """The `jaxrobust-train` command."""
  parallel.use_host_devices()  # before JAX starts: one XLA:CPU device per core
  cli.run(main)


if __name__ == "__main__":
  run()
