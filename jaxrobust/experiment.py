"""A training run from a config: data, model, the loop, checkpoints and logs.

`train(config, workdir)` trains (resuming from the newest checkpoint in
`workdir`) and returns the final TrainState; `restore(workdir)` gives back a
finished or running model for evaluation. The workdir holds:

  config.json        the resolved config (the config plus data facts: classes,
                     input shape, the per-channel mean and std the model uses)
  checkpoints/<step> orbax checkpoints of the TrainState
  metrics.jsonl      one JSON line per logged step
  tensorboard/       the same metrics for TensorBoard
"""
import json
import time
from pathlib import Path

import jax
import numpy as np
import tqdm

from jaxrobust import checkpoints, checks, data, evaluation, models, parallel, training


def resolve(config, train_set):
  """The config as a plain dict plus the facts of its training data."""
  resolved = config.to_dict()
  mean, std = data.channel_stats(train_set.x)
  resolved["dataset"] = {"num_classes": int(train_set.num_classes),
                         "input_shape": list(train_set.x.shape[1:]),
                         "mean": list(mean), "std": list(std),
                         "train_examples": int(len(train_set.x))}
  return resolved


def build_model(resolved, axis_name=None):
  settings = dict(resolved["model"])
  ds = resolved["dataset"]
  return models.create(settings.pop("name"), num_classes=ds["num_classes"],
                       mean=ds["mean"], std=ds["std"], axis_name=axis_name, **settings)


def schedule_length(resolved):
  """(steps per epoch, total steps) of a run."""
  steps_per_epoch = resolved["dataset"]["train_examples"] // resolved["batch_size"]
  return steps_per_epoch, resolved["epochs"] * steps_per_epoch


def initial_state(resolved, model, mesh):
  """The step-0 TrainState, replicated over `mesh`, and the optimizer."""
  checks.integer_at_least("epochs", resolved["epochs"], 1)
  _, total = schedule_length(resolved)
  tx = training.make_optimizer(resolved["optimizer"], total)
  key = jax.random.fold_in(jax.random.key(resolved["seed"]), 0)
  state = training.init_state(model, tx, resolved["dataset"]["input_shape"], key)
  return jax.device_put(state, parallel.replicated(mesh)), tx


def load_split(resolved_or_config, split):
  cfg = resolved_or_config["data"]
  return data.load(cfg["name"], split, data_dir=cfg.get("data_dir") or None)


def train(config, workdir, *, max_steps=None, mesh=None, progress=True):
  """Trains `config` in `workdir`, resuming from its newest checkpoint.

  Stops at the config's last step, or after step `max_steps` (a checkpoint is
  written there, as at the end). Returns the final TrainState.
  """
  mesh = mesh or parallel.mesh()
  checks.integer_at_least("batch_size", config.batch_size, 1)
  training.check_divisible(config.batch_size, mesh)
  checkpoints.check_workdir(workdir)
  train_set = load_split(config, "train")
  resolved = resolve(config, train_set)
  # Everything the config sets up is checked before the workdir is touched.
  model = build_model(resolved, axis_name=parallel.BATCH_AXIS)
  state, tx = initial_state(resolved, model, mesh)
  input_fn = training.make_input_fn(config.objective, config.get("train_attack"))
  workdir = checkpoints.claim_workdir(workdir, resolved)
  mgr = checkpoints.manager(workdir, every_steps=config.checkpoint_every_steps,
                            keep=config.keep_checkpoints)
  state = checkpoints.restore_latest(mgr, state) or state
  start = int(state.step)
  steps_per_epoch, total = schedule_length(resolved)
  end = total if max_steps is None else min(total, max_steps)

  step_fn = training.make_train_step(model, tx, input_fn, mesh)
  key = jax.random.fold_in(jax.random.key(config.seed), 1)
  batches = data.train_batches(train_set.x, train_set.y, config.batch_size,
                               seed=config.seed, start_step=start)
  log = MetricsLog(workdir, resume_step=start)
  bar = tqdm.tqdm(total=end, initial=start, disable=not progress, unit="step",
                  desc=f"train {Path(workdir).name}")
  tick = time.perf_counter()
  try:
    for step in range(start, end):
      xb, yb = next(batches)
      state, metrics = step_fn(state, *data.to_devices((xb, yb), mesh), key)
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      check_finite(metrics, step + 1, mgr)
      bar.update(1)
      bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['accuracy']:.3f}")
      if (step + 1) % config.log_every_steps == 0 or step + 1 == end:
        now = time.perf_counter()
        log.write(step + 1, {**metrics, "epoch": (step + 1) / steps_per_epoch,
                             "seconds": now - tick})
        tick = now
      checkpoints.save(mgr, state, force=step + 1 == end)
  finally:
    bar.close()
    log.close()
    mgr.wait_until_finished()
  return state


class Diverged(RuntimeError):
  """The loss or accuracy of a training step is not finite."""


def check_finite(metrics, step, mgr):
  """Stops a run whose step produced non-finite metrics, before it is saved."""
  bad = {k: v for k, v in metrics.items() if not np.isfinite(v)}
  if bad:
    raise Diverged(f"training diverged at step {step}: {bad}; the last good "
                   f"checkpoint is step {mgr.latest_step()} (none was written for "
                   f"this state); lower the learning rate")


class MetricsLog:
  """`metrics.jsonl` (one line per logged step) and a TensorBoard log.

  On resume, lines after the restored step are dropped so that no step is
  duplicated.
  """

  def __init__(self, workdir, resume_step):
    self.path = Path(workdir) / "metrics.jsonl"
    if self.path.exists():
      kept = [line for line in self.path.read_text().splitlines()
              if line.strip() and json.loads(line)["step"] <= resume_step]
      checkpoints.write_atomic(self.path, "".join(l + "\n" for l in kept))
    self.file = open(self.path, "a")
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self.tb = SummaryWriter(str(Path(workdir) / "tensorboard"))

  def write(self, step, metrics):
    self.file.write(json.dumps({"step": step, **metrics}) + "\n")
    self.file.flush()
    for k, v in metrics.items():
      self.tb.add_scalar(f"train/{k}", v, step)

  def close(self):
    self.file.close()
    self.tb.close()


def restore(workdir, mesh=None):
  """The resolved config, model and variables of the newest checkpoint in `workdir`."""
  mesh = mesh or parallel.mesh()
  workdir = checkpoints.check_workdir(workdir)
  resolved = checkpoints.load_config(workdir)
  model = build_model(resolved)
  target, _ = initial_state(resolved, model, mesh)
  mgr = checkpoints.manager(workdir, keep=None)
  state = checkpoints.restore_latest(mgr, target)
  checks.require(state is not None, f"no checkpoint in {str(workdir)!r}; "
                 "train first with train.py --workdir")
  return resolved, model, state


def evaluate(resolved, model, state, *, split="test", names=None, limit=None,
             batch_size=None, mesh=None):
  """Clean and attacked accuracy (see `evaluation.report`) on `split`."""
  test_set = load_split(resolved, split)
  x, y = test_set.x, test_set.y
  if limit:
    checks.integer_at_least("limit", limit, 1)
    x, y = x[:limit], y[:limit]
  specs = evaluation.select(resolved["eval"]["attacks"], names)
  correct = evaluation.per_example_correct(
      lambda v, xb: model.apply(v, xb, train=False), state.variables, x, y,
      evaluation.build_attacks(specs), key=jax.random.key(resolved["seed"]),
      batch_size=batch_size or resolved["eval"]["batch_size"], mesh=mesh)
  return evaluation.report(correct, specs)
