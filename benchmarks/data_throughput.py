"""Images per second of the input pipeline alone against those of the PGD-7 training step.

`benchmarks/data_pipeline.py` runs it. A setting is the training step of a
config (`pgd_at:cifar10`, or `pgd_at:imagenet` at a stated size and model),
built as `train.py` builds it, on a `records:` data set; the pipeline is
`data.train_batches` with K grain workers, each batch made a global array on
the training mesh (`data.local_to_global`), as the training loop does before
its step. The pipeline read in this process and the step are timed in turns
(each round runs every side once, the first side rotating), so that a
shared machine's load falls on both; the step runs on batches read
beforehand, so its time holds no reading. A pipeline with grain workers is
timed in runs of its own, one after the other, from the moment its workers
start: its workers read ahead (grain's read-ahead buffers hundreds of
batches), so timed between the step's runs it would show batches made
while the step ran.
"""

import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from jaxrobust import data, parallel
from jaxrobust.configs import pgd_at
from jaxrobust.training import config as config_lib
from jaxrobust.training import step as training
from jaxrobust.training.state import initial_state


def cifar_config(records: Path, batch: int) -> ml_collections.ConfigDict:
  """`pgd_at:cifar10` (seed_cnn, PGD-7 at 8/255, crop and flip) on `records:<records>`."""
  config = pgd_at.get_config("cifar10")
  config.data.name = f"records:{records}"
  config.batch_size = batch
  return config


def imagenet_config(
  records: Path, batch: int, image_size: int, model: str
) -> ml_collections.ConfigDict:
  """`pgd_at:imagenet` on `records:<records>` (a JPEG conversion) at `image_size`, with
  the training attack made PGD-7 (L-inf 4/255, step 2.5 eps / 7) and the model `model`
  (`resnet50`: torchvision's ResNet-50, as the setting; else a registry name)."""
  config = pgd_at.get_config("imagenet")
  config.data.name = f"records:{records}"
  config.data.image_size = image_size
  config.batch_size = batch
  eps = config.train_attack.eps
  config.train_attack = dict(name="pgd", norm="linf", eps=eps, step_size=2.5 * eps / 7, steps=7)
  if model != "resnet50":
    config.model = dict(name=model)
  return config


class Setting:
  """The training step of a config and its training set, as `train.py` builds them."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
    self.config, self.mesh = config, mesh
    self.train_set = config_lib.load_split(config, "train")
    resolved = config_lib.resolve(config, self.train_set)
    model = config_lib.build_model(resolved, axis_name=parallel.BATCH_AXIS)
    tx = config_lib.make_optimizer(resolved)
    input_fn = training.make_input_fn(config.objective, config.get("train_attack"))
    self.step = training.make_train_step(
      model, tx, input_fn, mesh, augment=config_lib.make_augment(resolved)
    )
    self.state = initial_state(resolved, model, tx, mesh)
    self.key = jax.random.key(config.seed)
    self.batch = int(config.batch_size)

  def batches(self, workers: int) -> Any:
    """The training batches of step 0 on, read in `workers` grain workers."""
    x, y = self.train_set.x, self.train_set.y
    return data.train_batches(x, y, self.batch, seed=self.config.seed, workers=workers)

  def to_device(self, batch: tuple[np.ndarray, np.ndarray]) -> Any:
    """A host batch as the global arrays the step takes, ready."""
    return jax.block_until_ready(data.local_to_global(batch, self.mesh, self.batch))


class Side:
  """One timed side: `run()` handles `images` images."""

  def __init__(self, images: int, run: Callable[[], Any]) -> None:
    self.images, self.run = images, run


def pipeline_side(setting: Setting, workers: int, per_run: int) -> tuple[Side, Callable[[], None]]:
  """The pipeline with `workers` grain workers, `per_run` batches to the device per run.

  Returns:
    The side, and a function that stops its workers.
  """
  holder = {"it": setting.batches(workers)}

  def run() -> None:
    for _ in range(per_run):
      setting.to_device(next(holder["it"]))

  def close() -> None:
    holder.pop("it", None)  # grain's workers stop with their iterator

  return Side(per_run * setting.batch, run), close


def step_side(setting: Setting, rounds: int) -> Side:
  """The training step, one step per run, on `rounds` + 1 batches read beforehand."""
  batches = setting.batches(0)
  ready = [setting.to_device(next(batches)) for _ in range(rounds + 1)]
  turn = {"i": 0}

  def run() -> None:
    x, y = ready[turn["i"] % len(ready)]
    turn["i"] += 1
    setting.state, metrics = setting.step(setting.state, x, y, setting.key)
    jax.block_until_ready((setting.state, metrics))

  return Side(setting.batch, run)


def time_in_turns(sides: dict[str, Side], repeats: int) -> dict[str, Any]:
  """A warm-up run of each side, then `repeats` rounds, the first side rotating.

  Returns:
    name -> `{"warm_up_seconds", "seconds" (every timed run), "images_per_second"
    (images of a run over the median seconds)}`.
  """
  out: dict[str, Any] = {}
  for name, side in sides.items():
    start = time.perf_counter()
    side.run()
    out[name] = {"warm_up_seconds": time.perf_counter() - start, "seconds": []}
  order = list(sides)
  for i in range(repeats):
    turn = i % len(order)
    for name in order[turn:] + order[:turn]:
      start = time.perf_counter()
      sides[name].run()
      out[name]["seconds"].append(time.perf_counter() - start)
  for name, side in sides.items():
    out[name]["images_per_second"] = side.images / statistics.median(out[name]["seconds"])
  return out


def throughput(
  setting: Setting, workers: Sequence[int], per_run: int, repeats: int
) -> dict[str, Any]:
  """Images/s of the pipeline with each of `workers` grain workers and of the step.

  The step and the pipeline without workers are timed in turns; each
  pipeline with workers in runs of its own, its workers started just before
  (the warm-up run holds their start) and stopped after.

  Args:
    setting: the config's step and training set.
    workers: grain worker counts (0: read in this process).
    per_run: batches per timed pipeline run.
    repeats: timed runs per side.

  Returns:
    `{"batch", "pipeline": {K: timing}, "step": timing, "ratio": {K: pipeline
    images/s over the step's}}`, a timing as `time_in_turns` gives it.
  """
  turns = {"step": step_side(setting, repeats)}
  if 0 in workers:
    turns["pipeline_0"] = pipeline_side(setting, 0, per_run)[0]
  timed = time_in_turns(turns, repeats)
  for k in workers:
    if k:
      side, close = pipeline_side(setting, k, per_run)
      try:
        timed[f"pipeline_{k}"] = time_in_turns({"pipeline": side}, repeats)["pipeline"]
      finally:
        close()
  step = timed["step"]["images_per_second"]
  return {
    "batch": setting.batch,
    "pipeline": {k: timed[f"pipeline_{k}"] for k in workers},
    "step": timed["step"],
    "ratio": {k: timed[f"pipeline_{k}"]["images_per_second"] / step for k in workers},
  }
