"""A training run from a config: data, model, the loop, checkpoints and logs.

`train(config, workdir)` trains (resuming from the newest checkpoint in
`workdir`) and returns the final TrainState; `restore(workdir)` gives back a
finished or running model for evaluation. The workdir holds:

  config.json        the resolved config (the config plus data facts: classes,
                     input shape, the per-channel mean and std the model uses)
  checkpoints/<step> orbax checkpoints of the TrainState (see `checkpoints`)
  checkpoints/best/  with eval.every_epochs: the best by validation robust
                     accuracy, and best.json its record (`selection`)
  metrics.jsonl      one JSON line per logged step
  overfit_guard.json with `overfit_guard` (Fast-AT): its checks and stop (`guard`)
  tensorboard/       the same metrics for TensorBoard

Resuming is exact, SIGTERM and SIGINT save and stop, a non-finite step stops
the run (`finite`), and every process of a multi-process run runs this loop:
docs/training.md says how.
"""

import contextlib
import dataclasses
import time
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
import orbax.checkpoint as ocp
from flax import linen as nn

from jaxrobust import checks, data, parallel
from jaxrobust.training import checkpoints, objectives, selection, signals
from jaxrobust.training import config as config_lib
from jaxrobust.training import guard as guard_lib
from jaxrobust.training import metrics as metrics_lib
from jaxrobust.training import step as training
from jaxrobust.training.evaluate import evaluate, restore
from jaxrobust.training.finite import Diverged, check_finite, first_non_finite, save_checkpoint
from jaxrobust.training.state import TrainState, abstract_state, initial_state

__all__ = [
  "Diverged",
  "abstract_state",
  "check_finite",
  "evaluate",
  "initial_state",
  "restore",
  "save_checkpoint",
  "train",
]


@dataclasses.dataclass(frozen=True)
class _Run:
  """What `train` sets up from the config, all checked, before the loop."""

  config: ml_collections.ConfigDict
  resolved: dict[str, Any]
  workdir: Path
  mesh: jax.sharding.Mesh
  model: nn.Module
  tx: optax.GradientTransformation
  target: Any  # the abstract TrainState checkpoints are restored into
  input_fn: objectives.Objective
  train_set: Any
  extra_set: Any  # the mixture's second data set (`data.extra`), or None
  val_set: Any  # the validation slice (`selection`), or None
  every: int  # validate after every `every`-th epoch (0: never)
  guard: dict[str, Any] | None  # Fast-AT's guard's settings (`guard`), or None
  steps_per_epoch: int
  total: int
  primary: bool  # process 0: writes config.json, logs and records


def _prepare(config: ml_collections.ConfigDict, workdir: str | Path, mesh: Any) -> _Run:
  """Checks the config, loads the data, builds the model; then claims the workdir."""
  config_lib.check_config(config, mesh)
  checkpoints.check_workdir(workdir, writable=True)
  train_set, val_set = config_lib.load_split(config, "train"), None
  every, val_size = selection.settings(config.eval, len(train_set.x))
  if every:  # the validation slice (Rice et al.): never trained on
    train_set, val_set = selection.split(train_set, val_size)
  checks.require(
    config.batch_size <= len(train_set.x),
    f"batch_size {config.batch_size} exceeds the {len(train_set.x)} training examples",
  )
  resolved = config_lib.resolve(config, train_set)
  model = config_lib.build_model(resolved, axis_name=parallel.BATCH_AXIS)
  tx = config_lib.make_optimizer(resolved)
  target = abstract_state(resolved, model, tx, mesh)
  input_fn = training.make_input_fn(
    config.objective, config.get("train_attack"), settings=config.get("objective_settings")
  )
  # Everything the config sets up is checked: now the workdir may be touched.
  primary = jax.process_index() == 0
  with parallel.on_every_process("claim the workdir"):
    claimed = checkpoints.claim_workdir(workdir, resolved, write=primary)
  guard = guard_lib.settings(config.get("overfit_guard"), config.get("train_attack"))
  steps_per_epoch, total = config_lib.schedule_length(resolved)
  return _Run(
    config=config,
    resolved=resolved,
    workdir=claimed,
    mesh=mesh,
    model=model,
    tx=tx,
    target=target,
    input_fn=input_fn,
    train_set=train_set,
    extra_set=config_lib.load_extra(config),
    val_set=val_set,
    every=every,
    guard=guard,
    steps_per_epoch=steps_per_epoch,
    total=total,
    primary=primary,
  )


def _resume_guard(run: _Run, start: int) -> guard_lib.Guard | None:
  """Fast-AT's guard, resumed at step `start` (None: no guard)."""
  if not run.guard:
    return None
  record = guard_lib.read(run.workdir, start)
  if "stopped" not in record:
    model = config_lib.build_model(run.resolved)
    check = guard_lib.make_check(
      model, run.train_set.x, run.train_set.y, run.guard, run.config.seed
    )
    return guard_lib.Guard(run.workdir, record, check, run.guard["max_drop"], primary=run.primary)
  if run.primary:
    print(
      f"the overfitting guard stopped this run at step {record['stopped']['step']}; not "
      f"training further (step {start} is the last good checkpoint)",
      flush=True,
    )
  return guard_lib.Guard(run.workdir, record, None, run.guard["max_drop"], primary=False)


def _resume_best(run: _Run, start: int) -> selection.BestCheckpoint | None:
  """The best checkpoint's tracker, resumed at step `start` (None: off)."""
  if not run.every:
    return None
  size = len(run.val_set.x)
  settings = dict(eps=run.config.eval.attacks.pgd_linf.eps, steps=selection.STEPS, examples=size)
  model = config_lib.build_model(run.resolved)
  check = guard_lib.make_check(model, run.val_set.x, run.val_set.y, settings, run.config.seed)
  record = selection.read(run.workdir, start)
  return selection.BestCheckpoint(
    run.every, run.workdir, record, check, selection.manager(run.workdir), run.primary
  )


def _make_step(run: _Run) -> training.StepFn:
  resolved = run.resolved
  return training.make_train_step(
    run.model,
    run.tx,
    run.input_fn,
    run.mesh,
    augment=config_lib.make_augment(resolved),
    ema=resolved.get("ema", 0.0),
    awp=resolved.get("awp", 0.0),
    awp_from_step=resolved.get("awp_warmup", 0) * run.steps_per_epoch,
  )


def train(
  config: ml_collections.ConfigDict,
  workdir: str | Path,
  *,
  max_steps: int | None = None,
  mesh: jax.sharding.Mesh | None = None,
  progress: bool = True,
) -> TrainState:
  """Trains `config` in `workdir`, resuming from its newest intact checkpoint.

  Args:
    config: the run's config (`jaxrobust/configs`).
    workdir: the run's directory, created or resumed.
    max_steps: stop after this step (a checkpoint is written there, as at
      the end); default: the config's last step.
    mesh: the devices (default: all).
    progress: show a progress bar (or progress lines).

  Returns:
    The final TrainState.

  Raises:
    InputError: a bad setting, data set or workdir (checked before anything
      is written), or a checkpoint that does not fit the model.
    Diverged: a step's loss, accuracy or parameters are not finite.
    Interrupted: SIGTERM or SIGINT stopped the run (after saving it).
  """
  run = _prepare(config, workdir, mesh or parallel.mesh())
  # With the guard, every epoch end it passed is kept: the last good model.
  mgr = checkpoints.manager(
    run.workdir,
    keep=config.keep_checkpoints,
    keep_period=run.steps_per_epoch if run.guard else None,
  )
  with contextlib.ExitStack() as stack:
    stack.callback(mgr.close)
    state = checkpoints.restore_latest(mgr, run.target, quarantine=True)
    if state is None:
      state = initial_state(run.resolved, run.model, run.tx, run.mesh)
    start = int(state.step)
    end = run.total if max_steps is None else min(run.total, max_steps)
    if start >= end:
      return state
    guard = _resume_guard(run, start)
    if guard is not None and guard.stopped:
      return state
    best = _resume_best(run, start)
    if best is not None:
      stack.callback(best.mgr.close)
    return _loop(run, state, end, mgr, guard, best, progress)


def _batches(run: _Run, start: int) -> Iterator[tuple[Any, Any]]:
  """This process's rows of every global batch from step `start` on: of the
  training set, or a mixture with `data.extra` (`data.mixed_batches`)."""
  config = run.config
  serving: dict[str, Any] = dict(
    seed=config.seed,
    start_step=start,
    rows=data.process_rows(config.batch_size, run.mesh),
    workers=config.data.get("workers", 0),
  )
  if run.extra_set is None:
    return data.train_batches(run.train_set.x, run.train_set.y, config.batch_size, **serving)
  return data.mixed_batches(
    (run.train_set.x, run.train_set.y),
    (run.extra_set.x, run.extra_set.y),
    config.batch_size,
    extra_fraction=config.data.extra_fraction,
    **serving,
  )


def _loop(
  run: _Run,
  state: TrainState,
  end: int,
  mgr: ocp.CheckpointManager,
  guard: guard_lib.Guard | None,
  best: selection.BestCheckpoint | None,
  progress: bool,
) -> TrainState:
  """Steps from `state` to step `end`: metrics are read back from the device
  only on the steps that log or save, so JAX queues the next step meanwhile."""
  config, per_epoch, start = run.config, run.steps_per_epoch, int(state.step)
  step_fn = _make_step(run)
  key = jax.random.fold_in(jax.random.key(config.seed), 1)
  batches = _batches(run, start)
  log: Any = metrics_lib.MetricsLog(run.workdir, start) if run.primary else contextlib.nullcontext()
  read: dict[str, float] = {}  # the metrics read back on log and checkpoint steps
  bar = metrics_lib.Progress(
    start, end, f"train {run.workdir.name}", enabled=progress and run.primary
  )
  first_bad = jnp.int32(-1)  # on the device: the first step with non-finite metrics
  tick = time.perf_counter()
  with signals.StopRequests() as stop, log, bar:
    for step in range(start + 1, end + 1):  # `step`: the state's step after it
      x, y = data.local_to_global(next(batches), run.mesh, config.batch_size)
      state, metrics = step_fn(state, x, y, key)
      first_bad = first_non_finite(first_bad, metrics, jnp.int32(step))
      bar.step()
      epoch_end = guard is not None and step % per_epoch == 0
      validating = best is not None and step % (best.every * per_epoch) == 0
      logging = step % config.log_every_steps == 0 or step == end or epoch_end or validating
      stopping = stop.requested(step)
      saving = stopping or step == end or step % config.checkpoint_every_steps == 0 or epoch_end
      if logging or saving:  # read back: the loop waits for the device here only
        read = {k: float(v) for k, v in jax.device_get(metrics).items()}
        check_finite(read, int(first_bad), step, mgr)
      if epoch_end and guard is not None:  # Fast-AT's guard, once per epoch
        read["guard_robust_accuracy"], message = guard.after_epoch(state.variables, step, mgr)
        if message is not None:
          if run.primary:
            log.write(step, {**read, "epoch": step / per_epoch})
            print(message, flush=True)
          return checkpoints.restore_latest(mgr, run.target)
      if validating and best is not None:  # the best checkpoint
        read["val_robust_accuracy"] = best.after_validation(state, step)
      if logging and run.primary:
        now = time.perf_counter()
        log.write(step, {**read, "epoch": step / per_epoch, "seconds": now - tick})
        bar.log(step, read)
        tick = now
      if saving:
        save_checkpoint(mgr, state, step)
      if stopping:
        raise signals.Interrupted(stop.signum or 0, step, mgr.directory / str(step))
  return state
