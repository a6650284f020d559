"""MART's objective of trained models, beside the constant prediction's.

MART (Wang et al. 2020, `objectives.mart_loss`) minimises

  BCE(p', y) + lam * KL(p || p') * (1 - p_y),  p = softmax f(x), p' = softmax f(x').

A model whose prediction does not depend on its input has KL 0 and, when its
prediction is uniform over K classes, the objective ln K - ln(1.0001 - 1/K)
(2.408 for K = 10) on every example. Where the robust models one can train
score barely below that, gradient descent on MART can settle on the constant
prediction and not leave it. For each run directory this prints MART's
objective (its two terms apart) on the first `--images` images of `--split`,
x' as MART's config draws it (PGD-10 L-infinity on the cross-entropy from
x + 0.001 N(0, I), step eps / 4, eps the run's `train_attack.eps` or `--eps`), the
accuracy on x and x', and how much the logits vary over the images (0 for a
constant model).

  python scripts/mart_objective.py runs/recipes/cifar10-seed_cnn-*-e10
"""

import argparse
import functools
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position

from jaxrobust.training import config as config_lib  # pylint: disable=wrong-import-position
from jaxrobust import keys  # pylint: disable=wrong-import-position
from jaxrobust.training import loop as experiment
from jaxrobust.training import objectives
from jaxrobust.attacks import pgd  # pylint: disable=wrong-import-position
from jaxrobust.types import Images, Labels, LogitsFn, PRNGKey  # pylint: disable=wrong-import-position


def constant_objective(num_classes: int) -> float:
  """MART's objective of the uniform prediction (KL 0): ln K - ln(1.0001 - 1/K)."""
  return math.log(num_classes) - math.log(1.0001 - 1 / num_classes + 1e-12)


def mart_terms(
  logits_fn: LogitsFn, x: Images, y: Labels, *, eps: float, lam: float, key: PRNGKey
) -> dict[str, float]:
  """Mean BCE and mean lam * KL * (1 - p_y) of MART on (x, y), and the clean
  and adversarial accuracy, with x' drawn as MART's config draws it."""
  attack = pgd(norm="linf", eps=eps, step_size=eps / 4, steps=10, random_start=0.001)
  x_adv = attack(logits_fn, x, y, keys.example_keys(key, jnp.arange(len(y))))
  clean, adv = logits_fn(x), logits_fn(x_adv)
  total = objectives.mart_loss(clean, adv, y, lam=lam)
  bce = objectives.mart_loss(clean, adv, y, lam=0.0)
  return {
    "bce": float(bce.mean()),
    "kl_term": float((total - bce).mean()),
    "objective": float(total.mean()),
    "clean_accuracy": float((clean.argmax(-1) == y).mean()),
    "adv_accuracy": float((adv.argmax(-1) == y).mean()),
    "logit_spread": float(clean.std(0).mean()),
  }


def main(argv: list[str] | None = None) -> None:
  """Prints MART's objective of every run directory given."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("workdirs", nargs="+", help="trained run directories")
  p.add_argument("--images", type=int, default=512, help="the first N images of --split")
  p.add_argument("--split", default="train", choices=("train", "test"))
  p.add_argument(
    "--eps", type=float, help="L-infinity radius (default: the run's train_attack.eps)"
  )
  p.add_argument("--lam", type=float, default=6.0, help="MART's lambda")
  args = p.parse_args(argv)
  if args.images < 1:
    p.error("--images must be >= 1")
  data = {}
  for workdir in args.workdirs:
    resolved, model, state = experiment.restore(workdir)
    eps = args.eps or (resolved.get("train_attack") or {}).get("eps")
    if not eps:
      p.error(f"{workdir} has no train_attack.eps; pass --eps")
    name = resolved["data"]["name"]
    if name not in data:
      split = config_lib.load_split(resolved, args.split)
      data[name] = split.x[: args.images], split.y[: args.images]
      print(
        f"{name}: the constant uniform prediction's MART objective "
        f"{constant_objective(split.num_classes):.3f}"
      )
    x, y = data[name]
    r = mart_terms(
      functools.partial(model.apply, state.variables),
      jnp.asarray(x),
      jnp.asarray(y),
      eps=eps,
      lam=args.lam,
      key=jax.random.key(0),
    )
    print(
      f"{Path(workdir).name}: MART {r['objective']:.3f} = BCE {r['bce']:.3f} + "
      f"lam KL (1 - p_y) {r['kl_term']:.3f}; accuracy on x {100 * r['clean_accuracy']:.1f} %, "
      f"on x' {100 * r['adv_accuracy']:.1f} %; logit spread {r['logit_spread']:.4f}",
      flush=True,
    )


if __name__ == "__main__":
  main()
