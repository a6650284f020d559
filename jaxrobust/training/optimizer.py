"""A run's optimizer: the learning-rate schedule and the optax transformation."""

from collections.abc import Mapping
from typing import Any

import optax

from jaxrobust import checks


def make_schedule(cfg: Mapping[str, Any], total_steps: int) -> optax.Schedule:
  """The learning-rate schedule of the optimizer settings `cfg`.

  "constant"; "cosine" (to 0, after linear warm-up over `warmup_steps`);
  "piecewise" (multiplied by `decay_factor` at each fraction of training in
  `decay_at`); "cyclic" (Smith's one cycle as Wong et al. use it for Fast-AT:
  linear from 0 up to the learning rate at the fraction `peak_at` of
  training, default 2/5, then linear down to 0).

  Args:
    cfg: a dict (or ConfigDict) of the optimizer settings.
    total_steps: the run's number of steps.

  Returns:
    An optax schedule.

  References:
    Wong et al., 2020: https://arxiv.org/abs/2001.03994
  """
  lr = checks.positive("optimizer.learning_rate", cfg["learning_rate"])
  name = checks.one_of(
    "optimizer.schedule",
    cfg.get("schedule", "constant"),
    ("constant", "cosine", "piecewise", "cyclic"),
  )
  if name == "constant":
    return optax.constant_schedule(lr)
  if name == "cyclic":
    peak_at = checks.in_interval(
      "optimizer.peak_at", cfg.get("peak_at", 0.4), 0.0, 1.0, closed=(False, False)
    )
    peak = min(max(1, round(peak_at * total_steps)), max(total_steps - 1, 1))
    return optax.join_schedules(
      [
        optax.linear_schedule(0.0, lr, peak),
        optax.linear_schedule(lr, 0.0, max(total_steps - peak, 1)),
      ],
      [peak],
    )
  if name == "cosine":
    warmup = min(cfg.get("warmup_steps", 0), total_steps - 1)
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, total_steps)
  boundaries = {
    int(f * total_steps): cfg.get("decay_factor", 0.1) for f in cfg.get("decay_at", (0.5, 0.75))
  }
  return optax.piecewise_constant_schedule(lr, boundaries)


def make_optimizer(cfg: Mapping[str, Any], total_steps: int) -> optax.GradientTransformation:
  """SGD with (Nesterov) momentum, Adam or AdamW, with L2 weight decay.

  Weight decay adds `weight_decay * params` to the gradient (PyTorch's SGD
  convention) for "sgd" and "adam", and is AdamW's decoupled decay for "adamw".

  Args:
    cfg: the optimizer settings (`name`, `learning_rate`, `weight_decay`,
      `momentum`, `nesterov` and the schedule's, see `make_schedule`).
    total_steps: the run's number of steps.

  Returns:
    The optax transformation.
  """
  schedule = make_schedule(cfg, total_steps)
  name = checks.one_of("optimizer.name", cfg["name"], ("sgd", "adam", "adamw"))
  decay = checks.non_negative("optimizer.weight_decay", cfg.get("weight_decay", 0.0))
  if name == "adamw":
    return optax.adamw(schedule, weight_decay=decay)
  base = (
    optax.sgd(schedule, momentum=cfg.get("momentum", 0.9), nesterov=cfg.get("nesterov", False))
    if name == "sgd"
    else optax.adam(schedule)
  )
  return optax.chain(optax.add_decayed_weights(decay), base) if decay else base
