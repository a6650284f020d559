"""A run's config: checked, resolved with the facts of its data, and turned into
the model, the optimizer and the data splits it names."""

from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import optax
from flax import linen as nn

from jaxrobust import checks, data, evaluation, models
from jaxrobust.models import precision as precision_lib
from jaxrobust.training import augment as augment_lib
from jaxrobust.training import guard
from jaxrobust.training import selection
from jaxrobust.training import step as training


def resolve(config: ml_collections.ConfigDict, train_set: Any) -> dict[str, Any]:
  """The config as a plain dict plus the facts of its training data.

  Args:
    config: the run's config.
    train_set: its training `data.Dataset`.

  Returns:
    `config.to_dict()` with `dataset`: classes, input shape, per-channel mean
    and std, and the number of training examples.
  """
  resolved = config.to_dict()
  mean, std = data.channel_stats(train_set.x)
  resolved["dataset"] = {
    "num_classes": int(train_set.num_classes),
    "input_shape": list(train_set.x.shape[1:]),
    "mean": list(mean),
    "std": list(std),
    "train_examples": int(len(train_set.x)),
  }
  return resolved


def precision(resolved_or_config: Any) -> precision_lib.Precision:
  """The run's `precision` (float32 for a run whose config has none), checked."""
  return precision_lib.check_precision(resolved_or_config.get("precision", precision_lib.DEFAULT))


def build_model(resolved: Mapping[str, Any], axis_name: str | None = None) -> nn.Module:
  """The model of a resolved config (`axis_name`: BatchNorm's device axis).

  It computes in the run's `precision` (`models.precision.with_precision`),
  in training, in the training's evaluations and in `evaluate.restore`'s model.
  """
  settings = dict(resolved["model"])
  ds = resolved["dataset"]
  model = models.create(
    settings.pop("name"),
    num_classes=ds["num_classes"],
    mean=ds["mean"],
    std=ds["std"],
    axis_name=axis_name,
    **settings,
  )
  return precision_lib.with_precision(model, precision=precision(resolved))


def schedule_length(resolved: Mapping[str, Any]) -> tuple[int, int]:
  """(steps per epoch, total steps) of a run."""
  cfg = resolved["data"]
  steps_per_epoch = data.steps_per_epoch(
    resolved["dataset"]["train_examples"],
    resolved["batch_size"],
    cfg.get("extra_fraction", 0.0) if cfg.get("extra") else 0.0,
  )
  return steps_per_epoch, resolved["epochs"] * steps_per_epoch


def make_optimizer(resolved: Mapping[str, Any]) -> optax.GradientTransformation:
  """The optimizer of a resolved config, over the run's steps."""
  return training.make_optimizer(resolved["optimizer"], schedule_length(resolved)[1])


def make_augment(resolved_or_config: Any) -> augment_lib.Augment | None:
  """The training augmentation of `data.augment` (`augment.create`), or None."""
  cfg = resolved_or_config["data"]
  return augment_lib.create(
    cfg.get("augment", "none"),
    padding=cfg.get("crop_padding", 4),
    padding_mode=cfg.get("padding_mode", "zero"),
  )


def load_split(resolved_or_config: Any, split: str) -> Any:
  """Split `split` of the data set the config names."""
  cfg = resolved_or_config["data"]
  return data.load(
    cfg["name"], split, data_dir=cfg.get("data_dir") or None, image_size=_image_size(cfg)
  )


def _image_size(cfg: Any) -> int:
  """`data.image_size`: the side of ImageNet's crops (224 when unset)."""
  size = cfg.get("image_size", 224)
  checks.integer_at_least("data.image_size", size, 1)
  return size


def check_config(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
  """Checks the settings that need no data, before anything is loaded or written."""
  checks.integer_at_least("batch_size", config.batch_size, 1)
  training.check_divisible(config.batch_size, mesh)
  checks.integer_at_least("epochs", config.epochs, 1)
  checks.integer_at_least("seed", config.seed, 0)
  precision(config)
  data.check_extra_fraction(config.data.get("extra_fraction", 0.0))
  checks.require(
    config.data.get("extra") or not config.data.get("extra_fraction", 0.0),
    "data.extra_fraction needs data.extra, the data set to draw that share of every batch from",
  )
  checks.integer_at_least("data.workers", config.data.get("workers", 0), 0)
  for name in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
    checks.integer_at_least(name, config[name], 1)
  training.make_optimizer(config.optimizer, total_steps=1)
  make_augment(config)
  training.check_ema(config.get("ema", 0.0))
  training.check_awp(config.get("awp", 0.0))
  checks.integer_at_least("awp_warmup", config.get("awp_warmup", 0), 0)
  selection.settings(config.eval, None)
  guard.settings(config.get("overfit_guard"), config.get("train_attack"))
  training.make_input_fn(
    config.objective, config.get("train_attack"), settings=config.get("objective_settings")
  )
  # train.py evaluates with these at the end: refuse them now, not after training.
  checks.integer_at_least("eval.batch_size", config.eval.batch_size, 1)
  checks.integer_at_least("eval.limit", config.eval.limit, 0)
  evaluation.build_attacks(config.eval.attacks)
  for names in (config.eval.default, config.eval.get("after_training")):
    evaluation.select(config.eval.attacks, names)


def load_extra(resolved: Any) -> data.Dataset | None:
  """The training split of the mixture's second data set (`data.extra`), or None."""
  cfg = resolved["data"]
  if not cfg.get("extra"):
    return None
  return data.load(
    cfg["extra"], "train", data_dir=cfg.get("data_dir") or None, image_size=_image_size(cfg)
  )
