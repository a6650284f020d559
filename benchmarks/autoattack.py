"""AutoAttack side by side: jaxrobust against the authors' code (pyautoattack)
and torchattacks, same weights, same images.

  pip install -r requirements-bench.txt
  pip install --no-deps torchattacks==3.5.1 pyautoattack==0.2.0
  python benchmarks/autoattack.py                      # 1,000 CIFAR-10 test images
  python benchmarks/autoattack.py --images 200 --models pgd_at --norms linf

For each model (the seed's network, `seed_cnn`, trained here with jaxrobust on
the CIFAR-10 JPEG copy in `../shared/data`: naturally, and with PGD-7
adversarial training; both cached under `runs/bench/`) and each threat model
(L-infinity 8/255, L2 0.5), it converts the model to PyTorch
(`benchmarks/torch_models.py`, logits checked to agree), runs AutoAttack's
standard version with jaxrobust (`jr.attacks.autoattack`, a cascade on the
clean-correct examples), with the authors' own code (pyautoattack 0.2.0,
Croce & Hein's package: `AutoAttack(...).run_standard_evaluation`, the
reference) and with torchattacks 3.5.1 (`torchattacks.AutoAttack`, run stage
by stage as its `MultiAttack` does; not for L1, which it lacks), on the same
first `--images` test images, and prints the robust accuracies (after every
stage), jaxrobust's difference from the reference, and the times; jaxrobust's
compile time is measured apart (XLA's own compile events) and its steady
time is the rest. The speed-up is the reference's time over jaxrobust's.

torchattacks' `AutoAttack` runs 10 iterations of APGD, APGD-T and FAB where
Croce & Hein's reference runs 100, and Square with a rescaled schedule where
the reference's AutoAttack does not; here both sides use the reference's
settings (100 iterations, 9 targets, 5,000 Square queries, no rescaling), set
on torchattacks' own attack objects.
"""

import argparse
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

from jaxrobust import parallel  # pylint: disable=wrong-import-position  (does not start JAX)

EPS = {"linf": 8 / 255, "l2": 0.5, "l1": 12.0}  # L1: Croce & Hein 2021's CIFAR-10 radius
REFERENCE_NORMS = {"linf": "Linf", "l2": "L2", "l1": "L1"}
MODELS = {"natural": "natural", "pgd_at": "pgd_at"}  # row -> config file


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """The command line, checked: `--models` and `--norms` as lists."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--images", type=int, default=1000, help="first N CIFAR-10 test images")
  p.add_argument("--models", default="natural,pgd_at", help="natural, pgd_at, or both")
  p.add_argument("--norms", default="linf,l2", help="comma-separated: linf, l2, l1")
  p.add_argument("--epochs", type=int, default=3, help="training epochs of each model")
  p.add_argument("--batch-size", type=int, default=500, help="images per batch, both sides")
  p.add_argument("--runs", default=str(REPO / "runs" / "bench"), help="trained models")
  p.add_argument(
    "--data",
    default=str(REPO.parent / "shared" / "data" / "cifar10"),
    help="folder of cifar10-{train,test}-jpeg.tar.gz",
  )
  p.add_argument("--json", default=None, help="also write the results here")
  args = p.parse_args(argv)
  args.models = [m.strip() for m in args.models.split(",")]
  args.norms = [n.strip() for n in args.norms.split(",")]
  for m in args.models:
    if m not in MODELS:
      p.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
  for n in args.norms:
    if n not in EPS:
      p.error(f"unknown norm {n!r}; choose from {', '.join(EPS)}")
  if args.images < 1 or args.batch_size < 1 or args.epochs < 1:
    p.error("--images, --batch-size and --epochs must be >= 1")
  return args


class CompileClock:
  """Seconds XLA spends tracing, lowering and compiling, from JAX's events."""

  EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
  )

  def __init__(self, jax: Any) -> None:
    self.seconds = 0.0
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event: str, duration: float, **kwargs: Any) -> None:
    del kwargs
    if event in self.EVENTS:
      self.seconds += duration


def train(row: str, args: argparse.Namespace, experiment: Any) -> tuple[Any, Any, Any]:
  """The row's model, trained with jaxrobust (or restored from its run)."""
  import importlib  # pylint: disable=g-import-not-at-top

  run_config = importlib.import_module(f"jaxrobust.configs.{MODELS[row]}").get_config("cifar10")
  run_config.epochs = args.epochs
  run_config.data.name = f"folder:{args.data}/cifar10-{{split}}-jpeg.tar.gz"
  workdir = Path(args.runs) / f"seed_cnn-{row}-e{args.epochs}"
  print(f"{row}: training or restoring {workdir}", flush=True)
  experiment.train(run_config, workdir, progress=sys.stderr.isatty())
  return experiment.restore(workdir)


def torch_autoattack(
  torch: Any,
  torchattacks: Any,
  net: Any,
  norm: str,
  eps: float,
  x: Any,
  y: Any,
  batch_size: int,
) -> tuple[Any, list[float], float]:
  """torchattacks' AutoAttack (standard) with the reference's settings, run
  stage by stage as its MultiAttack does; returns (robust [N], robust
  accuracy after each stage, seconds)."""
  aa = torchattacks.AutoAttack(
    net, norm={"linf": "Linf", "l2": "L2"}[norm], eps=eps, version="standard", n_classes=10, seed=0
  )
  stages = aa._autoattack.attacks  # pylint: disable=protected-access
  for attack in stages:
    if hasattr(attack, "steps"):
      attack.steps = 100  # APGD, APGD-T, FAB: the reference's iterations
  stages[-1].rescale_schedule = False  # Square as the reference's AutoAttack runs it
  start = time.perf_counter()
  robust, after = [], []
  for begin in range(0, len(x), batch_size):
    xb, yb = x[begin : begin + batch_size], y[begin : begin + batch_size]
    with torch.no_grad():
      fails = torch.nonzero(net(xb).argmax(1) == yb).flatten()
    counts = []
    for attack in stages:
      if len(fails):
        adv = attack(xb[fails], yb[fails])
        with torch.no_grad():
          fails = fails[net(adv).argmax(1) == yb[fails]]
      counts.append(len(fails))
    mask = torch.zeros(len(xb), dtype=torch.bool)
    mask[fails] = True
    robust.append(mask.numpy())
    after.append(counts)
  seconds = time.perf_counter() - start
  import numpy as np  # pylint: disable=g-import-not-at-top

  after = np.sum(after, 0) / len(x)
  return np.concatenate(robust), [float(a) for a in after], seconds


class _StageLog(logging.Handler):
  """The reference's robust accuracy after each stage, from its log lines."""

  PATTERN = re.compile(r"robust accuracy after ([A-Z-]+): ([0-9.]+)%")

  def __init__(self) -> None:
    super().__init__(logging.DEBUG)
    self.after: list[tuple[str, float]] = []

  def emit(self, record: logging.LogRecord) -> None:
    found = self.PATTERN.search(record.getMessage())
    if found:
      self.after.append((found.group(1).lower(), float(found.group(2)) / 100))


def reference_autoattack(
  torch: Any,
  net: Any,
  norm: str,
  eps: float,
  x: Any,
  y: Any,
  batch_size: int,
  steps: int = 100,
  queries: int = 5000,
) -> tuple[Any, list[float], float]:
  """The authors' AutoAttack (pyautoattack, standard version, seed 0; `steps`
  and `queries` as set there unless changed): returns (robust [N], robust
  accuracy after each stage, seconds)."""
  from pyautoattack import AutoAttack  # pylint: disable=g-import-not-at-top

  aa = AutoAttack(net, norm=REFERENCE_NORMS[norm], eps=eps, version="standard", seed=0)
  aa.apgd.n_iter = aa.apgd_targeted.n_iter = aa.fab.n_iter = steps
  aa.square.n_queries = queries
  stages = _StageLog()
  logger = logging.getLogger("auto-attack")
  logger.setLevel(logging.DEBUG)
  logger.addHandler(stages)
  try:
    start = time.perf_counter()
    x_adv, _ = aa.run_standard_evaluation(x, y, batch_size=batch_size)
    seconds = time.perf_counter() - start
  finally:
    logger.removeHandler(stages)
  with torch.no_grad():
    robust = (net(x_adv).argmax(1) == y).numpy()
  return robust, [a for _, a in stages.after], seconds


def _import_frameworks() -> tuple[Any, Any, Any]:
  """(pyautoattack, torch, torchattacks), or exit saying what to install."""
  try:
    import pyautoattack  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    import torchattacks  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise SystemExit(
      f"the benchmark needs PyTorch, pyautoattack and torchattacks ({e}); install them with\n"
      f"  pip install -r requirements-bench.txt\n"
      f"  pip install --no-deps torchattacks==3.5.1 pyautoattack==0.2.0"
    ) from None
  return pyautoattack, torch, torchattacks


def _compare(
  side: dict[str, Any], norm: str, args: argparse.Namespace, clock: CompileClock
) -> dict[str, Any]:
  """One model under AutoAttack at `norm`: jaxrobust, the reference and (but for
  L1) torchattacks on the same images; `side` holds the model on each side."""
  import jax  # pylint: disable=g-import-not-at-top

  import jaxrobust as jr  # pylint: disable=g-import-not-at-top
  from jaxrobust import evaluation  # pylint: disable=g-import-not-at-top

  torch, x, y, x_t, y_t, net = (side[k] for k in ("torch", "x", "y", "x_t", "y_t", "net"))
  eps = EPS[norm]
  compiled_before = clock.seconds
  rep = evaluation.evaluate(
    side["apply_fn"],
    side["variables"],
    x,
    y,
    {"aa": jr.attacks.autoattack(norm=norm, eps=eps)},
    key=jax.random.key(0),
    batch_size=args.batch_size,
  )
  compile_seconds = clock.seconds - compiled_before
  (aa,) = rep["results"]
  ref_robust, ref_after, ref_seconds = reference_autoattack(
    torch, net, norm, eps, x_t, y_t, args.batch_size
  )
  result = {
    "model": side["row"],
    "norm": norm,
    "eps": eps,
    "images": len(x),
    "logit_gap": side["gap"],
    "clean": rep["clean_accuracy"],
    "jaxrobust": aa["accuracy"],
    "reference": float(ref_robust.mean()),
    "jaxrobust_stages": [s["accuracy"] for s in aa["stages"]],
    "reference_stages": ref_after,
    "jaxrobust_seconds": aa["seconds"],
    "jaxrobust_compile_seconds": compile_seconds,
    "reference_seconds": ref_seconds,
  }
  if norm != "l1":  # torchattacks has no L1 AutoAttack
    torch_robust, torch_after, torch_seconds = torch_autoattack(
      torch, side["torchattacks"], net, norm, eps, x_t, y_t, args.batch_size
    )
    result.update(
      torchattacks=float(torch_robust.mean()),
      torchattacks_stages=torch_after,
      torchattacks_seconds=torch_seconds,
    )
  result["difference"] = result["jaxrobust"] - result["reference"]
  result["speedup"] = ref_seconds / max(aa["seconds"] - compile_seconds, 1e-9)
  return result


def _sides(row: str, args: argparse.Namespace, torch: Any, torchattacks: Any) -> dict[str, Any]:
  """The row's model on each side: jaxrobust's and its PyTorch twin, the test images
  in each layout, and the largest logit difference between the two models."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  import jaxrobust as jr  # pylint: disable=g-import-not-at-top
  from benchmarks import torch_models  # pylint: disable=g-import-not-at-top
  from jaxrobust.training import config
  from jaxrobust.training import loop as experiment

  resolved, model, state = train(row, args, experiment)
  test = config.load_split(resolved, "test")
  x, y = test.x[: args.images], test.y[: args.images]
  variables = jax.device_get(state.variables)
  net = torch_models.to_torch(model, variables, x.shape[1:3])
  for p in net.parameters():
    p.requires_grad_(False)
  x_t = torch_models.nhwc_to_nchw(x)
  y_t = torch.from_numpy(y.astype(np.int64))
  apply_fn = jr.models.inference_fn(model)
  with torch.no_grad():
    gap = float(np.abs(net(x_t[:100]).numpy() - np.asarray(apply_fn(variables, x[:100]))).max())
  return {
    "row": row,
    "torch": torch,
    "torchattacks": torchattacks,
    "x": x,
    "y": y,
    "x_t": x_t,
    "y_t": y_t,
    "net": net,
    "apply_fn": apply_fn,
    "variables": variables,
    "gap": gap,
  }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
  """Compares the AutoAttacks on every model and norm; prints the table."""
  args = parse_args(argv)
  parallel.use_host_devices()
  pyautoattack, torch, torchattacks = _import_frameworks()
  import jax  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(len(os.sched_getaffinity(0)))
  clock = CompileClock(jax)
  print(
    f"jax {jax.__version__} on {jax.device_count()} x {jax.devices()[0].device_kind}; "
    f"torch {torch.__version__} ({torch.get_num_threads()} threads); pyautoattack "
    f"{pyautoattack.__version__}; torchattacks {torchattacks.__version__}",
    flush=True,
  )
  results = []
  for row in args.models:
    side = _sides(row, args, torch, torchattacks)
    for norm in args.norms:
      result = _compare(side, norm, args, clock)
      results.append(result)
      print(json.dumps(result), flush=True)
  print()
  print(format_table(results))
  if args.json:
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
  return results


def format_table(results: list[dict[str, Any]]) -> str:
  """The side-by-side table: robust accuracy after each stage in brackets."""
  lines = [
    "| model | threat model | clean | jaxrobust robust | reference robust | difference | "
    "torchattacks robust | jaxrobust s (compile) | reference s | torchattacks s | speed-up |",
    "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
  ]
  stages = lambda a: " / ".join(f"{100 * v:.1f}" for v in a)
  for r in results:
    torch_cell, torch_seconds = "n/a", "n/a"
    if "torchattacks" in r:
      torch_cell = f"{100 * r['torchattacks']:.1f} % ({stages(r['torchattacks_stages'])})"
      torch_seconds = f"{r['torchattacks_seconds']:.0f}"
    lines.append(
      f"| `seed_cnn` {r['model']} | {r['norm']} {r['eps']:.4g} | {100 * r['clean']:.1f} % | "
      f"{100 * r['jaxrobust']:.1f} % ({stages(r['jaxrobust_stages'])}) | "
      f"{100 * r['reference']:.1f} % ({stages(r['reference_stages'])}) | "
      f"{100 * r['difference']:+.1f} | {torch_cell} | "
      f"{r['jaxrobust_seconds'] - r['jaxrobust_compile_seconds']:.0f} "
      f"({r['jaxrobust_compile_seconds']:.0f}) | {r['reference_seconds']:.0f} | "
      f"{torch_seconds} | {r['speedup']:.2f}x |"
    )
  lines.append(
    "\nRobust accuracy after APGD-CE / APGD-T / FAB-T / Square in brackets; reference: "
    "the authors' pyautoattack 0.2.0; speed-up: the reference's seconds over jaxrobust's "
    f"(compile apart); {results[0]['images'] if results else 0} CIFAR-10 test images (JPEG "
    "copy); largest logit difference between the two models "
    f"{max((r['logit_gap'] for r in results), default=0):.1e}."
  )
  return "\n".join(lines)


if __name__ == "__main__":
  main()
