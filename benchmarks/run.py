"""jaxrobust against PyTorch (torchattacks), side by side, on the same model and weights.

  pip install -r requirements-bench.txt && pip install --no-deps torchattacks==3.5.1
  python benchmarks/run.py                                  # small CNN, batch 256, every row
  python benchmarks/run.py --model seed_cnn --rows pgd_linf,smoothing --repeats 7
  python benchmarks/run.py --workdir runs/pgd_at --json bench.json
  python benchmarks/run.py --model seed_cnn --repeats 3 --rows seed_network,user_model,preact_resnet18,seed_training_step,preact_training_step,autoattack,pgd_memory

For each row it prints the throughput of jaxrobust and of the PyTorch reference
(images, or noise draws, per second: the median over `--repeats` timed runs
after one warm-up run each, the two measured alternately in one process so
that a shared machine's load falls on both), their ratio, and an agreement
column: the accuracy of the model under each implementation's attack (or the
training accuracy, or the smoothed classifier's accuracy) on the same images,
so a faster but weaker attack would show. Both sides use the same batch, the
same number of steps, the same hyper-parameters and the same weights: the
PyTorch model is converted from the Flax one (`jaxrobust.interop.to_torch`).

The model is trained in the benchmark itself with jaxrobust (FGSM-RS
adversarial training, so that accuracies under attack are neither 0 nor the
clean accuracy) on CIFAR-10 when `../shared/data/cifar10` (relative to the
repository root, or `--data`) holds it, else on scikit-learn's digits
upscaled to 32x32x3; the trained weights are cached. `--workdir` uses a run of
`train.py` instead.

Attack rows also print the work they do, as XLA's cost analysis counts it
(one forward pass and one input-gradient pass per step and image), and the
fraction of the single-precision matrix-product ceiling measured in the same
run (a large `jnp.dot`, timed alongside every row).

On a GPU: install jax with CUDA and a CUDA build of torch, and run the same
command; rows then run on the first GPU (jaxrobust on every local GPU, split
over the batch) and `--devices` is ignored.
"""

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))  # `python benchmarks/run.py` from a clone

from jaxrobust import parallel  # pylint: disable=wrong-import-position  (does not start JAX)

ROWS = (
  "pgd_linf",
  "pgd_l2",
  "cw_l2",
  "mi_fgsm",
  "di_fgsm",
  "pgd_at_step",
  "smoothing",
  "eval_early_stop",
  "loop_forms",
  "loop_unrolled",
  "user_model",
  "seed_network",
  "preact_resnet18",
  "seed_training_step",
  "preact_training_step",
  "autoattack",
  "pgd_memory",
)
MODELS = ("small_cnn", "seed_cnn", "preact_resnet18", "wide_resnet")  # wide_resnet: WRN-28-10
DTYPES = ("float32", "bfloat16")
# The rows on the benchmark's own model (`--model`), which `--dtypes` can run in
# bfloat16; the others time fixed float32 settings.
DTYPE_ROWS = (
  "pgd_linf",
  "pgd_l2",
  "cw_l2",
  "mi_fgsm",
  "di_fgsm",
  "pgd_at_step",
  "smoothing",
  "autoattack",
)
LINF_EPS, L2_EPS = 8 / 255, 0.5
SIGMA = 0.25


def parse_args(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--model", choices=MODELS, default="small_cnn")
  p.add_argument(
    "--batch-size",
    type=int,
    default=256,
    help="images per attack call and per training step (default 256)",
  )
  p.add_argument(
    "--devices",
    type=int,
    default=None,
    help="XLA:CPU host devices (default: one per core; ignored when XLA_FLAGS is set)",
  )
  p.add_argument("--rows", default="all", help=f"comma-separated rows, or 'all': {', '.join(ROWS)}")
  p.add_argument(
    "--dtypes",
    default="float32",
    help="comma-separated compute dtypes (float32, bfloat16): each row of "
    f"{', '.join(DTYPE_ROWS)} runs once per dtype, both sides in mixed precision "
    "(weights, optimizer and attack iterates stay float32)",
  )
  p.add_argument("--repeats", type=int, default=5, help="timed runs per side and row (>= 5)")
  p.add_argument("--json", default=None, help="also write the results to this JSON file")
  p.add_argument(
    "--workdir", default=None, help="use the model of a train.py run instead of training one"
  )
  p.add_argument(
    "--data",
    default=None,
    help="folder holding cifar10/cifar10-{train,test}-jpeg.tar.gz "
    "(default: ../shared/data relative to the repository root)",
  )
  p.add_argument(
    "--train-steps",
    type=int,
    default=None,
    help="steps of the benchmark's own training (default: per model)",
  )
  p.add_argument(
    "--smoothing-draws",
    type=int,
    default=1000,
    help="noise draws per image in the smoothing row (default 1000)",
  )
  p.add_argument(
    "--smoothing-images",
    type=int,
    default=4,
    help="images per timed run in the smoothing row (default 4)",
  )
  p.add_argument(
    "--smoothing-batch",
    type=int,
    default=1000,
    help="forward passes per chunk in the smoothing row, both sides",
  )
  p.add_argument(
    "--user-images",
    type=int,
    default=256,
    help="images per timed run in the user_model row (batches of 256)",
  )
  p.add_argument(
    "--seed-images",
    type=int,
    default=1000,
    help="images per timed run in the seed_network row (batches of 500)",
  )
  p.add_argument(
    "--preact-images",
    type=int,
    default=128,
    help="images per timed run in the preact_resnet18 row (batches of 64)",
  )
  p.add_argument(
    "--autoattack-images",
    type=int,
    default=200,
    help="the first N test images of the autoattack row",
  )
  p.add_argument(
    "--cache",
    default=None,
    help="where trained weights are cached (default: $JAXROBUST_CACHE "
    "or ~/.cache/jaxrobust, under bench/)",
  )
  args = p.parse_args(argv)
  rows = (
    ROWS
    if args.rows in ("all", "")
    else tuple(r.strip() for r in args.rows.split(",") if r.strip())
  )
  unknown = [r for r in rows if r not in ROWS]
  if unknown:
    p.error(f"unknown row {unknown[0]!r}; rows: {', '.join(ROWS)}")
  args.rows = rows
  args.dtypes = tuple(d.strip() for d in args.dtypes.split(",") if d.strip())
  for dtype in args.dtypes or ("",):
    if dtype not in DTYPES:
      p.error(f"unknown dtype {dtype!r}; dtypes: {', '.join(DTYPES)}")
  fixed = [r for r in rows if r not in DTYPE_ROWS]
  if args.dtypes != ("float32",) and fixed:
    p.error(
      f"row {fixed[0]!r} runs in float32 only; --dtypes {','.join(args.dtypes)} "
      f"applies to {', '.join(DTYPE_ROWS)}"
    )
  if args.repeats < 1:
    p.error("--repeats must be >= 1 (5 or more for the medians the README reports)")
  if args.batch_size < 1:
    p.error("--batch-size must be >= 1")
  return args


# ----------------------------------------------------------------------------
# The machine.


def cpu_name():
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def cpu_flags():
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("flags"):
        flags = set(line.split(":", 1)[1].split())
        return [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
  except OSError:
    pass
  return []


def memory_gib():
  try:
    return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
  except (ValueError, OSError):
    return None


def machine_description(jax, torch, torchattacks, torch_threads):
  cores = len(os.sched_getaffinity(0))
  devices = jax.devices()
  return {
    "cpu": cpu_name(),
    "cpu_features": cpu_flags(),
    "cores": cores,
    "memory_gib": memory_gib(),
    "os": platform.platform(),
    "python": platform.python_version(),
    "jax": jax.__version__,
    "jax_backend": jax.default_backend(),
    "jax_devices": f"{len(devices)} x {devices[0].device_kind}",
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "torch": torch.__version__,
    "torchattacks": torchattacks.__version__,
    "torch_threads": torch_threads,
    "torch_device": "cuda" if torch.cuda.is_available() else "cpu",
    "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
  }


# ----------------------------------------------------------------------------
# Data and model.


def load_data(args, jr):
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

  def upscale(ds):
    x = np.repeat(np.repeat(np.repeat(ds.x, 4, axis=1), 4, axis=2), 3, axis=3)
    return jr.data.Dataset(np.ascontiguousarray(x), ds.y, ds.num_classes)

  return (
    upscale(jr.data.load("digits", "train")),
    upscale(jr.data.load("digits", "test")),
    "scikit-learn digits, 8x8 upscaled to 32x32x3 (no CIFAR-10 found)",
  )


DEFAULT_TRAIN_STEPS = {"small_cnn": 600, "seed_cnn": 800, "preact_resnet18": 60, "wide_resnet": 60}
# Adversarial training from scratch at eps 8/255 left the small CNN at chance
# (constant logits) in trials here; a third of the steps of natural training first
# avoids that.
NATURAL_FRACTION = 1 / 3
TRAIN_BATCH = 128


def train_settings(args):
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


def trained_model(args, jax, jr, train_set, data_description):
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
  tag = json.dumps(
    {
      "settings": settings,
      "natural_fraction": NATURAL_FRACTION,
      "data": data_description,
      "n": int(len(train_set.x)),
      "jax": jax.__version__,
      "mean": [round(float(m), 6) for m in mean],
    },
    sort_keys=True,
  )
  cache_dir = (
    Path(args.cache or os.environ.get("JAXROBUST_CACHE") or "~/.cache/jaxrobust").expanduser()
    / "bench"
  )
  cache_file = cache_dir / f"{args.model}-{hashlib.sha256(tag.encode()).hexdigest()[:16]}.msgpack"
  # One device: on a heavily loaded machine the data-parallel step's all-reduce
  # over XLA:CPU host devices once stalled past XLA's 40 s rendezvous timeout
  # and aborted the process; training the benchmark's model needs no speed.
  mesh = jr.parallel.mesh(jax.devices()[:1])
  tx = jr.training.make_optimizer(settings["optimizer"], settings["steps"])
  template = jax.device_get(
    jr.training.init_state(model, tx, train_set.x.shape[1:], jax.random.key(settings["seed"]))
  )
  natural_steps = int(settings["steps"] * NATURAL_FRACTION)
  description = (
    f"{args.model} trained here with jaxrobust: {natural_steps} natural steps, "
    f"then FGSM-RS adversarial training (eps 8/255) to step {settings['steps']}, "
    f"batch {TRAIN_BATCH}, Adam"
  )
  if cache_file.exists():
    variables = flax.serialization.from_bytes(template.variables, cache_file.read_bytes())
    return model, variables, description + f" (cached in {cache_file})"

  print(f"training the benchmark's model ({description}) ...", flush=True)
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
  cache_dir.mkdir(parents=True, exist_ok=True)
  tmp = cache_file.with_suffix(".tmp")
  tmp.write_bytes(flax.serialization.to_bytes(variables))
  os.replace(tmp, cache_file)
  return model, variables, description


class InDtype:
  """A Flax model computing in `dtype` (mixed precision): `apply` casts the
  floating-point variables and the input to `dtype` and every floating-point
  output back to float32, so the stored weights, batch statistics, optimizer
  state and an attack's iterates stay float32 and gradients reach them in
  float32. Everything else is the model's (`init`, its fields)."""

  def __init__(self, model, dtype):
    self.model, self.dtype = model, dtype

  def apply(self, variables, x, *args, **kwargs):
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

    def cast(dtype):
      return lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a

    into = cast(self.dtype)
    out = self.model.apply(jax.tree.map(into, variables), into(x), *args, **kwargs)
    return jax.tree.map(cast(jnp.float32), out)

  def __getattr__(self, name):
    return getattr(self.model, name)


def torch_in_dtype(torch, net, dtype):
  """`net` under `torch.autocast(dtype)` (PyTorch's mixed precision: its own
  list of operations in `dtype`), logits returned in float32."""

  class Autocast(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.net = net

    def forward(self, x):
      with torch.autocast(device_type=x.device.type, dtype=dtype):
        return self.net(x).float()

  return Autocast()


# ----------------------------------------------------------------------------
# Timing.


def median(values):
  return statistics.median(values) if values else float("nan")


class MatmulCeiling:
  """The single-precision matrix-product throughput the machine reaches now.

  One sample is the best of a `jnp.dot` of two n x n matrices on one device
  and the same product with its rows split over every device (XLA:CPU may
  use the cores better either way), in FLOP/s (2 n^3 per product).
  """

  def __init__(self, jax, jnp, mesh, n=2048):
    self.flops = 2 * n**3
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    self.dot = jax.jit(jnp.dot)
    self.pairs = [
      (jax.device_put(a, jax.devices()[0]), jax.device_put(b, jax.devices()[0])),
      (
        jax.device_put(a, parallel.batch_sharding(mesh)),
        jax.device_put(b, parallel.replicated(mesh)),
      ),
    ]
    for pair in self.pairs:
      self.dot(*pair).block_until_ready()
      self.dot(*pair).block_until_ready()

  def sample(self):
    best = 0.0
    for pair in self.pairs:
      start = time.perf_counter()
      self.dot(*pair).block_until_ready()
      best = max(best, self.flops / (time.perf_counter() - start))
    return best


def torch_synchronize():
  """Waits for queued CUDA work (PyTorch runs asynchronously on a GPU)."""
  import torch  # pylint: disable=g-import-not-at-top

  if torch.cuda.is_available():
    torch.cuda.synchronize()


def time_alternately(jax_run, torch_run, repeats, ceiling):
  """Warm-up, then `repeats` timed runs of each side, alternating which goes first.

  `jax_run(i)` and `torch_run(i)` run on input batch i and return their
  outputs, jax_run's blocked until ready. Run 0 is the warm-up (compilation
  for jaxrobust), excluded from the times.
  Returns (jax seconds, torch seconds, ceiling samples, jax outputs, torch
  outputs, jaxrobust's compile seconds: its warm-up run minus its median run).
  """
  run_torch = torch_run

  def torch_run(i):  # pylint: disable=function-redefined
    out = run_torch(i)
    torch_synchronize()
    return out

  start = time.perf_counter()
  jax_outputs = [jax_run(0)]
  warm_up = time.perf_counter() - start
  torch_outputs = [torch_run(0)]
  jax_times, torch_times, ceilings = [], [], []
  for i in range(1, repeats + 1):
    order = [("jax", jax_run), ("torch", torch_run)]
    if i % 2 == 0:
      order.reverse()
    for side, run in order:
      start = time.perf_counter()
      out = run(i)
      seconds = time.perf_counter() - start
      (jax_times if side == "jax" else torch_times).append(seconds)
      (jax_outputs if side == "jax" else torch_outputs).append(out)
    ceilings.append(ceiling.sample())
  compile_seconds = warm_up - median(jax_times)
  return jax_times, torch_times, ceilings, jax_outputs, torch_outputs, compile_seconds


# ----------------------------------------------------------------------------
# The benchmark.


class Bench:
  """Everything the rows share: model, weights, data, both frameworks, the mesh."""

  def __init__(self, args, jax, jnp, np, torch, torchattacks, jr, torch_models):
    self.args, self.jax, self.jnp, self.np = args, jax, jnp, np
    self.torch, self.torchattacks, self.jr, self.tm = torch, torchattacks, jr, torch_models
    self.mesh = jr.parallel.mesh()
    self.devices = self.mesh.devices.size
    self.batch = args.batch_size
    if self.batch % self.devices:
      raise SystemExit(
        f"--batch-size {self.batch} is not divisible by the "
        f"{self.devices} devices; choose a multiple of {self.devices}"
      )
    self.torch_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    self.notes = []

  def setup(self):
    jax, jr, np = self.jax, self.jr, self.np
    train, test, self.data_description = load_data(self.args, jr)
    self.train_set, self.test_set = train, test
    self.model, variables, self.model_description = trained_model(
      self.args, jax, jr, train, self.data_description
    )
    self.variables = jax.device_put(variables, jr.parallel.replicated(self.mesh))
    self.input_hw = tuple(test.x.shape[1:3])
    self.float32_net = self.tm.to_torch(self.model, variables, self.input_hw).to(self.torch_device)
    for p in self.float32_net.parameters():
      p.requires_grad_(False)  # attacks need input gradients only
    batch_spec = jr.parallel.batch_sharding(self.mesh)
    self.batch_spec = batch_spec
    # Agreement is judged by the float32 model, whatever dtype attacked it.
    self.predict = jax.jit(lambda v, x: jnp_argmax(self.jnp, self.model.apply(v, x, train=False)))
    self.use_dtype("float32")
    # Test batches: batch i of every row is the same images for both sides.
    n_batches = self.args.repeats + 1
    need = n_batches * self.batch
    idx = np.random.default_rng(0).permutation(len(test.x))
    idx = np.resize(idx, need)  # wraps around on a small test set
    self.x = test.x[idx].reshape(n_batches, self.batch, *test.x.shape[1:])
    self.y = test.y[idx].reshape(n_batches, self.batch)
    self.x_dev = [jax.device_put(x, batch_spec) for x in self.x]
    self.y_dev = [jax.device_put(y, batch_spec) for y in self.y]
    self.x_torch = [self.tm.nhwc_to_nchw(x).to(self.torch_device) for x in self.x]
    self.y_torch = [self.torch.from_numpy(y.astype(np.int64)).to(self.torch_device) for y in self.y]
    self.clean_correct = np.concatenate(
      [np.asarray(self.predict(self.variables, x)) == y for x, y in zip(self.x_dev, self.y)]
    )
    self.ceiling = MatmulCeiling(jax, self.jnp, self.mesh)
    self.forward_flops, self.step_flops = self.flops_per_image(self.apply, variables, self.batch)

  def use_dtype(self, dtype):
    """The rows that follow compute in `dtype` (`in_dtype`): `self.apply` and
    `self.net`, the benchmark's model on each side."""
    self.dtype = dtype
    model = self.in_dtype(self.model)
    self.apply = lambda v, x: model.apply(v, x, train=False)
    self.net = self.torch_in_dtype(self.float32_net)

  def in_dtype(self, model):
    return model if self.dtype == "float32" else InDtype(model, getattr(self.jnp, self.dtype))

  def torch_in_dtype(self, net):
    if self.dtype == "float32":
      return net
    return torch_in_dtype(self.torch, net, getattr(self.torch, self.dtype))

  # -- helpers ---------------------------------------------------------------

  def flops_per_image(self, apply, variables, batch):
    """XLA's count of (one forward pass, one forward and input-gradient pass)
    per image, at the per-device share of `batch`."""
    jax, np = self.jax, self.np
    per = batch // self.devices
    x1 = jax.ShapeDtypeStruct((per, *self.test_set.x.shape[1:]), np.float32)
    forward = jax.jit(apply).lower(variables, x1).cost_analysis()
    grad = (
      jax.jit(lambda v, x: jax.grad(lambda x: apply(v, x).sum())(x))
      .lower(variables, x1)
      .cost_analysis()
    )
    return float(forward["flops"]) / per, float(grad["flops"]) / per

  def example_keys(self, key, n):
    return self.jax.vmap(self.jax.random.fold_in, (None, 0))(key, self.jnp.arange(n))

  def sharded_attack(self, attack):
    """jit(x, y, key -> x_adv) over the mesh, example i with key fold_in(key, i)."""
    jax, jr = self.jax, self.jr
    P = jax.sharding.PartitionSpec
    batch = P(jr.parallel.BATCH_AXIS)
    apply = self.apply

    def device_attack(variables, x, y, keys):
      return attack(lambda xb: apply(variables, xb), x, y, keys)

    mapped = jr.parallel.data_parallel(
      device_attack, self.mesh, in_specs=(P(), batch, batch, batch), out_specs=batch
    )
    return jax.jit(lambda v, x, y, key: mapped(v, x, y, self.example_keys(key, x.shape[0])))

  def accuracy_of(self, x_advs, nchw=False):
    """Accuracy of the model (jaxrobust's, the same weights) on adversarial batches 0..R."""
    np = self.np
    correct = []
    for i, x_adv in enumerate(x_advs):
      if nchw:
        x_adv = self.tm.nchw_to_nhwc(x_adv)
      pred = np.asarray(
        self.predict(
          self.variables, self.jax.device_put(np.asarray(x_adv, np.float32), self.batch_spec)
        )
      )
      correct.append(pred == self.y[i])
    return float(np.mean(np.concatenate(correct)))

  def max_perturbation(self, x_advs, norm, nchw=False):
    np = self.np
    worst = 0.0
    for i, x_adv in enumerate(x_advs):
      x_adv = self.tm.nchw_to_nhwc(x_adv) if nchw else np.asarray(x_adv)
      d = (x_adv - self.x[i]).reshape(self.batch, -1)
      worst = max(
        worst, float(np.abs(d).max() if norm == "linf" else np.sqrt((d**2).sum(-1)).max())
      )
    return worst

  # -- rows ------------------------------------------------------------------

  def attack_row(self, name, label, jr_attack, torch_attack, steps, norm=None, eps=None):
    jax = self.jax
    run_jax_attack = self.sharded_attack(jr_attack)
    base_key = jax.random.key(1234)

    def jax_run(i):
      out = run_jax_attack(
        self.variables, self.x_dev[i], self.y_dev[i], jax.random.fold_in(base_key, i)
      )
      return out.block_until_ready()

    def torch_run(i):
      self.torch.manual_seed(i)
      return torch_attack(self.x_torch[i], self.y_torch[i])

    jt, tt, ceil, jo, to, compile_s = time_alternately(
      jax_run, torch_run, self.args.repeats, self.ceiling
    )
    flops = steps * self.step_flops * self.batch
    row = self.row(
      name, label, jt, tt, ceil, self.batch, "images/s", flops, flops, compile_seconds=compile_s
    )
    row["agreement"] = {
      "jaxrobust": self.accuracy_of(jo),
      "pytorch": self.accuracy_of(to, nchw=True),
      "what": "accuracy under the attack",
      "examples": len(jo) * self.batch,
    }
    if norm is not None:
      row["max_perturbation"] = {
        "jaxrobust": self.max_perturbation(jo, norm),
        "pytorch": self.max_perturbation(to, norm, nchw=True),
        "norm": norm,
        "eps": eps,
      }
    return row

  def row(
    self,
    name,
    label,
    jax_times,
    torch_times,
    ceilings,
    work,
    unit,
    jax_flops,
    torch_flops,
    *,
    compile_seconds,
  ):
    jax_rate, torch_rate = work / median(jax_times), work / median(torch_times)
    ceiling = median(ceilings)
    out = {
      "row": name,
      "label": label,
      "unit": unit,
      "work_per_run": work,
      "jaxrobust": jax_rate,
      "pytorch": torch_rate,
      "ratio": jax_rate / torch_rate,
      "jaxrobust_seconds": jax_times,
      "pytorch_seconds": torch_times,
      "matmul_ceiling_flops": ceiling,
      "compile_seconds": compile_seconds,
    }
    if jax_flops:
      out["gflop_per_run"] = jax_flops / 1e9
      out["jaxrobust_ceiling_fraction"] = jax_flops / median(jax_times) / ceiling
      out["pytorch_ceiling_fraction"] = torch_flops / median(torch_times) / ceiling
    return out

  def pgd_linf(self):
    jr, ta = self.jr, self.torchattacks
    steps, alpha = 10, 2 / 255
    return self.attack_row(
      "pgd_linf",
      "PGD-10 L-inf (eps 8/255, step 2/255, random start)",
      jr.attacks.pgd(norm="linf", eps=LINF_EPS, step_size=alpha, steps=steps),
      ta.PGD(self.net, eps=LINF_EPS, alpha=alpha, steps=steps, random_start=True),
      steps,
      "linf",
      LINF_EPS,
    )

  def loop_forms(self):
    """jaxrobust's PGD-10 in its default loop form (a `fori_loop` whose
    model and gradients go through `jaxrobust.fastpath.fast`) against the same
    `fori_loop` without that transform, in the reference column: what the
    transform is worth on this backend (it is the identity off CPU)."""
    return self._loop_row("loop_forms", "plain fori_loop, no fast path", plain=True)

  def loop_unrolled(self):
    """The default loop form against the same attack unrolled (`unroll=True`),
    in the reference column."""
    return self._loop_row("loop_unrolled", "unrolled", unroll=True)

  def _loop_row(self, name, reference, *, unroll=False, plain=False):
    jax, jr = self.jax, self.jr
    steps, alpha = 10, 2 / 255
    key = jax.random.key(1234)

    def timed(unroll, plain):
      attack = self.sharded_attack(
        jr.attacks.pgd(norm="linf", eps=LINF_EPS, step_size=alpha, steps=steps, unroll=unroll)
      )
      run = lambda i: attack(
        self.variables, self.x_dev[i], self.y_dev[i], jax.random.fold_in(key, i)
      ).block_until_ready()
      if plain:  # compile (trace) the attack once with the fast path switched off
        with jr.fastpath.disabled():
          run(0)
      return run

    jt, tt, ceil, jo, to, compile_s = time_alternately(
      timed(False, False), timed(unroll, plain), self.args.repeats, self.ceiling
    )
    flops = steps * self.step_flops * self.batch
    row = self.row(
      name,
      f"PGD-10 L-inf, jaxrobust default (fori_loop) vs {reference} (in the PyTorch column)",
      jt,
      tt,
      ceil,
      self.batch,
      "images/s",
      flops,
      flops,
      compile_seconds=compile_s,
    )
    row["agreement"] = {
      "jaxrobust": self.accuracy_of(jo),
      "pytorch": self.accuracy_of(to),
      "what": "accuracy under the attack",
      "examples": len(jo) * self.batch,
    }
    return row

  def pgd_l2(self):
    jr, ta = self.jr, self.torchattacks
    steps, alpha = 10, 2.5 * L2_EPS / 10
    return self.attack_row(
      "pgd_l2",
      f"PGD-10 L2 (eps {L2_EPS}, step {alpha:g}, random start)",
      jr.attacks.pgd(norm="l2", eps=L2_EPS, step_size=alpha, steps=steps),
      ta.PGDL2(self.net, eps=L2_EPS, alpha=alpha, steps=steps, random_start=True),
      steps,
      "l2",
      L2_EPS,
    )

  def cw_l2(self):
    jr, ta = self.jr, self.torchattacks
    steps = 100
    forward_calls = []
    hook = self.net.register_forward_hook(lambda *_: forward_calls.append(1))
    try:
      row = self.attack_row(
        "cw_l2",
        "C&W-L2, 100 Adam steps (lr 0.01), c = 1, 1 search step",
        jr.attacks.cw_l2(steps=steps, binary_search_steps=1, c=1.0, kappa=0.0, lr=0.01),
        ta.CW(self.net, c=1.0, kappa=0.0, steps=steps, lr=0.01),
        steps,
      )
    finally:
      hook.remove()
    # torchattacks' CW calls the model once per step (and only there).
    torch_steps = len(forward_calls) / (self.args.repeats + 1)
    row["pytorch_ceiling_fraction"] *= torch_steps / steps
    row["pytorch_steps"] = torch_steps
    self.notes.append(
      f"cw_l2: torchattacks' CW stops early once its summed loss rose since the check "
      f"10 steps before: it ran {torch_steps:.0f} of the {steps} steps per run here "
      f"(its % of ceiling counts those), jaxrobust always runs all {steps}."
    )
    return row

  def mi_fgsm(self):
    jr, ta = self.jr, self.torchattacks
    steps, alpha = 10, 2 / 255
    return self.attack_row(
      "mi_fgsm",
      "MI-FGSM, 10 steps (eps 8/255, step 2/255, decay 1)",
      jr.attacks.mi_fgsm(eps=LINF_EPS, steps=steps, step_size=alpha, decay=1.0),
      ta.MIFGSM(self.net, eps=LINF_EPS, alpha=alpha, steps=steps, decay=1.0),
      steps,
      "linf",
      LINF_EPS,
    )

  def di_fgsm(self):
    jr, ta = self.jr, self.torchattacks
    steps, alpha = 10, 2 / 255
    row = self.attack_row(
      "di_fgsm",
      "M-DI2-FGSM, 10 steps (decay 1, p 0.5, resize 0.9)",
      jr.attacks.di_fgsm(
        eps=LINF_EPS, steps=steps, step_size=alpha, decay=1.0, prob=0.5, resize_rate=0.9
      ),
      ta.DIFGSM(
        self.net,
        eps=LINF_EPS,
        alpha=alpha,
        steps=steps,
        decay=1.0,
        resize_rate=0.9,
        diversity_prob=0.5,
        random_start=False,
      ),
      steps,
      "linf",
      LINF_EPS,
    )
    self.notes.append(
      "di_fgsm: torchattacks draws one resize-and-pad per step for the "
      "whole batch, jaxrobust one per step and example."
    )
    return row

  def pgd_at_step(self):
    """One PGD-7 adversarial-training step on the benchmark's model."""
    return self._training_step_row(
      "pgd_at_step",
      "PGD-7 adversarial training step (SGD, momentum 0.9)",
      self.model,
      jax_variables=self.jax.device_get(self.variables),
      steps=7,
      batch=self.batch,
    )

  def seed_training_step(self):
    """One PGD-10 adversarial-training step on `seed_cnn` (`row_model`), batch
    `--batch-size`."""
    model, variables = self.row_model("seed_cnn")
    return self._training_step_row(
      "seed_training_step",
      f"PGD-10 AT step, seed_cnn, batch {self.batch}",
      model,
      jax_variables=variables,
      steps=10,
      batch=self.batch,
    )

  def preact_training_step(self):
    """One PGD-10 adversarial-training step on PreAct ResNet-18 (BatchNorm in
    training mode, `row_model`), batch 64."""
    model, variables = self.row_model("preact_resnet18")
    return self._training_step_row(
      "preact_training_step",
      "PGD-10 AT step, PreAct ResNet-18, batch 64",
      model,
      jax_variables=variables,
      steps=10,
      batch=64,
    )

  def _training_step_row(self, name, label, model, *, jax_variables, steps, batch):
    """One adversarial-training step, L-inf PGD-`steps` (8/255, step 2/255,
    random start), then the cross-entropy step (SGD 0.01, momentum 0.9), on the
    same training batches: `jaxrobust.training.step.make_train_step` against a plain
    PyTorch loop with torchattacks' PGD."""
    jax, jr, np, torch, ta = self.jax, self.jr, self.np, self.torch, self.torchattacks
    alpha = 2 / 255
    batch = batch - batch % self.devices
    opt = {"name": "sgd", "learning_rate": 0.01, "momentum": 0.9}
    tx = jr.training.make_optimizer(opt, total_steps=1000)
    input_fn = jr.training.make_input_fn(
      "adversarial",
      {"name": "pgd", "norm": "linf", "eps": LINF_EPS, "step_size": alpha, "steps": steps},
    )
    step = jr.training.make_train_step(self.in_dtype(model), tx, input_fn, self.mesh)
    params = jax_variables["params"]
    state = jr.training.TrainState(
      step=jax.numpy.zeros((), jax.numpy.int32),
      params=params,
      model_state={k: v for k, v in jax_variables.items() if k != "params"},
      opt_state=tx.init(params),
    )
    holder = {"state": jax.device_put(state, jr.parallel.replicated(self.mesh))}
    # Training batches: from the training set, the same for both sides.
    n = self.args.repeats + 1
    idx = np.random.default_rng(1).permutation(len(self.train_set.x))
    idx = np.resize(idx, n * batch)
    xs = self.train_set.x[idx].reshape(n, batch, *self.train_set.x.shape[1:])
    ys = self.train_set.y[idx].reshape(n, batch)
    xs_dev = [jax.device_put(x, self.batch_spec) for x in xs]
    ys_dev = [jax.device_put(y, self.batch_spec) for y in ys]
    key = jax.random.key(7)

    def jax_run(i):
      state, metrics = step(holder["state"], xs_dev[i], ys_dev[i], key)
      holder["state"] = state
      return float(metrics["accuracy"])  # blocks

    net = self.torch_in_dtype(
      self.tm.to_torch(model, jax_variables, self.input_hw).to(self.torch_device)
    )
    optimizer = torch.optim.SGD(net.parameters(), lr=opt["learning_rate"], momentum=opt["momentum"])
    attack = ta.PGD(net, eps=LINF_EPS, alpha=alpha, steps=steps, random_start=True)
    xs_t = [self.tm.nhwc_to_nchw(x).to(self.torch_device) for x in xs]
    ys_t = [torch.from_numpy(y.astype(np.int64)).to(self.torch_device) for y in ys]

    def torch_run(i):
      torch.manual_seed(i)
      net.train()
      x_adv = attack(xs_t[i], ys_t[i])  # torchattacks attacks in eval mode, then restores
      logits = net(x_adv)
      loss = torch.nn.functional.cross_entropy(logits, ys_t[i])
      optimizer.zero_grad(set_to_none=True)
      loss.backward()
      optimizer.step()
      return float((logits.argmax(1) == ys_t[i]).float().mean())

    jt, tt, ceil, jo, to, compile_s = time_alternately(
      jax_run, torch_run, self.args.repeats, self.ceiling
    )
    # Attack: `steps` forward + input-gradient passes; then one forward and a
    # full backward (input and weight gradients, about two forward passes).
    apply = lambda v, x: model.apply(v, x, train=False)
    forward, grad = self.flops_per_image(apply, jax_variables, batch)
    flops = (steps * grad + 3 * forward) * batch
    row = self.row(
      name, label, jt, tt, ceil, batch, "images/s", flops, flops, compile_seconds=compile_s
    )
    row["agreement"] = {
      "jaxrobust": float(np.mean(jo)),
      "pytorch": float(np.mean(to)),
      "what": f"training accuracy on the PGD-{steps} examples of each step",
      "examples": len(jo) * batch,
    }
    return row

  def smoothing(self):
    """Noise draws per second of randomized smoothing's counting procedure."""
    jax, jr, np, torch = self.jax, self.jr, self.np, self.torch
    k, n, chunk = self.args.smoothing_images, self.args.smoothing_draws, self.args.smoothing_batch
    num_classes = self.test_set.num_classes
    runs = self.args.repeats + 1
    images = self.test_set.x[: runs * k].reshape(runs, k, *self.test_set.x.shape[1:])
    labels = self.test_set.y[: runs * k].reshape(runs, k)
    variables = self.variables
    logits_fn = lambda xb: self.apply(variables, xb)  # one object: one compilation

    def jax_run(i):
      return jr.smoothing.noise_counts(
        logits_fn,
        images[i],
        jax.random.key(100 + i),
        sigma=SIGMA,
        n=n,
        batch_size=chunk,
        mesh=self.mesh,
      )

    images_t = [self.tm.nhwc_to_nchw(x).to(self.torch_device) for x in images]

    def torch_run(i):
      # Cohen et al.'s `Smooth._sample_noise`, the reference implementation.
      torch.manual_seed(i)
      counts = np.zeros((k, num_classes), np.int64)
      with torch.inference_mode():
        for j in range(k):
          x = images_t[i][j]
          remaining = n
          while remaining:
            this = min(chunk, remaining)
            remaining -= this
            batch = x.repeat((this, 1, 1, 1))
            noise = torch.randn_like(batch) * SIGMA
            predictions = self.net(batch + noise).argmax(1)
            counts[j] += np.bincount(predictions.cpu().numpy(), minlength=num_classes)
      return counts

    jt, tt, ceil, jo, to, compile_s = time_alternately(
      jax_run, torch_run, self.args.repeats, self.ceiling
    )
    draws = k * n
    flops = draws * self.forward_flops
    row = self.row(
      "smoothing",
      f"randomized smoothing: {n} noise draws x {k} images (sigma {SIGMA}, chunks of {chunk})",
      jt,
      tt,
      ceil,
      draws,
      "draws/s",
      flops,
      flops,
      compile_seconds=compile_s,
    )
    smoothed = lambda outs: float(
      np.mean(np.concatenate([c.argmax(1) == labels[i] for i, c in enumerate(outs)]))
    )
    row["agreement"] = {
      "jaxrobust": smoothed(jo),
      "pytorch": smoothed(to),
      "what": "smoothed classifier's accuracy (top count)",
      "examples": runs * k,
    }
    return row

  def eval_early_stop(self):
    """Robust accuracy under PGD-10 over 4 batches: jaxrobust attacks only the
    examples the model classifies correctly (the others are not robust
    whatever the attack does), packed into full batches; the reference attacks
    every example, as torchattacks' users do."""
    jax, jr, np, torch, ta = self.jax, self.jr, self.np, self.torch, self.torchattacks
    steps, alpha, per_run = 10, 2 / 255, 4
    attack = jr.attacks.pgd(norm="linf", eps=LINF_EPS, step_size=alpha, steps=steps)
    run_attack = self.sharded_attack(attack)
    predict = self.predict
    B = self.batch
    runs = self.args.repeats + 1
    # Run i evaluates batches i .. i + per_run - 1 (mod the batches prepared).
    groups = [[(i + j) % runs for j in range(per_run)] for i in range(runs)]
    xs = [np.concatenate([self.x[b] for b in g]) for g in groups]
    ys = [np.concatenate([self.y[b] for b in g]) for g in groups]
    base_key = jax.random.key(4321)
    attacked = []

    def jax_run(i):
      x, y = xs[i], ys[i]
      clean = (
        np.concatenate(
          [
            np.asarray(predict(self.variables, jax.device_put(x[s : s + B], self.batch_spec)))
            for s in range(0, len(x), B)
          ]
        )
        == y
      )
      todo = np.nonzero(clean)[0]
      attacked.append(len(todo))
      robust = np.zeros(len(x), bool)
      for s in range(0, len(todo), B):
        part = todo[s : s + B]
        pad = np.resize(part, B)  # the last batch is padded with repeats, then ignored
        x_adv = run_attack(
          self.variables,
          jax.device_put(x[pad], self.batch_spec),
          jax.device_put(y[pad], self.batch_spec),
          jax.random.fold_in(base_key, i * 1000 + s),
        )
        pred = np.asarray(predict(self.variables, x_adv))
        robust[part] = pred[: len(part)] == y[part]
      return float(robust.mean())

    torch_attack = ta.PGD(self.net, eps=LINF_EPS, alpha=alpha, steps=steps, random_start=True)

    def torch_run(i):
      torch.manual_seed(i)
      robust = []
      for s in range(0, len(xs[i]), B):
        x = self.tm.nhwc_to_nchw(xs[i][s : s + B]).to(self.torch_device)
        y = torch.from_numpy(ys[i][s : s + B].astype(np.int64)).to(self.torch_device)
        with torch.inference_mode():
          clean = self.net(x).argmax(1) == y
        x_adv = torch_attack(x, y)
        with torch.inference_mode():
          robust.append((clean & (self.net(x_adv).argmax(1) == y)).cpu().numpy())
      return float(np.concatenate(robust).mean())

    jt, tt, ceil, jo, to, compile_s = time_alternately(
      jax_run, torch_run, self.args.repeats, self.ceiling
    )
    work = per_run * B
    batches_attacked = np.mean([math.ceil(a / B) for a in attacked])
    jax_flops = work * self.forward_flops + batches_attacked * B * (
      steps * self.step_flops + self.forward_flops
    )
    torch_flops = work * (2 * self.forward_flops + steps * self.step_flops)
    row = self.row(
      "eval_early_stop",
      f"PGD-10 L-inf robust accuracy of {work} images, early stop",
      jt,
      tt,
      ceil,
      work,
      "images/s",
      jax_flops,
      torch_flops,
      compile_seconds=compile_s,
    )
    row["agreement"] = {
      "jaxrobust": float(np.mean(jo)),
      "pytorch": float(np.mean(to)),
      "what": "robust accuracy (correct clean and under attack)",
      "examples": runs * work,
    }
    row["attacked_fraction"] = float(np.mean(attacked)) / work
    self.notes.append(
      f"eval_early_stop: jaxrobust skips the attack on the examples already "
      f"misclassified (here {100 * (1 - row['attacked_fraction']):.0f} %; the "
      f"accuracy cannot change) and packs the rest into full batches of {B}; "
      f"the reference attacks all {work}."
    )
    return row

  # -- the fast path on models jaxrobust did not write (issue 11) ----------------

  def user_model(self):
    """PGD-10 L-inf (8/255, step 2/255) on a plain Flax CNN a user would write
    (`nn.Conv` 3x3 32-32-64-64, `nn.max_pool` 2x2 after each pair, dense 256,
    10 classes; random weights, copied into the PyTorch twin below), batch 256:
    jaxrobust with and without its CPU fast path against torchattacks."""
    jax, np = self.jax, self.np
    model = UserCNN(num_classes=self.test_set.num_classes)
    variables = model.init(jax.random.key(0), np.zeros((1, *self.test_set.x.shape[1:]), np.float32))
    net = user_torch_cnn(self.torch, variables).to(self.torch_device)
    return self._fast_path_row(
      "user_model",
      "PGD-10 L-inf, plain Flax CNN (nn.Conv, nn.max_pool), batch 256",
      lambda v, x: model.apply(v, x),
      variables,
      net,
      steps=10,
      batch=256,
      images=self.args.user_images,
    )

  def row_model(self, name):
    """(model, variables) of architecture `name`: the benchmark's trained model
    when `--model` is `name`, else a freshly initialised one (speed does not
    depend on the weights; agreement then compares near-chance accuracies)."""
    jax, jr, np = self.jax, self.jr, self.np
    if self.args.model == name:
      return self.model, jax.device_get(self.variables)
    mean, std = jr.data.channel_stats(self.train_set.x)
    model = jr.models.create(
      name,
      num_classes=self.test_set.num_classes,
      mean=tuple(map(float, mean)),
      std=tuple(map(float, std)),
    )
    x1 = np.zeros((1, *self.test_set.x.shape[1:]), np.float32)
    return model, jax.device_get(model.init(jax.random.key(0), x1))

  def seed_network(self):
    """PGD-20 L-inf (8/255, step 2/255) on the seed's network (`seed_cnn`: 5x5
    convolutions 3->6->16 channels), batches of 500 (1,000 images a run by
    default): jaxrobust with and without its CPU fast path against
    torchattacks (`row_model`)."""
    return self._architecture_row(
      "seed_network",
      "seed_cnn",
      "PGD-20 L-inf, seed_cnn (5x5 convs 3->6->16), batch 500",
      steps=20,
      batch=500,
      images=self.args.seed_images,
    )

  def preact_resnet18(self):
    """PGD-10 L-inf (8/255, step 2/255) on PreAct ResNet-18 (BatchNorm in
    inference mode; `row_model`), batches of 64: jaxrobust with and without its
    CPU fast path against torchattacks."""
    return self._architecture_row(
      "preact_resnet18",
      "preact_resnet18",
      "PGD-10 L-inf, PreAct ResNet-18 (BatchNorm inference), batch 64",
      steps=10,
      batch=64,
      images=self.args.preact_images,
    )

  def _architecture_row(self, name, architecture, label, *, steps, batch, images):
    """`_fast_path_row` on jaxrobust's model `architecture` (`row_model`) in
    inference mode and its PyTorch twin."""
    model, variables = self.row_model(architecture)
    net = self.tm.to_torch(model, variables, self.input_hw).to(self.torch_device)
    return self._fast_path_row(
      name,
      label,
      lambda v, x: model.apply(v, x, train=False),
      variables,
      net,
      steps=steps,
      batch=batch,
      images=images,
    )

  def autoattack(self):
    """AutoAttack standard, L-inf 8/255, on the first `--autoattack-images`
    test images: `jr.attacks.autoattack` through `jr.evaluation.evaluate` (a
    cascade over the clean-correct examples) against torchattacks'
    `AutoAttack` at the reference's settings, run as `benchmarks/autoattack.py`
    runs it (`torch_autoattack`), in batches of `--batch-size`. Agreement: the
    robust accuracy each side reports."""
    jax, jr, np, torch = self.jax, self.jr, self.np, self.torch
    from benchmarks.autoattack import torch_autoattack  # pylint: disable=g-import-not-at-top

    n = self.args.autoattack_images
    x, y = self.test_set.x[:n], self.test_set.y[:n]
    variables = jax.device_get(self.variables)
    attacks = {"aa": jr.attacks.autoattack(norm="linf", eps=LINF_EPS)}
    x_t = self.tm.nhwc_to_nchw(x).to(self.torch_device)
    y_t = torch.from_numpy(y.astype(np.int64)).to(self.torch_device)

    def jax_run(i):
      del i  # the same images, key and result every run
      rep = jr.evaluation.evaluate(
        self.apply, variables, x, y, attacks, key=jax.random.key(0), batch_size=self.batch
      )
      return rep["results"][0]["accuracy"]

    def torch_run(i):
      torch.manual_seed(i)
      robust, _, _ = torch_autoattack(
        torch, self.torchattacks, self.net, "linf", LINF_EPS, x_t, y_t, self.batch
      )
      return float(robust.mean())

    jt, tt, ceil, jo, to, compile_s = time_alternately(
      jax_run, torch_run, self.args.repeats, self.ceiling
    )
    row = self.row(
      "autoattack",
      f"AutoAttack standard L-inf 8/255, {n} images",
      jt,
      tt,
      ceil,
      n,
      "images/s",
      0,
      0,
      compile_seconds=compile_s,
    )
    row["agreement"] = {
      "jaxrobust": float(np.median(jo)),
      "pytorch": float(np.median(to)),
      "what": "robust accuracy (median over runs)",
      "examples": n,
    }
    return row

  def pgd_memory(self):
    """The memory one PGD call needs at 10 and at 100 steps, each side in a
    process of its own (`benchmarks/peak_memory.py`: the peak resident set
    above the one before the call, and XLA's temporary buffers), batch
    `--batch-size`, on a fresh `--model`. The loop must not grow with the steps."""
    import subprocess  # pylint: disable=g-import-not-at-top

    probe = Path(__file__).resolve().parent / "peak_memory.py"
    runs = {}
    for side in ("jaxrobust", "torchattacks"):
      for steps in (10, 100):
        out = subprocess.run(
          [sys.executable, str(probe), f"--side={side}", f"--steps={steps}"]
          + [f"--model={self.args.model}", f"--batch={self.batch}"],
          check=True,
          capture_output=True,
          text=True,
        ).stdout
        runs[side, steps] = json.loads(out.strip().splitlines()[-1])
    peak = lambda side, steps: runs[side, steps]["second_call_peak_above_mib"]
    self.notes.append(
      "pgd_memory: peak resident set above the process's before one PGD call (MiB, "
      f"batch {self.batch}, {self.args.model}): jaxrobust PGD-10 {peak('jaxrobust', 10):.0f}, "
      f"PGD-100 {peak('jaxrobust', 100):.0f} (XLA temporaries "
      f"{runs['jaxrobust', 10]['xla_temp_mib']:.1f} and "
      f"{runs['jaxrobust', 100]['xla_temp_mib']:.1f}); torchattacks PGD-10 "
      f"{peak('torchattacks', 10):.0f}, PGD-100 {peak('torchattacks', 100):.0f}."
    )
    return {
      "row": "pgd_memory",
      "label": f"memory of one PGD call, 100 steps against 10 (batch {self.batch})",
      "kind": "memory",
      "unit": "MiB",
      "runs": [runs[k] for k in sorted(runs)],
      "jaxrobust": peak("jaxrobust", 100),
      "pytorch": peak("torchattacks", 100),
      "growth": {s: peak(s, 100) / peak(s, 10) for s in ("jaxrobust", "torchattacks")},
    }

  def _fast_path_row(self, name, label, apply, variables, net, *, steps, batch, images):
    """Times three sides alternately on the same images: jaxrobust's PGD (the
    fast path on, its default), the same PGD traced inside
    `jaxrobust.fastpath.disabled()`, and torchattacks' PGD on `net`."""
    jax, jr, np, torch = self.jax, self.jr, self.np, self.torch
    P = jax.sharding.PartitionSpec
    spec = P(jr.parallel.BATCH_AXIS)
    alpha = 2 / 255
    for p in net.parameters():
      p.requires_grad_(False)
    batch = batch - batch % self.devices
    n = max(batch, images // batch * batch)
    x, y = self.test_set.x[:n], self.test_set.y[:n]
    variables = jax.device_put(variables, jr.parallel.replicated(self.mesh))
    xs = [jax.device_put(x[s : s + batch], self.batch_spec) for s in range(0, n, batch)]
    ys = [jax.device_put(y[s : s + batch], self.batch_spec) for s in range(0, n, batch)]

    def jax_side(fast):  # everything built anew per side: no trace is shared
      attack = jr.attacks.pgd(norm="linf", eps=LINF_EPS, step_size=alpha, steps=steps)
      mapped = jr.parallel.data_parallel(
        lambda v, xb, yb, keys: attack(lambda z: apply(v, z), xb, yb, keys),
        self.mesh,
        in_specs=(P(), spec, spec, spec),
        out_specs=spec,
      )
      program = jax.jit(
        lambda v, xb, yb, key: mapped(v, xb, yb, self.example_keys(key, xb.shape[0]))
      )

      def run(i):
        context = contextlib.nullcontext() if fast else jr.fastpath.disabled()
        with context:  # only the first call traces
          outs = [
            program(variables, xb, yb, jax.random.fold_in(jax.random.key(i), j))
            for j, (xb, yb) in enumerate(zip(xs, ys))
          ]
        return np.concatenate([np.asarray(o) for o in outs])

      return run

    ta_attack = self.torchattacks.PGD(
      net, eps=LINF_EPS, alpha=alpha, steps=steps, random_start=True
    )
    xs_t = [
      self.tm.nhwc_to_nchw(x[s : s + batch]).to(self.torch_device) for s in range(0, n, batch)
    ]
    ys_t = [
      torch.from_numpy(y[s : s + batch].astype(np.int64)).to(self.torch_device)
      for s in range(0, n, batch)
    ]

    def torch_side(i):
      torch.manual_seed(i)
      outs = [ta_attack(xb, yb) for xb, yb in zip(xs_t, ys_t)]
      torch_synchronize()
      return np.concatenate([self.tm.nchw_to_nhwc(o) for o in outs])

    sides = {"fast": jax_side(True), "no_fast": jax_side(False), "torch": torch_side}
    first, times, outputs, ceilings = {}, {k: [] for k in sides}, {}, []
    for k, run in sides.items():
      start = time.perf_counter()
      outputs[k] = run(0)
      first[k] = time.perf_counter() - start
    order = list(sides)
    for i in range(1, self.args.repeats + 1):
      for k in order[i % 3 :] + order[: i % 3]:
        start = time.perf_counter()
        sides[k](i)
        times[k].append(time.perf_counter() - start)
      ceilings.append(self.ceiling.sample())
    predict = jax.jit(lambda v, xb: jnp_argmax(self.jnp, apply(v, xb)))
    accuracy = lambda xa: float(
      np.mean(
        np.concatenate(
          [
            np.asarray(predict(variables, jax.device_put(xa[s : s + batch], self.batch_spec)))
            for s in range(0, n, batch)
          ]
        )
        == y
      )
    )
    per = batch // self.devices
    x1 = jax.ShapeDtypeStruct((per, *x.shape[1:]), np.float32)
    grad_cost = (
      jax.jit(lambda v, z: jax.grad(lambda z: apply(v, z).sum())(z))
      .lower(jax.device_get(variables), x1)
      .cost_analysis()
    )
    flops = steps * float(grad_cost["flops"]) / per * n
    compile_seconds = {k: first[k] - median(times[k]) for k in ("fast", "no_fast")}
    row = self.row(
      name,
      label,
      times["fast"],
      times["torch"],
      ceilings,
      n,
      "images/s",
      flops,
      flops,
      compile_seconds=compile_seconds["fast"],
    )
    no_fast_rate = n / median(times["no_fast"])
    row.update(
      {
        "jaxrobust_no_fast_path": no_fast_rate,
        "ratio_no_fast_path": no_fast_rate / row["pytorch"],
        "jaxrobust_no_fast_path_seconds": times["no_fast"],
        "fast_path_speedup": row["jaxrobust"] / no_fast_rate,
        "compile_seconds_no_fast_path": compile_seconds["no_fast"],
        "agreement": {
          "jaxrobust": accuracy(outputs["fast"]),
          "pytorch": accuracy(outputs["torch"]),
          "what": "accuracy under the attack",
          "examples": n,
        },
        "jaxrobust_no_fast_path_accuracy": accuracy(outputs["no_fast"]),
      }
    )
    self.notes.append(
      f"{name}: without the fast path (`jaxrobust.fastpath.disabled()`) jaxrobust ran "
      f"{format_rate(no_fast_rate)} images/s ({row['ratio_no_fast_path']:.2f}x PyTorch; "
      f"accuracy under it {100 * row['jaxrobust_no_fast_path_accuracy']:.1f} %); the fast "
      f"path is {row['fast_path_speedup']:.2f}x. Compile (first call minus a steady one): "
      f"{compile_seconds['fast']:.1f} s with, {compile_seconds['no_fast']:.1f} s "
      f"without. {n} images a run."
    )
    return row


def _user_cnn_class():
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  class UserCNNModule(nn.Module):
    """A plain Flax CNN: conv 3x3 32, 32, max-pool 2; conv 3x3 64, 64, max-pool 2;
    dense 256; dense `num_classes` (ReLU between)."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
      for features in (32, 64):
        x = nn.relu(nn.Conv(features, (3, 3))(x))
        x = nn.relu(nn.Conv(features, (3, 3))(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      x = nn.relu(nn.Dense(256)(x.reshape(x.shape[0], -1)))
      return nn.Dense(self.num_classes)(x)

  return UserCNNModule


def UserCNN(num_classes):  # pylint: disable=invalid-name
  return _user_cnn_class()(num_classes=num_classes)


def user_torch_cnn(torch, variables):
  """The PyTorch twin of `UserCNN` with its Flax `variables` (NCHW images)."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  nn = torch.nn
  params = variables["params"]
  tensor = lambda a: torch.from_numpy(np.array(a, np.float32))

  class Net(nn.Module):
    def __init__(self):
      super().__init__()
      self.convs = nn.ModuleList()
      for i in range(4):
        kernel, bias = params[f"Conv_{i}"]["kernel"], params[f"Conv_{i}"]["bias"]
        conv = nn.Conv2d(kernel.shape[2], kernel.shape[3], 3, padding=1)
        with torch.no_grad():
          conv.weight.copy_(tensor(np.transpose(kernel, (3, 2, 0, 1))))
          conv.bias.copy_(tensor(bias))
        self.convs.append(conv)
      self.dense = nn.ModuleList()
      for i in range(2):
        kernel, bias = params[f"Dense_{i}"]["kernel"], params[f"Dense_{i}"]["bias"]
        linear = nn.Linear(*kernel.shape)
        with torch.no_grad():
          linear.weight.copy_(tensor(np.asarray(kernel).T))
          linear.bias.copy_(tensor(bias))
        self.dense.append(linear)

    def forward(self, x):
      for i, conv in enumerate(self.convs):
        x = torch.relu(conv(x))
        if i % 2:
          x = torch.nn.functional.max_pool2d(x, 2)
      x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)  # Flax's NHWC flatten order
      return self.dense[1](torch.relu(self.dense[0](x)))

  return Net().eval()


def in_dtype_row(row, dtype, float32_row):
  """`row`, measured in `dtype`, named for it and compared with its float32
  twin (when one ran): each side's speed-up over float32 and whether the
  agreement column holds, i.e. neither side's accuracy moved by more than one
  point (or one example, when fewer than 100 are counted) from float32's."""
  row = {**row, "row": f"{row['row']}_{dtype}", "label": f"{row['label']} [{dtype}]"}
  row["dtype"] = dtype
  if float32_row is not None:
    a, b = row["agreement"], float32_row["agreement"]
    tolerance = max(0.01, 1 / a["examples"])
    moved = {side: a[side] - b[side] for side in ("jaxrobust", "pytorch")}
    row["versus_float32"] = {
      "speedup": {side: row[side] / float32_row[side] for side in ("jaxrobust", "pytorch")},
      "agreement_moved": moved,
      "agreement_holds": all(abs(m) <= tolerance + 1e-9 for m in moved.values()),
    }
  return row


def jnp_argmax(jnp, logits):
  return jnp.argmax(logits, axis=-1)


# ----------------------------------------------------------------------------
# Output.


def format_rate(v):
  return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def format_table(results):
  m = results["machine"]
  lines = [
    f"Machine: {m['cpu']} ({m['cores']} cores; {', '.join(m['cpu_features'])}), "
    f"{m['memory_gib']} GiB; {m['os']}",
    f"jax {m['jax']} on {m['jax_devices']} ({m['jax_backend']}; XLA_FLAGS={m['xla_flags']!r}); "
    f"torch {m['torch']} on {m['torch_device']} ({m['torch_threads']} threads), "
    f"torchattacks {m['torchattacks']}; Python {m['python']}",
    f"Model: {results['model']}; data: {results['data']}",
    f"Batch {results['batch_size']}; median of {results['repeats']} timed runs per side "
    f"after a warm-up, alternating; clean accuracy on the attacked images "
    f"{100 * results['clean_accuracy']:.1f} %",
    f"Matmul ceiling (float32 jnp.dot 2048^2, median over the run; every dtype's % is of it): "
    f"{results['matmul_ceiling_gflops']:.0f} GFLOP/s; forward {results['forward_mflop']:.1f} "
    f"MFLOP/image, forward + input gradient {results['step_mflop']:.1f} MFLOP/image "
    f"(XLA cost analysis)",
    f"Load average at start {m['load_average_at_start']}, at end {results['load_average_at_end']}",
    "",
    "| row | jaxrobust | PyTorch | ratio | jaxrobust compile (s) | GFLOP/run "
    "| % of ceiling jr / pt | agreement jr / pt |",
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
  ]
  for r in results["rows"]:
    if r.get("kind") == "memory":
      g = r["growth"]
      lines.append(
        f"| {r['label']} | PGD-100 {r['jaxrobust']:.0f} MiB ({g['jaxrobust']:.2f}x PGD-10) | "
        f"PGD-100 {r['pytorch']:.0f} MiB ({g['torchattacks']:.2f}x PGD-10) | | | | | |"
      )
      continue
    unit = r["unit"]
    flop = f"{r['gflop_per_run']:.1f}" if "gflop_per_run" in r else ""
    frac = (
      f"{100 * r['jaxrobust_ceiling_fraction']:.0f} / {100 * r['pytorch_ceiling_fraction']:.0f} %"
      if "gflop_per_run" in r
      else ""
    )
    a = r.get("agreement", {})
    agree = (
      f"{100 * a['jaxrobust']:.1f} / {100 * a['pytorch']:.1f} % ({a['what']}, {a['examples']})"
      if a
      else ""
    )
    lines.append(
      f"| {r['label']} | {format_rate(r['jaxrobust'])} {unit} | "
      f"{format_rate(r['pytorch'])} {unit} | {r['ratio']:.2f}x | {r['compile_seconds']:.1f} "
      f"| {flop} | {frac} | {agree} |"
    )
  versus = [r for r in results["rows"] if "versus_float32" in r]
  if versus:
    lines += [
      "",
      "| row | speed-up over float32 jr / pt | agreement moved jr / pt (points) "
      "| agreement holds |",
      "| --- | ---: | ---: | --- |",
    ]
    for r in versus:
      v = r["versus_float32"]
      up, moved = v["speedup"], v["agreement_moved"]
      lines.append(
        f"| {r['label']} | {up['jaxrobust']:.2f}x / {up['pytorch']:.2f}x "
        f"| {100 * moved['jaxrobust']:+.1f} / {100 * moved['pytorch']:+.1f} "
        f"| {'yes' if v['agreement_holds'] else 'NO: use float32'} |"
      )
  if results["notes"]:
    lines += ["", "Notes:"] + [f"- {n}" for n in results["notes"]]
  return "\n".join(lines)


def main(argv=None):
  args = parse_args(argv)
  if not parallel.use_host_devices(args.devices) and args.devices:  # before JAX starts
    print(
      f"NOTE: XLA_FLAGS is set ({os.environ.get('XLA_FLAGS')!r}), so --devices "
      f"{args.devices} is ignored",
      flush=True,
    )

  try:
    import torch  # pylint: disable=g-import-not-at-top
    import torchattacks  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise SystemExit(
      f"the benchmark needs PyTorch and torchattacks ({e}); install them with\n"
      f"  pip install -r requirements-bench.txt\n"
      f"  pip install --no-deps torchattacks==3.5.1"
    ) from None
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  import jaxrobust as jr  # pylint: disable=g-import-not-at-top
  import jaxrobust.training.loop  # noqa: F401  pylint: disable=g-import-not-at-top  (jr.experiment)
  import jaxrobust.training.step  # noqa: F401  pylint: disable=g-import-not-at-top  (jr.training)
  from benchmarks import torch_models  # pylint: disable=g-import-not-at-top

  cores = len(os.sched_getaffinity(0))
  torch.set_num_threads(cores)
  bench = Bench(args, jax, jnp, np, torch, torchattacks, jr, torch_models)
  machine = machine_description(jax, torch, torchattacks, torch.get_num_threads())
  print(
    f"{machine['cpu']}, {cores} cores; jax {machine['jax']} on {machine['jax_devices']}; "
    f"torch {machine['torch']} ({machine['torch_threads']} threads)",
    flush=True,
  )
  bench.setup()
  print(f"model: {bench.model_description}", flush=True)

  rows = []
  for name in args.rows:
    for dtype in args.dtypes:
      print(f"{name} ({dtype}) ..." if len(args.dtypes) > 1 else f"{name} ...", end=" ", flush=True)
      start = time.perf_counter()
      bench.use_dtype(dtype)
      row = getattr(bench, name)()
      if dtype != "float32":
        row = in_dtype_row(row, dtype, next((r for r in rows if r["row"] == name), None))
      rows.append(row)
      outcome = f"{row['ratio']:.2f}x" if "ratio" in row else f"{row['jaxrobust']:.0f} MiB"
      print(f"{outcome} ({time.perf_counter() - start:.0f} s)", flush=True)

  ceilings = [r["matmul_ceiling_flops"] for r in rows if "matmul_ceiling_flops" in r]
  results = {
    "machine": machine,
    "model": bench.model_description,
    "data": bench.data_description,
    "batch_size": args.batch_size,
    "dtypes": list(args.dtypes),
    "repeats": args.repeats,
    "clean_accuracy": float(np.mean(bench.clean_correct)),
    "matmul_ceiling_gflops": median(ceilings) / 1e9 if ceilings else float("nan"),
    "forward_mflop": bench.forward_flops / 1e6,
    "step_mflop": bench.step_flops / 1e6,
    "load_average_at_end": [round(v, 2) for v in os.getloadavg()],
    "rows": rows,
    "notes": bench.notes,
  }
  print()
  print(format_table(results))
  if args.json:
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.json}")
  return results


if __name__ == "__main__":
  with contextlib.suppress(KeyboardInterrupt):
    main()
