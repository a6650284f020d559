"""Robust training: objectives, the data-parallel step and the train loop.

* `objectives`, `augment`: what a step learns from (clean, attacked, noisy,
  mixed inputs) and on-device augmentation.
* `step`: the train state, the optimizer and the jitted data-parallel step.
* `config`: a run's config checked and turned into a model and an optimizer.
* `loop`: the train loop (`train`, `restore`), with `checkpoints`,
  `metrics`, `signals`, Fast-AT's `guard` and best-checkpoint `selection`.
"""

from jaxrobust.training.loop import restore, train
from jaxrobust.training.step import (
  TrainState,
  init_state,
  make_input_fn,
  make_optimizer,
  make_train_step,
)

__all__ = [
  "TrainState",
  "init_state",
  "make_input_fn",
  "make_optimizer",
  "make_train_step",
  "restore",
  "train",
]
