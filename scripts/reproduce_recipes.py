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
import importlib
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scripts import reproduce_seed  # pylint: disable=wrong-import-position  (host devices set)

import jax  # pylint: disable=wrong-import-position,g-import-not-at-top

from jaxrobust.training import checkpoints  # pylint: disable=wrong-import-position
from jaxrobust.training import loop as experiment
from jaxrobust.training import config as config_lib  # pylint: disable=wrong-import-position

# (row, config, the settings changed from it)
ROWS = (
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


def parse_args(argv):
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
  args.rows = names if args.rows == "all" else [r.strip() for r in args.rows.split(",")]
  unknown = [r for r in args.rows if r not in names]
  if unknown:
    p.error(f"unknown row {unknown[0]!r}; choose from {', '.join(names)}")
  if args.epochs < 1 or args.test_images < 1:
    p.error("--epochs and --test_images must be >= 1")
  return args


def run_row(row, config_name, changes, args):
  config = importlib.import_module(f"jaxrobust.configs.{config_name}").get_config("cifar10")
  overrides = {"epochs": args.epochs, **changes}
  for key, value in overrides.items():
    target, _, leaf = key.rpartition(".")
    (config[target] if target else config)[leaf] = value
  workdir = Path(args.runs) / f"cifar10-seed_cnn-{row}-e{args.epochs}"
  flags = [f"--config {config_name}:cifar10"] + [f"--config.{k}={v}" for k, v in overrides.items()]
  print(f"\n== {row}: {' '.join(flags)} -> {workdir}", flush=True)
  done = workdir / "recipes_row.json"
  before = json.loads(done.read_text()) if done.exists() else {}
  if before.get("n") == args.test_images:
    print(f"(evaluated before: {done})", flush=True)
    return {**before, "train_seconds": reproduce_seed.train_seconds(workdir)}
  state = experiment.train(config, workdir, progress=sys.stderr.isatty())
  resolved = checkpoints.load_config(workdir)
  tick = time.perf_counter()
  report = experiment.evaluate(
    resolved, config_lib.build_model(resolved), state, names=ATTACKS, limit=args.test_images
  )
  eval_seconds = time.perf_counter() - tick
  checkpoints.write_atomic(workdir / "recipes_report.json", json.dumps(report, indent=2) + "\n")
  accuracy = {r["attack"]: 100 * r["accuracy"] for r in report["results"]}
  result = {
    "row": row,
    "flags": " ".join(flags),
    "workdir": str(workdir.relative_to(REPO) if workdir.is_relative_to(REPO) else workdir),
    "clean": 100 * report["clean_accuracy"],
    "autoattack": accuracy["autoattack_linf"],
    "pgd_l2": accuracy["pgd_l2"],
    "n": report["n_examples"],
    "train_seconds": reproduce_seed.train_seconds(workdir),
    "eval_seconds": eval_seconds,
  }
  checkpoints.write_atomic(done, json.dumps(result, indent=2) + "\n")
  print(json.dumps(result), flush=True)
  return result


def markdown(results, args, before=""):
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


def main(argv=None):
  args = parse_args(argv)
  rows = {r: (c, changes) for r, c, changes in ROWS}
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  before = out.read_text() if out.exists() else ""
  results = []
  for row in args.rows:  # the table is rewritten after each row
    results.append(run_row(row, *rows[row], args))
    checkpoints.write_atomic(out, markdown(results, args, before))
  print(f"\nwrote {out}\n\n{out.read_text()}")


if __name__ == "__main__":
  main()
