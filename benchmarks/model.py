"""The benchmark's data and model: CIFAR-10 or digits, a model trained (and cached) here,
and each framework's mixed precision (`InDtype`, `torch_in_dtype`)."""

import argparse
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import LINF_EPS

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TRAIN_STEPS = {"small_cnn": 600, "seed_cnn": 800, "preact_resnet18": 60, "wide_resnet": 60}
# A third of the steps are natural training: adversarial training from scratch
# at eps 8/255 can leave the small CNN at chance (constant logits).
NATURAL_FRACTION = 1 / 3
TRAIN_BATCH = 128


def load_data(args: argparse.Namespace, jr: Any) -> tuple[Any, Any, str]:
  """(train, test, description): CIFAR-10 (JPEG copy) if present, else digits upscaled."""
  root = Path(args.data) if args.data else REPO.parent / "shared" / "data"
  tarballs = [root / "cifar10" / f"cifar10-{s}-jpeg.tar.gz" for s in ("train", "test")]
  if all(t.exists() for t in tarballs):
    name = f"folder:{root / 'cifar10'}/cifar10-{{split}}-jpeg.tar.gz"
    return (
      jr.data.load(name, "train"),
      jr.data.load(name, "test"),
      f"CIFAR-10 (JPEG copy) from {root / 'cifar10'}",
    )
  print(
    f"NOTE: no CIFAR-10 under {root / 'cifar10'}; using scikit-learn's digits "
    f"upscaled to 32x32x3 instead (accuracies are not CIFAR-10's)",
    flush=True,
  )
  import numpy as np  # pylint: disable=g-import-not-at-top

  def upscale(ds: Any) -> Any:
    x = np.repeat(np.repeat(np.repeat(ds.x, 4, axis=1), 4, axis=2), 3, axis=3)
    return jr.data.Dataset(np.ascontiguousarray(x), ds.y, ds.num_classes)

  return (
    upscale(jr.data.load("digits", "train")),
    upscale(jr.data.load("digits", "test")),
    "scikit-learn digits, 8x8 upscaled to 32x32x3 (no CIFAR-10 found)",
  )


def train_settings(args: argparse.Namespace) -> dict[str, Any]:
  """The settings of the benchmark's own training of `--model`."""
  steps = args.train_steps or DEFAULT_TRAIN_STEPS[args.model]
  return {
    "model": args.model,
    "steps": steps,
    "batch_size": TRAIN_BATCH,
    "seed": 0,
    "optimizer": {
      "name": "adam",
      "learning_rate": 1e-3,
      "schedule": "cosine",
      "warmup_steps": min(100, steps // 5),
      "weight_decay": 0.0,
    },
    # FGSM-RS (Wong et al. 2020, "Fast is better than free").
    "attack": {"name": "fgsm", "eps": LINF_EPS, "random_start": True, "step_size": 1.25 * LINF_EPS},
  }


def _cache_file(args: argparse.Namespace, jax: Any, tag: dict[str, Any]) -> Path:
  """Where the weights trained with the settings in `tag` are cached."""
  text = json.dumps({**tag, "jax": jax.__version__}, sort_keys=True)
  cache_dir = (
    Path(args.cache or os.environ.get("JAXROBUST_CACHE") or "~/.cache/jaxrobust").expanduser()
    / "bench"
  )
  return cache_dir / f"{args.model}-{hashlib.sha256(text.encode()).hexdigest()[:16]}.msgpack"


def _train(
  jax: Any, jr: Any, model: Any, tx: Any, template: Any, train_set: Any, settings: dict
) -> Any:
  """`model` trained from `template`: natural steps, then FGSM-RS steps."""
  # One device: on a heavily loaded machine the data-parallel step's all-reduce
  # over XLA:CPU host devices can stall past XLA's rendezvous timeout and abort
  # the process; training the benchmark's model needs no speed.
  mesh = jr.parallel.mesh(jax.devices()[:1])
  natural_steps = int(settings["steps"] * NATURAL_FRACTION)
  natural = jr.training.make_train_step(model, tx, jr.training.make_input_fn("natural"), mesh)
  adversarial = jr.training.make_train_step(
    model, tx, jr.training.make_input_fn("adversarial", settings["attack"]), mesh
  )
  state = jax.device_put(template, jr.parallel.replicated(mesh))
  key = jax.random.key(settings["seed"])
  start = time.perf_counter()
  for i, (xb, yb) in enumerate(
    jr.data.train_batches(train_set.x, train_set.y, TRAIN_BATCH, seed=settings["seed"])
  ):
    if i == settings["steps"]:
      break
    step = natural if i < natural_steps else adversarial
    state, metrics = step(state, *jr.data.to_devices((xb, yb), mesh), key)
    if (i + 1) % 100 == 0:
      print(
        f"  step {i + 1}: loss {float(metrics['loss']):.3f}, "
        f"training accuracy {float(metrics['accuracy']):.3f}",
        flush=True,
      )
  variables = jax.device_get(state.variables)
  print(f"  trained in {time.perf_counter() - start:.0f} s", flush=True)
  return variables


def trained_model(
  args: argparse.Namespace, jax: Any, jr: Any, train_set: Any, data_description: str
) -> tuple[Any, Any, str]:
  """(model, variables, description) for the benchmark."""
  import flax.serialization  # pylint: disable=g-import-not-at-top

  if args.workdir:
    resolved, model, state = jr.experiment.restore(args.workdir)
    variables = jax.device_get(state.variables)
    return (
      model,
      variables,
      f"{resolved['model']['name']} from --workdir {args.workdir} (step {int(state.step)})",
    )

  settings = train_settings(args)
  mean, std = jr.data.channel_stats(train_set.x)
  model = jr.models.create(
    args.model,
    num_classes=train_set.num_classes,
    mean=tuple(float(m) for m in mean),
    std=tuple(float(s) for s in std),
  )
  tag = {
    "settings": settings,
    "natural_fraction": NATURAL_FRACTION,
    "data": data_description,
    "n": int(len(train_set.x)),
    "mean": [round(float(m), 6) for m in mean],
  }
  cache_file = _cache_file(args, jax, tag)
  tx = jr.training.make_optimizer(settings["optimizer"], settings["steps"])
  template = jax.device_get(
    jr.training.init_state(model, tx, train_set.x.shape[1:], jax.random.key(settings["seed"]))
  )
  description = (
    f"{args.model} trained here with jaxrobust: {int(settings['steps'] * NATURAL_FRACTION)} "
    f"natural steps, then FGSM-RS adversarial training (eps 8/255) to step "
    f"{settings['steps']}, batch {TRAIN_BATCH}, Adam"
  )
  if cache_file.exists():
    variables = flax.serialization.from_bytes(template.variables, cache_file.read_bytes())
    return model, variables, description + f" (cached in {cache_file})"

  print(f"training the benchmark's model ({description}) ...", flush=True)
  variables = _train(jax, jr, model, tx, template, train_set, settings)
  cache_file.parent.mkdir(parents=True, exist_ok=True)
  tmp = cache_file.with_suffix(".tmp")
  tmp.write_bytes(flax.serialization.to_bytes(variables))
  os.replace(tmp, cache_file)
  return model, variables, description


class InDtype:
  """A Flax model computing in `dtype` (mixed precision), by the library's rule.

  `apply` is `jaxrobust.models.precision.apply_in`: the parameters, the input
  and floating-point array arguments in `dtype`, every floating-point output
  (logits, updated batch statistics) float32, so the stored weights, batch
  statistics, optimizer state and an attack's iterates stay float32 and
  gradients reach them in float32. Everything else is the model's (`init`,
  its fields). `train.py --config.precision=bfloat16` trains by the same rule
  (`jaxrobust.models.precision.with_precision`).
  """

  def __init__(self, model: Any, dtype: Any) -> None:
    self.model, self.dtype = model, dtype

  def apply(self, variables: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
    """`model.apply` computing in `dtype`, its floating-point outputs float32."""
    from jaxrobust.models import precision  # pylint: disable=g-import-not-at-top

    return precision.apply_in(self.model, variables, x, *args, compute_dtype=self.dtype, **kwargs)

  def __getattr__(self, name: str) -> Any:
    return getattr(self.model, name)


def torch_in_dtype(torch: Any, net: Any, dtype: Any) -> Any:
  """`net` under `torch.autocast(dtype)` (PyTorch's mixed precision: its own
  list of operations in `dtype`), logits returned in float32."""

  class Autocast(torch.nn.Module):
    def __init__(self) -> None:
      super().__init__()
      self.net = net

    def forward(self, x: Any) -> Any:
      with torch.autocast(device_type=x.device.type, dtype=dtype):
        return self.net(x).float()

  return Autocast()
