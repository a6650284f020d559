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

Reliability:
- Resuming is exact: the data order depends only on the seed and the epoch,
  and every random draw on the seed and the step, so a run stopped at any
  point (even by `kill -9`) and resumed ends with bitwise the parameters of an
  uninterrupted run on the same devices; steps logged after the checkpoint it
  resumes from are dropped from the logs and logged again.
- SIGTERM (what schedulers send before pre-empting) and SIGINT stop the loop
  after the current step, save a checkpoint there and raise `Interrupted`
  (train.py exits with code 128 + the signal number: 143 and 130). A second
  signal acts at once. With several processes, SIGTERM goes through JAX's
  preemption sync point so that all processes stop and save at the same
  step; SIGINT keeps its default behaviour there.
- A non-finite loss or accuracy stops training (`Diverged`) before anything of
  that step is logged or saved, and no checkpoint is written of a state whose
  parameters or optimizer state are not finite.
- Multi-process: every process runs this same loop on the global mesh,
  loads the data and feeds only its own devices' rows of each global batch;
  process 0 alone writes config.json, metrics and TensorBoard logs, and orbax
  coordinates the checkpoint writes.
"""

import contextlib
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxrobust import checks, data, evaluation
from jaxrobust.certification import certificates
from jaxrobust.training import checkpoints
from jaxrobust.training import config as config_lib
from jaxrobust import models
from jaxrobust.training import guard as guard_lib
from jaxrobust.training import selection
from jaxrobust import parallel
from jaxrobust.training import metrics as metrics_lib
from jaxrobust.evaluation import sanity as sanity_lib
from jaxrobust.training import signals
from jaxrobust.training import step as training


def _init_fn(resolved, model, tx):
  shape = resolved["dataset"]["input_shape"]
  ema = bool(resolved.get("ema", 0.0))
  return lambda key: training.init_state(model, tx, shape, key, ema=ema)


def initial_state(resolved, model, tx, mesh):
  """The step-0 TrainState, replicated over `mesh`.

  Its random draws use JAX's original (non-partitionable) threefry whatever
  the `jax_threefry_partitionable` setting: the state is computed whole on
  every device, and XLA:CPU compiles it about 7x faster (seconds per model).
  """
  key = jax.random.fold_in(jax.random.key(resolved["seed"]), 0)
  init = jax.jit(_init_fn(resolved, model, tx), out_shardings=parallel.replicated(mesh))
  with jax.threefry_partitionable(False):
    return init(key)


def abstract_state(resolved, model, tx, mesh):
  """The TrainState's structure, shapes and dtypes, replicated over `mesh`,
  found without running the model (the target a checkpoint is restored into)."""
  shapes = jax.eval_shape(_init_fn(resolved, model, tx), jax.random.key(0))
  sharding = parallel.replicated(mesh)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def train(config, workdir, *, max_steps=None, mesh=None, progress=True):
  """Trains `config` in `workdir`, resuming from its newest intact checkpoint.

  Stops at the config's last step, or after step `max_steps` (a checkpoint is
  written there, as at the end). Returns the final TrainState.

  Raises:
    InputError: a bad setting, data set or workdir (checked before anything
      is written), or a checkpoint that does not fit the model.
    Diverged: a step's loss, accuracy or parameters are not finite.
    Interrupted: SIGTERM or SIGINT stopped the run (after saving it).
  """
  mesh = mesh or parallel.mesh()
  config_lib.check_config(config, mesh)
  checkpoints.check_workdir(workdir, writable=True)
  train_set = config_lib.load_split(config, "train")
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
    workdir = checkpoints.claim_workdir(workdir, resolved, write=primary)
  guard = guard_lib.settings(config.get("overfit_guard"), config.get("train_attack"))
  steps_per_epoch, total = config_lib.schedule_length(resolved)
  # With the guard, every epoch end it passed is kept: the last good model.
  mgr = checkpoints.manager(
    workdir, keep=config.keep_checkpoints, keep_period=steps_per_epoch if guard else None
  )
  stack = contextlib.ExitStack()
  try:
    state = checkpoints.restore_latest(mgr, target, quarantine=True)
    if state is None:
      state = initial_state(resolved, model, tx, mesh)
    start = int(state.step)
    end = total if max_steps is None else min(total, max_steps)
    if start >= end:
      return state

    if guard:
      record = guard_lib.read(workdir, start)
      if "stopped" in record:
        if primary:
          print(
            f"the overfitting guard stopped this run at step "
            f"{record['stopped']['step']}; not training further (step {start} is "
            f"the last good checkpoint)",
            flush=True,
          )
        return state
      check = guard_lib.make_check(
        config_lib.build_model(resolved), train_set.x, train_set.y, guard, config.seed
      )
      previous = record["checks"][-1]["robust_accuracy"] if record["checks"] else None
    if every:
      best_record = selection.read(workdir, start)
      val_check = guard_lib.make_check(
        config_lib.build_model(resolved),
        val_set.x,
        val_set.y,
        dict(eps=config.eval.attacks.pgd_linf.eps, steps=selection.STEPS, examples=val_size),
        config.seed,
      )
      best_mgr = selection.manager(workdir)
      stack.callback(best_mgr.close)
    step_fn = training.make_train_step(
      model,
      tx,
      input_fn,
      mesh,
      augment=config_lib.make_augment(resolved),
      ema=resolved.get("ema", 0.0),
      awp=resolved.get("awp", 0.0),
      awp_from_step=resolved.get("awp_warmup", 0) * steps_per_epoch,
    )
    key = jax.random.fold_in(jax.random.key(config.seed), 1)
    batches = data.train_batches(
      train_set.x, train_set.y, config.batch_size, seed=config.seed, start_step=start
    )
    log = (
      metrics_lib.MetricsLog(workdir, resume_step=start) if primary else contextlib.nullcontext()
    )
    progress = metrics_lib.Progress(
      start, end, f"train {Path(workdir).name}", enabled=progress and primary
    )
    first_bad = jnp.int32(-1)  # on the device: the first step with non-finite metrics
    tick = time.perf_counter()
    with signals.StopRequests() as stop, log, progress:
      for step in range(start + 1, end + 1):  # `step`: the state's step after it
        # Nothing here waits for the device but on log and checkpoint steps,
        # so JAX queues the next step while this one runs.
        state, metrics = step_fn(state, *parallel.global_batch(next(batches), mesh), key)
        first_bad = _first_non_finite(first_bad, metrics, jnp.int32(step))
        progress.step()
        epoch_end = bool(guard) and step % steps_per_epoch == 0
        validating = bool(every) and step % (every * steps_per_epoch) == 0
        logging = step % config.log_every_steps == 0 or step == end or epoch_end or validating
        stopping = stop.requested(step)
        saving = stopping or step == end or step % config.checkpoint_every_steps == 0 or epoch_end
        if logging or saving:
          metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
          check_finite(metrics, int(first_bad), step, mgr)
        if epoch_end:  # Fast-AT's guard (`jaxrobust.training.guard`): once per epoch
          accuracy = float(check(state.variables))
          metrics["guard_robust_accuracy"] = accuracy
          if guard_lib.collapsed(previous, accuracy, guard["max_drop"]):
            message = guard_lib.stop(mgr, record, step, accuracy)
            if primary:
              log.write(step, {**metrics, "epoch": step / steps_per_epoch})
              guard_lib.write(workdir, record)
              print(message, flush=True)
            return checkpoints.restore_latest(mgr, target)
          previous = accuracy
          record["checks"].append({"step": step, "robust_accuracy": accuracy})
          if primary:
            guard_lib.write(workdir, record)
        if validating:  # the best checkpoint (`selection`)
          accuracy = float(val_check(training.for_evaluation(state).variables))
          metrics["val_robust_accuracy"] = accuracy
          best_record["checks"].append({"step": step, "val_robust_accuracy": accuracy})
          if selection.best_of(best_record["checks"]) is best_record["checks"][-1]:
            save_checkpoint(best_mgr, state, step)
          best_record["best"] = selection.best_of(best_record["checks"])
          if primary:
            selection.write(workdir, best_record)
        if logging and primary:
          now = time.perf_counter()
          log.write(step, {**metrics, "epoch": step / steps_per_epoch, "seconds": now - tick})
          progress.log(step, metrics)
          tick = now
        if saving:
          save_checkpoint(mgr, state, step)
        if stopping:
          raise signals.Interrupted(stop.signum, step, mgr.directory / str(step))
    return state
  finally:
    stack.close()
    mgr.close()


class Diverged(RuntimeError):
  """The loss, accuracy or parameters of a training step are not finite."""


def _last_good(mgr):
  step = mgr.latest_step()
  if step is None:
    return "no checkpoint has been written yet"
  return f"the last good checkpoint is step {step} ({str(mgr.directory / str(step))!r})"


@jax.jit
def _first_non_finite(first, metrics, step):
  """`first` if it is a step (>= 0), else `step` if a metric is not finite, else -1."""
  finite = jnp.all(jnp.stack([jnp.isfinite(v) for v in jax.tree.leaves(metrics)]))
  return jnp.where((first < 0) & ~finite, step, first)


def check_finite(metrics, first_bad, step, mgr):
  """Stops a run whose metrics were not finite at step `first_bad` (>= 0),
  found at `step` (whose metrics are `metrics`), before anything is saved."""
  if first_bad >= 0:
    bad = {k: v for k, v in metrics.items() if not np.isfinite(v)}
    found = "" if first_bad == step else f" (found at step {step})"
    raise Diverged(
      f"training diverged at step {first_bad}{found}: {bad}; nothing of "
      f"steps {first_bad}-{step} was saved; {_last_good(mgr)}; lower the "
      f"learning rate"
    )


@jax.jit
def _all_finite(tree):
  leaves = [
    jnp.isfinite(x).all() for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)
  ]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def save_checkpoint(mgr, state, step):
  """Saves `state` unless a parameter or optimizer statistic is not finite."""
  if not bool(_all_finite(state)):
    raise Diverged(
      f"training diverged at step {step}: the parameters or optimizer "
      f"state are not finite (the loss was still finite); nothing of "
      f"this state was saved; {_last_good(mgr)}; lower the learning rate"
    )
  checkpoints.save(mgr, state)


def restore(workdir, mesh=None, checkpoint="latest"):
  """The resolved config, model and state of the newest intact checkpoint in
  `workdir` (`checkpoint="best"`: the best by validation robust accuracy, see
  `selection`), which is only read (corrupt checkpoints are skipped, not moved).
  With `ema` set, the state's parameters are their moving average
  (`training.for_evaluation`): the model to evaluate."""
  mesh = mesh or parallel.mesh()
  workdir = checkpoints.check_workdir(workdir)
  resolved = checkpoints.load_config(workdir)
  model = config_lib.build_model(resolved)
  target = abstract_state(resolved, model, config_lib.make_optimizer(resolved), mesh)
  state = None
  if (workdir / "checkpoints").is_dir():
    mgr = (
      selection.manager(workdir, read_only=True)
      if checkpoint == "best"
      else checkpoints.manager(workdir, keep=None, read_only=True)
    )
    try:
      state = checkpoints.restore_latest(mgr, target)
    finally:
      mgr.close()
  checks.require(
    state is not None,
    f"no intact checkpoint in {str(workdir)!r}; train first with train.py --workdir",
  )
  return resolved, model, training.for_evaluation(state)


def evaluate(
  resolved,
  model,
  state,
  *,
  split="test",
  names=None,
  specs=None,
  limit=None,
  batch_size=None,
  mesh=None,
  source=None,
  sanity=False,
  lipschitz=False,
  individual=False,
  state_path=None,
  log=None,
  return_adversarial=False,
):
  """Robust accuracy under attacks (see `evaluation.evaluate`) on `split`.

  The attacks are `specs` (`{label: spec}`), or else those of the config's
  `eval.attacks` named in `names` (comma-separated, or "all"; default: the
  config's `eval.default`). `source`: an optional `(model, state)` to craft
  the examples on (transfer). With `sanity`, the report's "sanity" entry
  holds the checks of `jaxrobust.evaluation.sanity` (on the first
  `sanity.SANITY_EXAMPLES` examples). With `lipschitz`, a spectrally
  normalised model also gets `certificates.lipschitz_certificate` (report
  key "lipschitz") at radius 0 and 1/4, 1/2 and 1 times the eps of every L2
  attack; for a randomized model it certifies the base classifier f,
  without noise. A randomized model is attacked with its fixed draws (EOT),
  and with fresh draws by attacks that ask for them (`Attack.stochastic`).
  The model evaluated is `training.for_evaluation(state)`: the EMA of the
  parameters when the state keeps one. With `return_adversarial`, returns
  `(report, adversarial)` as `evaluation.evaluate` does.
  """
  state = training.for_evaluation(state)  # idempotent: a restored state already is
  test_set = config_lib.load_split(resolved, split)
  x, y = test_set.x, test_set.y
  if limit:
    checks.integer_at_least("limit", limit, 1)
    x, y = x[:limit], y[:limit]
  specs = specs or evaluation.select(
    resolved["eval"]["attacks"], names or resolved["eval"].get("default")
  )
  batch_size = batch_size or resolved["eval"]["batch_size"]
  apply_fn = models.inference_fn(model)
  key = jax.random.key(resolved["seed"])
  run = lambda specs, x, y, **kw: evaluation.evaluate(
    apply_fn,
    state.variables,
    x,
    y,
    specs,
    key=key,
    batch_size=batch_size,
    mesh=mesh,
    source=source and (models.inference_fn(source[0]), source[1].variables),
    stochastic_apply_fn=models.stochastic_fn(model),
    **kw,
  )
  rep = run(
    specs,
    x,
    y,
    individual=individual,
    state_path=state_path,
    log=log,
    return_adversarial=return_adversarial,
  )
  rep, adversarial = rep if return_adversarial else (rep, None)
  certified = bool(resolved["model"].get("spectral"))
  if sanity and source is None:
    subset = x[: sanity_lib.SANITY_EXAMPLES], y[: sanity_lib.SANITY_EXAMPLES]
    rep["sanity"] = sanity_lib.model_checks(
      apply_fn, state.variables, *subset, stochastic_apply_fn=models.stochastic_fn(model)
    ) + sanity_lib.attack_checks(
      rep, lambda s, **kw: run(s, *subset, **kw), specs, x.shape[1:], certified=certified
    )
  if lipschitz and certified:
    randomized = models.is_randomized(model)
    radii = sorted(
      {0.0} | {f * r["eps"] for r in rep["results"] if r["norm"] == "l2" for f in (0.25, 0.5, 1.0)}
    )
    rep["lipschitz"] = certificates.lipschitz_certificate(
      models.inference_fn(model, base=True),
      jax.device_get(state.variables),
      x,
      y,
      radii,
      batch_size=batch_size,
    )
    rep["lipschitz"]["of"] = "the base classifier f (without noise)" if randomized else "the model"
    if "sanity" in rep and not randomized and source is None:
      rep["sanity"] += sanity_lib.lipschitz_checks(rep, rep["lipschitz"])
  return (rep, adversarial) if return_adversarial else rep
