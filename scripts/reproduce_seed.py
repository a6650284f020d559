"""Reproduces the seed study's tables in its own setting, and writes them as markdown.

Trains every row of the seed's tables from its config (`jaxrobust/configs/<row>.py`,
setting `cifar10`: the seed's network `seed_cnn` on all 50,000 CIFAR-10
training images, the JPEG copy in `<repo>/../shared/data` read as `folder:`),
evaluates each on the first `--test_images` test images with the same attacks
(clean, PGD-20 L2 eps 0.5, PGD-20 L-infinity eps 8/255, the per-example worst
case), and writes a markdown table beside the seed's own numbers (DESIGN.md),
with the commands, epochs and wall-clock times, to `--out` (the README
includes it). Randomized models (noise) are evaluated as randomized
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
import importlib
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jaxrobust import parallel  # pylint: disable=wrong-import-position

parallel.use_host_devices()  # before JAX starts: one XLA:CPU device per core

import jax  # pylint: disable=wrong-import-position,g-import-not-at-top

from jaxrobust.training import checkpoints  # pylint: disable=wrong-import-position
from jaxrobust.training import loop as experiment
from jaxrobust.training import metrics
from jaxrobust.training import config as config_lib  # pylint: disable=wrong-import-position

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
# The seed's accuracies (%): natural, PGD L2, PGD L-inf (DESIGN.md).
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


def parse_args(argv):
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
  args.rows = names if args.rows == "all" else [r.strip() for r in args.rows.split(",")]
  unknown = [r for r in args.rows if r not in names]
  if unknown:
    p.error(f"unknown row {unknown[0]!r}; choose from {', '.join(names)}")
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


def row_config(row, config_name, args):
  """The row's config and the overrides that made it from `--config <name>:<setting>`."""
  setting, _ = DATA[args.data]
  config = importlib.import_module(f"jaxrobust.configs.{config_name}").get_config(setting)
  overrides = {"epochs": args.epochs[row]}
  if args.batch_size:
    overrides["batch_size"] = args.batch_size
  note = ""
  if args.model != config.model.name:
    overrides["model.name"] = args.model
    if "spectral" in config.model:  # only the plain CNNs have spectral normalisation
      del config.model["spectral"]
      note = "no spectral normalisation (the ResNets have none)"
  for key, value in overrides.items():
    target, _, leaf = key.rpartition(".")
    (config[target] if target else config)[leaf] = value
  flags = [f"--config {config_name}:{setting}"]
  flags += [f"--config.{k}={v}" for k, v in overrides.items()]
  return config, flags, note


def train_seconds(workdir):
  """Training time: the run's steps times the median seconds per step over its
  logged intervals, so that a resume, a paused process or a burst of load on
  a shared machine (and the first interval's compilation) do not count."""
  rows = [json.loads(l) for l in (Path(workdir) / "metrics.jsonl").read_text().splitlines() if l]
  rows = [r for r in rows if "step" in r]
  per_step = [
    sum(r.get(f, 0.0) for f in metrics.TIMING_FIELDS) / (r["step"] - before["step"])
    for before, r in zip(rows, rows[1:])
    if r["step"] > before["step"]
  ]
  return statistics.median(per_step) * rows[-1]["step"] if per_step else 0.0


def run_row(row, config_name, args):
  config, flags, note = row_config(row, config_name, args)
  workdir = Path(args.runs) / f"{DATA[args.data][0]}-{args.model}-{row}-e{config.epochs}"
  print(f"\n== {row}: {' '.join(flags)} -> {workdir}", flush=True)
  state = experiment.train(config, workdir, progress=sys.stderr.isatty())
  resolved = checkpoints.load_config(workdir)
  model = config_lib.build_model(resolved)
  tick = time.perf_counter()
  report = experiment.evaluate(
    resolved, model, state, names="pgd_l2,pgd_linf", limit=args.test_images
  )
  eval_seconds = time.perf_counter() - tick
  checkpoints.write_atomic(workdir / "seed_report.json", json.dumps(report, indent=2) + "\n")
  commands = [
    f"python train.py {' '.join(flags)} --workdir {workdir.relative_to(REPO)}"
    if workdir.is_relative_to(REPO)
    else f"python train.py {' '.join(flags)} --workdir {shlex.quote(str(workdir))}"
  ]
  commands.append(
    f"python eval.py --workdir {commands[0].split('--workdir ')[1]} "
    f"--attacks pgd_l2,pgd_linf --limit {args.test_images}"
  )
  accuracy = {r["attack"]: 100 * r["accuracy"] for r in report["results"]}
  result = {
    "row": row,
    "config": config_name,
    "epochs": config.epochs,
    "clean": 100 * report["clean_accuracy"],
    "l2": accuracy["pgd_l2"],
    "linf": accuracy["pgd_linf"],
    "worst": 100 * report["worst_case_accuracy"],
    "n": report["n_examples"],
    "train_seconds": train_seconds(workdir),
    "eval_seconds": eval_seconds,
    "commands": commands,
    "note": note,
    "randomized": bool(resolved["model"].get("noise")),
    "noise": resolved["model"].get("noise") or None,
  }
  print(json.dumps({k: v for k, v in result.items() if k != "commands"}), flush=True)
  return result


def _pct(value):
  return "" if value is None else f"{value:.2f}"


def markdown(results, args):
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


def main(argv=None):
  args = parse_args(argv)
  rows = {r: c for r, c, _ in ROWS}
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  results = []
  for row in args.rows:  # the table is rewritten after each row
    results.append(run_row(row, rows[row], args))
    checkpoints.write_atomic(out, markdown(results, args))
  print(f"\nwrote {out}\n\n{out.read_text()}")


if __name__ == "__main__":
  main()
