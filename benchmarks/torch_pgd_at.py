"""A plain PyTorch PGD-AT baseline of the seed's network, beside the recipes' table.

The same network (`seed_cnn`, with the initial weights `train.py --config
pgd_at:cifar10 --config.seed=<seed>` starts from, converted with
`jaxrobust.interop.to_torch`, normalisation inside), the same
data (the CIFAR-10 JPEG copy in `../shared/data`, all 50,000 training
images) and the recipe of `--config pgd_at:cifar10` written as a plain
PyTorch loop: PGD-7 L-infinity 8/255 (step 2.5 eps / 7, random start;
torchattacks' PGD), Adam 1e-3 with 100 warm-up steps then cosine decay,
batch 128, random crop (4 pixels of zero padding) and flip per example.
Evaluated like `scripts/reproduce_recipes.py`'s rows: torchattacks'
AutoAttack standard (the reference's settings, as `benchmarks/autoattack.py`
runs it) at L-infinity 8/255, and PGD-20 L2 0.5, on the first
`--test_images` test images.

  pip install -r requirements-bench.txt && pip install --no-deps torchattacks==3.5.1
  python benchmarks/torch_pgd_at.py --epochs 10 --test_images 2000
  python benchmarks/torch_pgd_at.py --epochs 1 --train_images 512 --test_images 16   # a quick check
"""

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

EPS = 8 / 255


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """The command line, checked."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--epochs", type=int, default=10)
  p.add_argument("--test_images", type=int, default=2000, help="the first N test images")
  p.add_argument("--train_images", type=int, default=0, help="0: all 50,000 (else a quick check)")
  p.add_argument("--batch_size", type=int, default=128)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", default=None, help="also write the result here")
  args = p.parse_args(argv)
  if min(args.epochs, args.test_images, args.batch_size) < 1 or args.train_images < 0:
    p.error("--epochs, --test_images and --batch_size must be >= 1, --train_images >= 0")
  return args


def crop_and_flip(torch: Any, x: Any, generator: Any, padding: int = 4) -> Any:
  """Per example: a random crop of the zero-padded image, flipped with probability 1/2."""
  n, _, h, w = x.shape
  padded = torch.nn.functional.pad(x, (padding,) * 4)
  tops = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
  lefts = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
  flips = torch.rand(n, generator=generator) < 0.5
  out = torch.stack(
    [
      padded[i, :, t : t + h, l : l + w]
      for i, (t, l) in enumerate(zip(tops.tolist(), lefts.tolist()))
    ]
  )
  return torch.where(flips[:, None, None, None], out.flip(-1), out)


def initial_model(config: Any, train_set: Any) -> tuple[Any, Any]:
  """`train.py`'s model for `config` and its step-0 variables (experiment.initial_state)."""
  import jax  # pylint: disable=g-import-not-at-top

  from jaxrobust.training import config as config_lib  # pylint: disable=g-import-not-at-top
  from jaxrobust import parallel  # pylint: disable=g-import-not-at-top
  from jaxrobust.training import loop as experiment

  resolved = config_lib.resolve(config, train_set)
  model = config_lib.build_model(resolved)
  tx = config_lib.make_optimizer(resolved)
  state = experiment.initial_state(resolved, model, tx, parallel.mesh())
  return model, jax.device_get({"params": state.params, **state.model_state})


def markdown_row(result: dict[str, Any]) -> str:
  """`result` as a row of the table of `scripts/reproduce_recipes.py`."""
  command = (
    f"python benchmarks/torch_pgd_at.py --epochs {result['epochs']} "
    f"--test_images {result['n']} --seed {result['seed']}"
  )
  return (
    f"| pgd_at, plain PyTorch (seed {result['seed']}) | {result['clean']:.2f} "
    f"| {result['autoattack']:.2f} | {result['pgd_l2']:.2f} | {result['train_seconds']:.0f} "
    f"| {result['eval_seconds']:.0f} | `{command}` |"
  )


def _train(
  torch: Any, torchattacks: Any, net: Any, xs: Any, ys: Any, args: argparse.Namespace
) -> float:
  """Trains `net` on (`xs`, `ys`) with PGD-7 AT, Adam and a warm-up-then-cosine
  schedule, crops and flips; returns the seconds it took."""
  generator = torch.Generator().manual_seed(args.seed)
  steps_per_epoch = len(xs) // args.batch_size
  total = args.epochs * steps_per_epoch
  optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
  warmup = min(100, total)
  schedule = torch.optim.lr_scheduler.LambdaLR(
    optimizer,
    lambda s: (
      (s + 1) / warmup
      if s < warmup
      else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(total - warmup, 1)))
    ),
  )
  attack = torchattacks.PGD(net, eps=EPS, alpha=2.5 * EPS / 7, steps=7, random_start=True)
  began = time.perf_counter()
  for epoch in range(args.epochs):
    order = torch.randperm(len(xs), generator=generator)
    correct = 0
    for step in range(steps_per_epoch):
      index = order[step * args.batch_size : (step + 1) * args.batch_size]
      xb, yb = crop_and_flip(torch, xs[index], generator), ys[index]
      adv = attack(xb, yb)
      net.train()
      logits = net(adv)
      loss = torch.nn.functional.cross_entropy(logits, yb)
      optimizer.zero_grad()
      loss.backward()
      optimizer.step()
      schedule.step()
      correct += int((logits.argmax(1) == yb).sum())
    print(
      f"epoch {epoch + 1}: training accuracy on PGD-7 examples "
      f"{correct / (steps_per_epoch * args.batch_size):.3f}",
      flush=True,
    )
  return time.perf_counter() - began


def _evaluate(torch: Any, torchattacks: Any, net: Any, test: Any, n: int) -> dict[str, Any]:
  """Clean, AutoAttack L-inf and PGD-20 L2 accuracy (%) of `net` on the first `n`
  test images, the number of images and the seconds it took."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  import jaxrobust as jr  # pylint: disable=g-import-not-at-top
  from benchmarks.autoattack import torch_autoattack  # pylint: disable=g-import-not-at-top

  net.eval()
  for p in net.parameters():
    p.requires_grad_(False)
  x_test = jr.interop.nhwc_to_nchw(test.x[:n])
  y_test = torch.from_numpy(test.y[:n].astype(np.int64))
  began = time.perf_counter()
  with torch.no_grad():
    clean = net(x_test).argmax(1) == y_test
  robust_aa, _, _ = torch_autoattack(torch, torchattacks, net, "linf", EPS, x_test, y_test, 500)
  pgd_l2 = torchattacks.PGDL2(net, eps=0.5, alpha=0.125, steps=20, random_start=True)
  adv = torch.cat(
    [pgd_l2(x_test[i : i + 500], y_test[i : i + 500]) for i in range(0, len(x_test), 500)]
  )
  with torch.no_grad():
    robust_l2 = clean & (net(adv).argmax(1) == y_test)
  return {
    "n": len(x_test),
    "clean": 100 * float(clean.float().mean()),
    "autoattack": 100 * float(np.mean(robust_aa)),
    "pgd_l2": 100 * float(robust_l2.float().mean()),
    "eval_seconds": time.perf_counter() - began,
  }


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """Trains and evaluates the baseline; prints its row of the recipes' table."""
  args = parse_args(argv)
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import torchattacks  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise SystemExit(f"the baseline needs PyTorch and torchattacks ({e})") from None
  import numpy as np  # pylint: disable=g-import-not-at-top

  import jaxrobust as jr  # pylint: disable=g-import-not-at-top
  from jaxrobust.configs import pgd_at  # pylint: disable=g-import-not-at-top
  from jaxrobust.training import config as config_lib  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(len(os.sched_getaffinity(0)))
  torch.manual_seed(args.seed)
  config = pgd_at.get_config("cifar10")
  train, test = config_lib.load_split(config, "train"), config_lib.load_split(config, "test")
  x_train, y_train = train.x, train.y
  if args.train_images:
    x_train, y_train = x_train[: args.train_images], y_train[: args.train_images]
  config.seed = args.seed
  model, variables = initial_model(config, train)
  net = jr.interop.to_torch(model, variables, x_train.shape[1:3])
  for p in net.parameters():
    p.requires_grad_(True)
  xs = jr.interop.nhwc_to_nchw(x_train)
  ys = torch.from_numpy(y_train.astype(np.int64))
  train_seconds = _train(torch, torchattacks, net, xs, ys, args)
  evaluated = _evaluate(torch, torchattacks, net, test, args.test_images)
  result = {
    "row": "pgd_at (plain PyTorch)",
    "seed": args.seed,
    "epochs": args.epochs,
    "train_images": len(xs),
    "n": evaluated["n"],
    "clean": evaluated["clean"],
    "autoattack": evaluated["autoattack"],
    "pgd_l2": evaluated["pgd_l2"],
    "train_seconds": train_seconds,
    "eval_seconds": evaluated["eval_seconds"],
  }
  print(json.dumps(result), flush=True)
  print(markdown_row(result), flush=True)
  if args.json:
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
  return result


if __name__ == "__main__":
  main()
