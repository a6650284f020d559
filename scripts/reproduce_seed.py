"""Reproduces the seed study's tables in its own setting, and writes them as markdown.

Trains every row of the seed's tables from its config (`jaxrobust/configs/<row>.py`,
setting `cifar10`: the seed's network `seed_cnn` on all 50,000 CIFAR-10
training images, the JPEG copy in `<repo>/../shared/data` read as `folder:`),
evaluates each on the first `--test_images` test images with the same attacks
(clean, PGD-20 L2 eps 0.5, PGD-20 L-infinity eps 8/255, the per-example worst
case), and writes a markdown table beside the seed study's own numbers,
with the commands, epochs and wall-clock times, to `--out` (docs/recipes.md
copies it). Randomized models (noise) are evaluated as randomized
classifiers: the mean softmax over their fixed noise draws, attacked through
them (EOT).

  python scripts/reproduce_seed.py                          # every row, 10 epochs, 10,000 test images
  python scripts/reproduce_seed.py --epochs 1 --test_images 1000 --rows natural,pgd_at
  python scripts/reproduce_seed.py --epochs 2,rat=1,mat_max=1   # per-row epochs
  python scripts/reproduce_seed.py --data tfds              # the original CIFAR-10 (tfds:cifar10)
  python scripts/reproduce_seed.py --model preact_resnet18  # PreAct ResNet-18 (on a GPU)

`--data tfds` needs CIFAR-10 prepared once by tensorflow-datasets (which
needs `pip install tensorflow-cpu` for the download and conversion). Runs
go to `<runs>/<setting>-<model>-<row>-e<epochs>`; rerunning resumes or
reuses finished runs, and the training time is the steps times the median
seconds per step of the logged intervals (`metrics.jsonl`), so a resume, a
pause or the first interval's compilation does not count.
"""

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scripts import reproduction  # noqa: E402  (one XLA:CPU device per core, before JAX starts)
from scripts.reproduction import train_seconds  # noqa: E402, F401  (tests use it from here)

import jax  # noqa: E402  pylint: disable=g-import-not-at-top

# (row, config file, the seed's row it reproduces)
ROWS = (
  ("natural", "natural", ""),
  ("pgd_at", "pgd_at", "AT"),
  ("pgd_at_sn_noise", "pgd_at_sn_noise", "PGD model"),
  ("cw_pgd_mix", "cw_pgd_mix", "C&W+PGD model"),
  ("rat", "rat", "RAT"),
  ("mat_rand", "mat_rand", "MAT"),
  ("mat_max", "mat_max", "MAT"),
)
# The seed study's accuracies (%): natural, PGD L2, PGD L-inf.
SEED = {
  "PGD model": (None, 24.79, 36.14),
  "C&W+PGD model": (None, 2.73, 27.49),
  "AT": (31.93, 31.34, 23.82),
  "RAT": (38.87, 38.18, 24.70),
  "MAT": (40.72, 39.84, 27.14),
}
DATA = {
  "folder": ("cifar10", "CIFAR-10 (JPEG copy)"),
  "tfds": ("cifar10_tfds", "CIFAR-10 (tfds:cifar10)"),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  """The command line, checked: `--rows` as a list, `--epochs` as row -> epochs."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument(
    "--epochs",
    default="10",
    help="training epochs per row: N, optionally with per-row exceptions, e.g. 2,rat=1,mat_max=1",
  )
  p.add_argument(
    "--test_images", type=int, default=10_000, help="evaluate on the first N test images"
  )
  p.add_argument(
    "--rows",
    default="all",
    help=f"comma-separated rows ({', '.join(r for r, _, _ in ROWS)}) or all",
  )
  p.add_argument(
    "--data",
    choices=sorted(DATA),
    default="folder",
    help="folder: the JPEG copy in ../shared/data; tfds: tfds:cifar10",
  )
  p.add_argument(
    "--model",
    default="seed_cnn",
    help="seed_cnn (the seed's network) or preact_resnet18 (for a GPU)",
  )
  p.add_argument("--batch_size", type=int, default=0, help="0: the configs' (128)")
  p.add_argument("--runs", default=str(REPO / "runs" / "seed"), help="run directories")
  p.add_argument(
    "--out", default=str(REPO / "docs" / "seed_reproduction.md"), help="the markdown file written"
  )
  args = p.parse_args(argv)
  names = [r for r, _, _ in ROWS]
  args.rows = reproduction.selected_rows(p, args.rows, names)
  try:
    default, *exceptions = args.epochs.split(",")
    args.epochs = {row: int(default) for row in names}
    args.epochs.update({r.strip(): int(n) for r, n in (e.split("=") for e in exceptions)})
  except ValueError:
    p.error(f"--epochs must be N or N,row=N,..., got {args.epochs!r}")
  if set(args.epochs) != set(names):
    p.error(f"--epochs names an unknown row; rows are {', '.join(names)}")
  if min(args.epochs.values()) < 1 or args.test_images < 1 or args.batch_size < 0:
    p.error("--epochs and --test_images must be >= 1, --batch_size >= 0")
  return args


def row_config(row: str, config_name: str, args: argparse.Namespace) -> tuple[Any, list[str], str]:
  """The row's config, the flags that make it (`--config <name>:<setting>` and its
  overrides), and a note on what `--model` changed."""
  setting, _ = DATA[args.data]
  config = reproduction.packaged_config(config_name, setting)
  overrides: dict[str, Any] = {"epochs": args.epochs[row]}
  if args.batch_size:
    overrides["batch_size"] = args.batch_size
  note = ""
  if args.model != config.model.name:
    overrides["model.name"] = args.model
    if "spectral" in config.model:  # only the plain CNNs have spectral normalisation
      del config.model["spectral"]
      note = "no spectral normalisation (the ResNets have none)"
  reproduction.override(config, overrides)
  flags = [f"--config {config_name}:{setting}"]
  flags += [f"--config.{k}={v}" for k, v in overrides.items()]
  return config, flags, note


def _commands(flags: list[str], workdir: Path, test_images: int) -> list[str]:
  """The `train.py` and `eval.py` commands that make the row."""
  where = (
    str(workdir.relative_to(REPO)) if workdir.is_relative_to(REPO) else shlex.quote(str(workdir))
  )
  return [
    f"python train.py {' '.join(flags)} --workdir {where}",
    f"python eval.py --workdir {where} --attacks pgd_l2,pgd_linf --limit {test_images}",
  ]


def run_row(row: str, config_name: str, args: argparse.Namespace) -> dict[str, Any]:
  """Trains and evaluates the row; its line of the table."""
  config, flags, note = row_config(row, config_name, args)
  workdir = Path(args.runs) / f"{DATA[args.data][0]}-{args.model}-{row}-e{config.epochs}"
  print(f"\n== {row}: {' '.join(flags)} -> {workdir}", flush=True)
  measured = reproduction.train_and_evaluate(
    config,
    workdir,
    attacks="pgd_l2,pgd_linf",
    limit=args.test_images,
    report_name="seed_report.json",
  )
  resolved = measured["resolved"]
  result = {
    "row": row,
    "config": config_name,
    "epochs": config.epochs,
    "clean": measured["clean"],
    "l2": measured["accuracy"]["pgd_l2"],
    "linf": measured["accuracy"]["pgd_linf"],
    "worst": measured["worst"],
    "n": measured["n"],
    "train_seconds": measured["train_seconds"],
    "eval_seconds": measured["eval_seconds"],
    "commands": _commands(flags, workdir, args.test_images),
    "note": note,
    "randomized": bool(resolved["model"].get("noise")),
    "noise": resolved["model"].get("noise") or None,
  }
  print(json.dumps({k: v for k, v in result.items() if k != "commands"}), flush=True)
  return result


def _pct(value: float | None) -> str:
  return "" if value is None else f"{value:.2f}"


def markdown(results: list[dict], args: argparse.Namespace) -> str:
  """The table of `results` beside the seed's numbers, with the commands."""
  _, data_name = DATA[args.data]
  lines = [
    f"<!-- written by scripts/reproduce_seed.py on "
    f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; do not edit by hand -->",
    f"Model `{args.model}`, {data_name}: all 50,000 training images, "
    f"the epochs of each row below; evaluated on the first {results[0]['n']:,} "
    f"test images. Attacks: PGD-20 L2 eps 0.5 (step 0.125), PGD-20 L-inf eps 8/255 "
    f"(step 2/255), one random start each; worst case: correct clean and under "
    f"both. Accuracy %; the seed's numbers (CIFAR-10, the same network, short "
    f"training) beside ours. Machine: {jax.device_count()} x "
    f"{jax.devices()[0].platform.upper()} device(s), jax {jax.__version__}.",
    "",
    "| row | config | epochs | clean | PGD L2 | PGD L-inf | worst case "
    "| seed row | seed clean | seed PGD L2 | seed PGD L-inf | train (s) | eval (s) |",
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
  ]
  seed_row = {r: s for r, _, s in ROWS}
  for r in results:
    seed = SEED.get(seed_row[r["row"]], (None, None, None))
    label = r["row"] + (" (randomized, EOT)" if r["randomized"] else "")
    lines.append(
      f"| {label} | `{r['config']}` | {r['epochs']} | {_pct(r['clean'])} "
      f"| {_pct(r['l2'])} | {_pct(r['linf'])} | {_pct(r['worst'])} "
      f"| {seed_row[r['row']]} | {_pct(seed[0])} | {_pct(seed[1])} | {_pct(seed[2])} "
      f"| {r['train_seconds']:.0f} | {r['eval_seconds']:.0f} |"
    )
  randomized = [r for r in results if r["randomized"]]
  if randomized:
    lines += [
      "",
      "Randomized rows (model.noise) are classified by the mean softmax "
      "over their fixed noise draws, and attacked through the same draws "
      "(expectation over transformation): "
      + "; ".join(
        f"{r['row']}: sigma {r['noise']['sigma']}, {r['noise']['samples']} draws"
        for r in randomized
      )
      + ".",
    ]
  notes = [f"{r['row']}: {r['note']}" for r in results if r["note"]]
  if notes:
    lines += ["", "Notes: " + "; ".join(notes) + "."]
  lines += ["", "Commands (the script runs the same through the library):", "", "```"]
  for r in results:
    lines += r["commands"]
  lines += ["```", ""]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  """Trains, evaluates and tabulates every row of `--rows`."""
  args = parse_args(argv)
  rows = {r: c for r, c, _ in ROWS}
  reproduction.write_rows(  # the table is rewritten after each row
    args.rows,
    lambda row: run_row(row, rows[row], args),
    lambda results: markdown(results, args),
    args.out,
  )


if __name__ == "__main__":
  main()
