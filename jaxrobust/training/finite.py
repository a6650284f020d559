"""Divergence: a run stops at a non-finite step before anything of it is saved.

A non-finite loss or accuracy stops training (`Diverged`) before anything of
that step is logged or saved, and no checkpoint is written of a state whose
parameters or optimizer state are not finite. The loop tracks the first
non-finite step on the device (`first_non_finite`) and reads it back only on
the steps it logs or saves.
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxrobust.training import checkpoints


class Diverged(RuntimeError):
  """The loss, accuracy or parameters of a training step are not finite."""


def _last_good(mgr: ocp.CheckpointManager) -> str:
  step = mgr.latest_step()
  if step is None:
    return "no checkpoint has been written yet"
  return f"the last good checkpoint is step {step} ({str(mgr.directory / str(step))!r})"


@jax.jit
def first_non_finite(first: jax.Array, metrics: Any, step: jax.Array) -> jax.Array:
  """The first step whose metrics were not finite, kept on the device.

  Args:
    first: the step found so far, or -1.
    metrics: this step's metrics (a pytree of scalars).
    step: this step.

  Returns:
    `first` if it is a step (>= 0), else `step` if a metric is not finite,
    else -1.
  """
  finite = jnp.all(jnp.stack([jnp.isfinite(v) for v in jax.tree.leaves(metrics)]))
  return jnp.where((first < 0) & ~finite, step, first)


def check_finite(
  metrics: Mapping[str, float], first_bad: int, step: int, mgr: ocp.CheckpointManager
) -> None:
  """Stops a run whose metrics were not finite at step `first_bad`.

  Args:
    metrics: the metrics of `step`, read back.
    first_bad: the first non-finite step (`first_non_finite`), or -1.
    step: the step the loop is at.
    mgr: the run's checkpoints (the error names the last good one).

  Raises:
    Diverged: when `first_bad` >= 0, before anything of it is saved.
  """
  if first_bad >= 0:
    bad = {k: v for k, v in metrics.items() if not np.isfinite(v)}
    found = "" if first_bad == step else f" (found at step {step})"
    raise Diverged(
      f"training diverged at step {first_bad}{found}: {bad}; nothing of "
      f"steps {first_bad}-{step} was saved; {_last_good(mgr)}; lower the "
      f"learning rate"
    )


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
  leaves = [
    jnp.isfinite(x).all() for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)
  ]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def save_checkpoint(mgr: ocp.CheckpointManager, state: Any, step: int) -> None:
  """Saves `state` (`checkpoints.save`) unless it is not finite.

  Args:
    mgr: the checkpoint manager.
    state: the TrainState.
    step: its step (for the message).

  Raises:
    Diverged: a parameter or optimizer statistic is not finite.
  """
  if not bool(_all_finite(state)):
    raise Diverged(
      f"training diverged at step {step}: the parameters or optimizer "
      f"state are not finite (the loss was still finite); nothing of "
      f"this state was saved; {_last_good(mgr)}; lower the learning rate"
    )
  checkpoints.save(mgr, state)
