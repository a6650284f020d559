"""Trains the field's training recipes in the seed's setting and writes their table.

Every row trains the seed's network (`seed_cnn`) on all 50,000 CIFAR-10
training images (the JPEG copy in `<repo>/../shared/data`, setting
`cifar10`) for the same number of epochs, from a packaged config with at
most two settings changed:

  pgd_at_no_aug  `pgd_at` without augmentation (--config.data.augment=none)
  pgd_at         `pgd_at` with random crop and flip (the setting's default)
  pgd_at_seed1   the same from another seed (initialisation, order, crops, attacks)
  trades         `trades` (beta 6), mart (`mart`), fast_at (`fast_at`, its guard on)
  fast_at_lr0.05 `fast_at` with its cyclic schedule peaking at 0.05, not Wong et al.'s
                 0.2 for a BatchNorm ResNet (--config.optimizer.learning_rate=0.05)
  pgd_at_awp     `pgd_at` + adversarial weight perturbation (--config.awp=0.005)
  pgd_at_awp_warmup2  the same from epoch 2 on (--config.awp_warmup=2): PGD-AT alone
                 leaves its initial plateau in its first 1.3 epochs
  pgd_at_ema     `pgd_at` + an EMA of the weights, evaluated (--config.ema=0.995)

and evaluates each on the first `--test_images` test images with the
configs' `eval.default`: AutoAttack standard (L-infinity 8/255) and PGD-20 L2
0.5, with its training and evaluation seconds. The markdown table goes to
`--out`, rewritten after every row (keeping the rows of the table there
that this run does not replace, when that table is of the same setting:
`--rows` adds or replaces rows); the runs go to
`<runs>/cifar10-seed_cnn-<row>-e<epochs>` and a rerun resumes them (the
training time is the steps times the median seconds per step of the logged
intervals, so a resume or a pause does not count; a row evaluated on as many
images before is read back from its `recipes_row.json`, not evaluated again).

  python scripts/reproduce_recipes.py                     # 10 epochs, 2,000 test images: hours on 2 CPU cores
  python scripts/reproduce_recipes.py --epochs 1 --test_images 100 --rows fast_at,pgd_at_ema
"""

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scripts import reproduction  # noqa: E402  (one XLA:CPU device per core, before JAX starts)

import jax  # noqa: E402  pylint: disable=g-import-not-at-top

from jaxrobust.training import checkpoints  # noqa: E402

# (row, config, the settings changed from it)
ROWS: tuple[tuple[str, str, dict[str, Any]], ...] = (
  ("pgd_at_no_aug", "pgd_at", {"data.augment": "none"}),
  ("pgd_at", "pgd_at", {}),
  ("pgd_at_seed1", "pgd_at", {"seed": 1}),
  ("trades", "trades", {}),
  ("mart", "mart", {}),
  ("fast_at", "fast_at", {}),
  ("fast_at_lr0.05", "fast_at", {"optimizer.learning_rate": 0.05}),
  ("pgd_at_awp", "pgd_at", {"awp": 0.005}),
  ("pgd_at_awp_warmup2", "pgd_at", {"awp": 0.005, "awp_warmup": 2}),
  ("pgd_at_ema", "pgd_at", {"ema": 0.995}),
)
ATTACKS = "autoattack_linf,pgd_l2"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  """The command line, checked: `--rows` as a list."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--epochs", type=int, default=10, help="training epochs of every row")
  p.add_argument("--test_images", type=int, default=2000, help="the first N test images")
  names = [r for r, _, _ in ROWS]
  p.add_argument("--rows", default="all", help=f"comma-separated rows ({', '.join(names)}) or all")
  p.add_argument("--runs", default=str(REPO / "runs" / "recipes"), help="run directories")
  p.add_argument(
    "--out", default=str(REPO / "docs" / "recipes_reproduction.md"), help="the markdown written"
  )
  args = p.parse_args(argv)
  args.rows = reproduction.selected_rows(p, args.rows, names)
  if args.epochs < 1 or args.test_images < 1:
    p.error("--epochs and --test_images must be >= 1")
  return args


def run_row(
  row: str, config_name: str, changes: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
  """Trains and evaluates the row (or reads back its evaluation on as many images);
  its line of the table."""
  overrides = {"epochs": args.epochs, **changes}
  config = reproduction.override(reproduction.packaged_config(config_name, "cifar10"), overrides)
  workdir = Path(args.runs) / f"cifar10-seed_cnn-{row}-e{args.epochs}"
  flags = [f"--config {config_name}:cifar10"] + [f"--config.{k}={v}" for k, v in overrides.items()]
  print(f"\n== {row}: {' '.join(flags)} -> {workdir}", flush=True)
  done = workdir / "recipes_row.json"
  before = json.loads(done.read_text()) if done.exists() else {}
  if before.get("n") == args.test_images:
    print(f"(evaluated before: {done})", flush=True)
    return {**before, "train_seconds": reproduction.train_seconds(workdir)}
  measured = reproduction.train_and_evaluate(
    config, workdir, attacks=ATTACKS, limit=args.test_images, report_name="recipes_report.json"
  )
  result = {
    "row": row,
    "flags": " ".join(flags),
    "workdir": reproduction.relative(workdir),
    "clean": measured["clean"],
    "autoattack": measured["accuracy"]["autoattack_linf"],
    "pgd_l2": measured["accuracy"]["pgd_l2"],
    "n": measured["n"],
    "train_seconds": measured["train_seconds"],
    "eval_seconds": measured["eval_seconds"],
  }
  checkpoints.write_atomic(done, json.dumps(result, indent=2) + "\n")
  print(json.dumps(result), flush=True)
  return result


def markdown(results: list[dict], args: argparse.Namespace, before: str = "") -> str:
  """The table of `results`, with the rows of the table `before` that they do
  not replace, when `before` describes the same setting (epochs, test images,
  machine)."""
  about = (
    f"`seed_cnn`, CIFAR-10 (JPEG copy), all 50,000 training images, {args.epochs} "
    f"epochs per row; evaluated on the first {results[0]['n']:,} test images with "
    f"AutoAttack standard (L-inf 8/255) and PGD-20 L2 0.5. Accuracy %. Machine: "
    f"{jax.device_count()} x {jax.devices()[0].platform.upper()} device(s), "
    f"jax {jax.__version__}."
  )
  kept = before.splitlines()
  # Its rows follow the comment, this line, a blank line and the table's header.
  rows = {}
  if about in kept:
    rows = {line.split(" | ")[0].removeprefix("| "): line for line in kept[5:] if line}
  for r in results:
    rows[r["row"]] = (
      f"| {r['row']} | {r['clean']:.2f} | {r['autoattack']:.2f} | {r['pgd_l2']:.2f} "
      f"| {r['train_seconds']:.0f} | {r['eval_seconds']:.0f} "
      f"| `python train.py {r['flags']} --workdir {r['workdir']}` |"
    )
  lines = [
    f"<!-- written by scripts/reproduce_recipes.py on "
    f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; do not edit by hand -->",
    about,
    "",
    "| row | clean | AutoAttack L-inf | PGD-20 L2 | train (s) | eval (s) | command |",
    "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
  ]
  lines += [rows[row] for row, _, _ in ROWS if row in rows]
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
  """Trains, evaluates and tabulates every row of `--rows`."""
  args = parse_args(argv)
  rows = {r: (c, changes) for r, c, changes in ROWS}
  out = Path(args.out)
  before = out.read_text() if out.exists() else ""
  reproduction.write_rows(  # the table is rewritten after each row
    args.rows,
    lambda row: run_row(row, *rows[row], args),
    lambda results: markdown(results, args, before),
    out,
  )


if __name__ == "__main__":
  main()
