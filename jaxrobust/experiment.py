"""A training run from a config: data, model, the loop, checkpoints and logs.

`train(config, workdir)` trains (resuming from the newest checkpoint in
`workdir`) and returns the final TrainState; `restore(workdir)` gives back a
finished or running model for evaluation. The workdir holds:

  config.json        the resolved config (the config plus data facts: classes,
                     input shape, the per-channel mean and std the model uses)
  checkpoints/<step> orbax checkpoints of the TrainState (see `checkpoints`)
  metrics.jsonl      one JSON line per logged step
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
import json
import signal
import threading
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from jaxrobust import certificates, checkpoints, checks, data, evaluation, models, parallel
from jaxrobust import sanity as sanity_lib
from jaxrobust import training

# Fields of a metrics.jsonl line that measure time, not the computation.
TIMING_FIELDS = ("seconds",)


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


def make_optimizer(resolved):
  return training.make_optimizer(resolved["optimizer"], schedule_length(resolved)[1])


def _init_fn(resolved, model, tx):
  shape = resolved["dataset"]["input_shape"]
  return lambda key: training.init_state(model, tx, shape, key)


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
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                      shapes)


def load_split(resolved_or_config, split):
  cfg = resolved_or_config["data"]
  return data.load(cfg["name"], split, data_dir=cfg.get("data_dir") or None)


def check_config(config, mesh):
  """Checks the settings that need no data, before anything is loaded or written."""
  checks.integer_at_least("batch_size", config.batch_size, 1)
  training.check_divisible(config.batch_size, mesh)
  checks.integer_at_least("epochs", config.epochs, 1)
  checks.integer_at_least("seed", config.seed, 0)
  for name in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
    checks.integer_at_least(name, config[name], 1)
  training.make_optimizer(config.optimizer, total_steps=1)
  training.make_input_fn(config.objective, config.get("train_attack"))
  # train.py evaluates with these at the end: refuse them now, not after training.
  checks.integer_at_least("eval.batch_size", config.eval.batch_size, 1)
  checks.integer_at_least("eval.limit", config.eval.limit, 0)
  evaluation.build_attacks(config.eval.attacks)
  for names in (config.eval.default, config.eval.get("after_training")):
    evaluation.select(config.eval.attacks, names)


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
  check_config(config, mesh)
  checkpoints.check_workdir(workdir, writable=True)
  train_set = load_split(config, "train")
  checks.require(config.batch_size <= len(train_set.x),
                 f"batch_size {config.batch_size} exceeds the {len(train_set.x)} "
                 f"training examples")
  resolved = resolve(config, train_set)
  model = build_model(resolved, axis_name=parallel.BATCH_AXIS)
  tx = make_optimizer(resolved)
  target = abstract_state(resolved, model, tx, mesh)
  input_fn = training.make_input_fn(config.objective, config.get("train_attack"))
  # Everything the config sets up is checked: now the workdir may be touched.
  primary = jax.process_index() == 0
  with _on_every_process("claim the workdir"):
    workdir = checkpoints.claim_workdir(workdir, resolved, write=primary)
  mgr = checkpoints.manager(workdir, keep=config.keep_checkpoints)
  try:
    state = checkpoints.restore_latest(mgr, target, quarantine=True)
    if state is None:
      state = initial_state(resolved, model, tx, mesh)
    start = int(state.step)
    steps_per_epoch, total = schedule_length(resolved)
    end = total if max_steps is None else min(total, max_steps)
    if start >= end:
      return state

    step_fn = training.make_train_step(model, tx, input_fn, mesh)
    key = jax.random.fold_in(jax.random.key(config.seed), 1)
    batches = data.train_batches(train_set.x, train_set.y, config.batch_size,
                                 seed=config.seed, start_step=start)
    log = MetricsLog(workdir, resume_step=start) if primary else contextlib.nullcontext()
    bar = tqdm.tqdm(total=end, initial=start, disable=not (progress and primary),
                    unit="step", desc=f"train {Path(workdir).name}")
    tick = time.perf_counter()
    with _StopRequests() as stop, log, contextlib.closing(bar):
      for step in range(start + 1, end + 1):  # `step`: the state's step after it
        state, metrics = step_fn(state, *global_batch(next(batches), mesh), key)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        check_finite(metrics, step, mgr)
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['accuracy']:.3f}")
        if primary and (step % config.log_every_steps == 0 or step == end):
          now = time.perf_counter()
          log.write(step, {**metrics, "epoch": step / steps_per_epoch, "seconds": now - tick})
          tick = now
        stopping = stop.requested(step)
        if stopping or step == end or step % config.checkpoint_every_steps == 0:
          save_checkpoint(mgr, state, step)
        if stopping:
          raise Interrupted(stop.signum, step, mgr.directory / str(step))
    return state
  finally:
    mgr.close()


def global_batch(batch, mesh):
  """A global batch of numpy arrays (the same on every process) as `jax.Array`s
  split over `mesh`: each process supplies only the rows of its own devices."""
  sharding = parallel.batch_sharding(mesh)

  def put(array):
    slices = [index[0] for index in
              sharding.addressable_devices_indices_map(array.shape).values()]
    rows = sorted({s.indices(len(array))[:2] for s in slices})
    start, stop = rows[0][0], rows[-1][1]
    assert sum(b - a for a, b in rows) == stop - start, "a process's rows must be contiguous"
    return jax.make_array_from_process_local_data(sharding, array[start:stop], array.shape)

  return jax.tree.map(put, batch)


class Diverged(RuntimeError):
  """The loss, accuracy or parameters of a training step are not finite."""


class Interrupted(Exception):
  """SIGTERM or SIGINT stopped training after a checkpoint was saved.

  Attributes:
    exit_code: 128 + the signal number (143 for SIGTERM, 130 for SIGINT).
  """

  def __init__(self, signum, step, path):
    super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; "
                     f"saved checkpoint {str(path)!r}; run the same command again "
                     f"to resume")
    self.exit_code = 128 + signum


def _last_good(mgr):
  step = mgr.latest_step()
  if step is None:
    return "no checkpoint has been written yet"
  return f"the last good checkpoint is step {step} ({str(mgr.directory / str(step))!r})"


def check_finite(metrics, step, mgr):
  """Stops a run whose step produced non-finite metrics, before it is saved."""
  bad = {k: v for k, v in metrics.items() if not np.isfinite(v)}
  if bad:
    raise Diverged(f"training diverged at step {step}: {bad}; nothing of this step "
                   f"was saved; {_last_good(mgr)}; lower the learning rate")


@jax.jit
def _all_finite(tree):
  leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def save_checkpoint(mgr, state, step):
  """Saves `state` unless a parameter or optimizer statistic is not finite."""
  if not bool(_all_finite(state)):
    raise Diverged(f"training diverged at step {step}: the parameters or optimizer "
                   f"state are not finite (the loss was still finite); nothing of "
                   f"this state was saved; {_last_good(mgr)}; lower the learning rate")
  checkpoints.save(mgr, state)


class _StopRequests:
  """Turns SIGTERM and SIGINT into a request to stop after the current step.

  A second signal gets the handler that was there before (SIGTERM kills,
  SIGINT raises KeyboardInterrupt). Handlers are installed only in the main
  thread of a single-process run; with several processes, `requested` asks
  JAX's preemption sync point (which catches SIGTERM) every step instead.
  """

  def __enter__(self):
    self.signum = None
    self.previous = {}
    self.multi_process = jax.process_count() > 1
    if not self.multi_process and threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGTERM, signal.SIGINT):
        self.previous[signum] = signal.signal(signum, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.signum = signum
    signal.signal(signum, self.previous[signum] or signal.SIG_DFL)

  def requested(self, step):
    if self.multi_process and multihost_utils.reached_preemption_sync_point(step):
      self.signum = signal.SIGTERM
    return self.signum is not None

  def __exit__(self, *exc_info):
    for signum, handler in self.previous.items():
      signal.signal(signum, handler or signal.SIG_DFL)


@contextlib.contextmanager
def _on_every_process(what):
  """Runs a block on every process; if it fails on one, it fails on all (no hang)."""
  try:
    yield
  except BaseException:
    _all_ok(False)
    raise
  checks.require(_all_ok(True), f"another process failed to {what}; see its error")


def _all_ok(ok):
  if jax.process_count() == 1:
    return ok
  return bool(multihost_utils.process_allgather(np.bool_(ok)).all())


class MetricsLog:
  """`metrics.jsonl` (one line per logged step) and a TensorBoard log.

  On resume, lines after the restored step are dropped (and TensorBoard told
  to purge them), so that no step is duplicated or missing once they are
  logged again; so is a torn last line left by a killed process.
  """

  def __init__(self, workdir, resume_step):
    self.path = Path(workdir) / "metrics.jsonl"
    if self.path.exists():
      lines = self.path.read_text().splitlines()
      kept = [line for line in lines if _logged_step(line, self.path) <= resume_step]
      if kept != lines:
        checkpoints.write_atomic(self.path, "".join(l + "\n" for l in kept))
    self.file = open(self.path, "a")
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self.tb = SummaryWriter(str(Path(workdir) / "tensorboard"),
                            purge_step=resume_step + 1 if resume_step else None)

  def write(self, step, metrics):
    self.file.write(json.dumps({"step": step, **metrics}) + "\n")
    self.file.flush()
    for k, v in metrics.items():
      self.tb.add_scalar(f"train/{k}", v, step)

  def close(self):
    self.file.close()
    self.tb.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()


def _logged_step(line, path):
  """The step of a metrics.jsonl line; infinity for a torn or foreign line."""
  try:
    step = json.loads(line)["step"]
    if isinstance(step, int):
      return step
  except (ValueError, TypeError, KeyError):
    pass
  if line.strip():
    warnings.warn(f"dropping an unreadable line of {path} (a write cut short?): "
                  f"{line[:80]!r}")
  return float("inf")


def restore(workdir, mesh=None):
  """The resolved config, model and state of the newest intact checkpoint in
  `workdir`, which is only read (corrupt checkpoints are skipped, not moved)."""
  mesh = mesh or parallel.mesh()
  workdir = checkpoints.check_workdir(workdir)
  resolved = checkpoints.load_config(workdir)
  model = build_model(resolved)
  target = abstract_state(resolved, model, make_optimizer(resolved), mesh)
  state = None
  if (workdir / "checkpoints").is_dir():
    mgr = checkpoints.manager(workdir, keep=None, read_only=True)
    try:
      state = checkpoints.restore_latest(mgr, target)
    finally:
      mgr.close()
  checks.require(state is not None, f"no intact checkpoint in {str(workdir)!r}; "
                 "train first with train.py --workdir")
  return resolved, model, state


def evaluate(resolved, model, state, *, split="test", names=None, specs=None,
             limit=None, batch_size=None, mesh=None, source=None, sanity=False,
             lipschitz=False, individual=False, state_path=None, log=None):
  """Robust accuracy under attacks (see `evaluation.evaluate`) on `split`.

  The attacks are `specs` (`{label: spec}`), or else those of the config's
  `eval.attacks` named in `names` (comma-separated, or "all"; default: the
  config's `eval.default`). `source`: an optional `(model, state)` to craft
  the examples on (transfer). With `sanity`, the report's "sanity" entry
  holds the checks of `jaxrobust.sanity` (on the first
  `sanity.SANITY_EXAMPLES` examples). With `lipschitz`, a spectrally
  normalised model also gets `certificates.lipschitz_certificate` (report
  key "lipschitz") at radius 0 and 1/4, 1/2 and 1 times the eps of every L2
  attack; for a randomized model it certifies the base classifier f,
  without noise. A randomized model is attacked with its fixed draws (EOT),
  and with fresh draws by attacks that ask for them (`Attack.stochastic`).
  """
  test_set = load_split(resolved, split)
  x, y = test_set.x, test_set.y
  if limit:
    checks.integer_at_least("limit", limit, 1)
    x, y = x[:limit], y[:limit]
  specs = specs or evaluation.select(resolved["eval"]["attacks"],
                                     names or resolved["eval"].get("default"))
  batch_size = batch_size or resolved["eval"]["batch_size"]
  apply_fn = models.inference_fn(model)
  key = jax.random.key(resolved["seed"])
  run = lambda specs, x, y, **kw: evaluation.evaluate(
      apply_fn, state.variables, x, y, specs, key=key, batch_size=batch_size, mesh=mesh,
      source=source and (models.inference_fn(source[0]), source[1].variables),
      stochastic_apply_fn=models.stochastic_fn(model), **kw)
  rep = run(specs, x, y, individual=individual, state_path=state_path, log=log)
  certified = bool(resolved["model"].get("spectral"))
  if sanity and source is None:
    subset = x[:sanity_lib.SANITY_EXAMPLES], y[:sanity_lib.SANITY_EXAMPLES]
    rep["sanity"] = (
        sanity_lib.model_checks(apply_fn, state.variables, *subset)
        + sanity_lib.attack_checks(rep, lambda s, **kw: run(s, *subset, **kw), specs,
                                   x.shape[1:], certified=certified))
  if lipschitz and certified:
    randomized = models.is_randomized(model)
    radii = sorted({0.0} | {f * r["eps"] for r in rep["results"] if r["norm"] == "l2"
                             for f in (0.25, 0.5, 1.0)})
    rep["lipschitz"] = certificates.lipschitz_certificate(
        models.inference_fn(model, base=True), jax.device_get(state.variables),
        x, y, radii, batch_size=batch_size)
    rep["lipschitz"]["of"] = ("the base classifier f (without noise)" if randomized
                              else "the model")
    if "sanity" in rep and not randomized and source is None:
      rep["sanity"] += sanity_lib.lipschitz_checks(rep, rep["lipschitz"])
  return rep
