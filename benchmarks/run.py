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

The harness (timing, medians, ratios, the table) is `benchmarks/harness.py`, what
the rows share `benchmarks/bench.py`, and the rows `benchmarks/rows/`.

On a GPU: install jax with CUDA and a CUDA build of torch, and run the same
command; rows then run on the first GPU (jaxrobust on every local GPU, split
over the batch) and `--devices` is ignored.
"""

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))  # `python benchmarks/run.py` from a clone

from benchmarks.bench import Bench  # noqa: E402  (does not start JAX)
from benchmarks.harness import (  # noqa: E402
  L2_EPS,
  LINF_EPS,
  SIGMA,
  format_table,
  in_dtype_row,
  machine_description,
  median,
)
from benchmarks.model import InDtype, torch_in_dtype  # noqa: E402
from benchmarks.rows import RUNNERS  # noqa: E402
from jaxrobust import parallel  # noqa: E402

# Reachable from here, as docs/performance.md and the tests name them.
__all__ = [
  "InDtype",
  "L2_EPS",
  "LINF_EPS",
  "SIGMA",
  "in_dtype_row",
  "main",
  "parse_args",
  "torch_in_dtype",
]

ROWS = tuple(RUNNERS)
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


def _add_row_arguments(p: argparse.ArgumentParser) -> None:
  """The arguments that size single rows."""
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


def _parser() -> argparse.ArgumentParser:
  """The command line's arguments."""
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
  _add_row_arguments(p)
  p.add_argument(
    "--cache",
    default=None,
    help="where trained weights are cached (default: $JAXROBUST_CACHE "
    "or ~/.cache/jaxrobust, under bench/)",
  )
  return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """The command line, checked: `--rows` and `--dtypes` as tuples."""
  p = _parser()
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
    p.error("--repeats must be >= 1 (5 or more for the medians docs/performance.md reports)")
  if args.batch_size < 1:
    p.error("--batch-size must be >= 1")
  return args


def _import_frameworks() -> tuple[Any, ...]:
  """(jax, jnp, np, torch, torchattacks, jr, torch_models), or exit saying what to install."""
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

  return jax, jnp, np, torch, torchattacks, jr, torch_models


def _run_rows(bench: Bench, args: argparse.Namespace) -> list[dict]:
  """Every row of `--rows` in every dtype of `--dtypes`, printing each one's ratio."""
  rows: list[dict] = []
  for name in args.rows:
    for dtype in args.dtypes:
      print(f"{name} ({dtype}) ..." if len(args.dtypes) > 1 else f"{name} ...", end=" ", flush=True)
      start = time.perf_counter()
      bench.use_dtype(dtype)
      row = RUNNERS[name](bench)
      if dtype != "float32":
        row = in_dtype_row(row, dtype, next((r for r in rows if r["row"] == name), None))
      rows.append(row)
      outcome = f"{row['ratio']:.2f}x" if "ratio" in row else f"{row['jaxrobust']:.0f} MiB"
      print(f"{outcome} ({time.perf_counter() - start:.0f} s)", flush=True)
  return rows


def main(argv: list[str] | None = None) -> dict:
  """Runs the benchmark, prints its table and returns its results."""
  args = parse_args(argv)
  if not parallel.use_host_devices(args.devices) and args.devices:  # before JAX starts
    print(
      f"NOTE: XLA_FLAGS is set ({os.environ.get('XLA_FLAGS')!r}), so --devices "
      f"{args.devices} is ignored",
      flush=True,
    )
  jax, jnp, np, torch, torchattacks, jr, torch_models = _import_frameworks()
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
  rows = _run_rows(bench, args)
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
