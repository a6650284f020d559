"""Evaluates a trained run: accuracy under attack, transfer attacks, certification.

  python eval.py --workdir runs/pgd_at                       # the config's default attacks
  python eval.py --workdir runs/pgd_at --attacks all         # every attack of eval.attacks
  python eval.py --workdir runs/pgd_at --attacks pgd_linf,cw_l2 --limit 200 --out r.json
  python eval.py --workdir runs/pgd_at --config.eval.attacks.pgd_linf.eps=0.3
  python eval.py --workdir runs/pgd_at --sweep               # accuracy vs eps, PNG
  python eval.py --workdir runs/b --transfer-from runs/a     # black-box, crafted on runs/a
  python eval.py --workdir runs/gaussian --certify --sigma 0.25 --n 10000 --limit 100

Attacks are those of the run's config (`eval.attacks`), by label; any setting
can be overridden with --config.eval.attacks.<label>.<key>=<value>. Every
attack report also runs sanity checks that flag gradient masking.
"""
import json
import sys
import time
from pathlib import Path

from jaxrobust import parallel

parallel.use_host_devices()  # before JAX starts: one XLA:CPU device per core

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import ml_collections
from absl import flags
from ml_collections import config_flags

from jaxrobust import checkpoints, checks, cli, evaluation, experiment, models, smoothing

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by train.py.")
_ATTACKS = flags.DEFINE_string(
    "attacks", None, "Comma-separated attack labels of the run's eval.attacks, or "
    "'all' (default: the config's eval.default).")
_SPLIT = flags.DEFINE_enum("split", "test", ["train", "test"], "Data split to evaluate.")
_LIMIT = flags.DEFINE_integer("limit", 0, "Evaluate only the first N examples (0: all).")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Examples per batch (0: the config's).")
_OUT = flags.DEFINE_string("out", None, "Write the report as JSON to this file.")
_PLOT = flags.DEFINE_string("plot", None, "PNG path for --sweep or --certify "
                            "(default: in the workdir).")
_SANITY = flags.DEFINE_boolean("sanity", True, "Run the sanity checks.")
_SWEEP = flags.DEFINE_boolean("sweep", False, "Plot accuracy against eps per attack.")
_TRANSFER = flags.DEFINE_string("transfer-from", None,
                                "Craft the examples on this run's model (black-box).")
_CERTIFY = flags.DEFINE_boolean("certify", False,
                                "Certify with randomized smoothing (Cohen et al. 2019).")
_SIGMA = flags.DEFINE_float("sigma", 0.25, "Smoothing noise level for --certify.")
_N = flags.DEFINE_integer("n", 100_000, "Noise draws to certify each example.")
_N0 = flags.DEFINE_integer("n0", 100, "Noise draws to guess each example's class.")
_ALPHA = flags.DEFINE_float("alpha", 0.001, "Failure probability of each certificate.")


def workdir_in(argv):
  """The --workdir value in `argv`, read before the flags are parsed."""
  for i, arg in enumerate(argv):
    if arg.startswith("--workdir="):
      return arg.split("=", 1)[1]
    if arg == "--workdir" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def define_config_overrides(argv):
  """--config.<key>=<value> overrides of the run's saved config."""
  workdir = workdir_in(argv)
  saved = checkpoints.load_config(workdir, required=False) if workdir else None
  if saved is not None:
    try:  # ml_collections applies the overrides in argv here
      config_flags.DEFINE_config_dict("config", ml_collections.ConfigDict(saved))
    except (KeyError, AttributeError, ValueError, TypeError) as e:
      raise checks.InputError(f"bad --config override: {e}") from None


def main(argv):
  define_config_overrides(argv)
  cli.parse_flags(argv)
  checks.require(_WORKDIR.value, "--workdir is required")
  resolved, model, state = experiment.restore(_WORKDIR.value)
  if "config" in flags.FLAGS:
    resolved = flags.FLAGS.config.to_dict()
  rep = certify(resolved, model, state) if _CERTIFY.value else attack(resolved, model, state)
  rep.update(workdir=_WORKDIR.value, step=int(state.step), split=_SPLIT.value)
  if _OUT.value:
    checkpoints.write_atomic(Path(_OUT.value), json.dumps(rep, indent=2) + "\n")
    print(f"wrote {_OUT.value}")


def attack(resolved, model, state):
  names = _ATTACKS.value or resolved["eval"].get("default")
  source = None
  if _TRANSFER.value:
    _, source_model, source_state = experiment.restore(_TRANSFER.value)
    source = (source_model, source_state)
    print(f"Transfer: examples crafted on {_TRANSFER.value}, classified by {_WORKDIR.value}")
  evaluate = lambda **kw: experiment.evaluate(
      resolved, model, state, split=_SPLIT.value, limit=_LIMIT.value,
      batch_size=_BATCH.value or None, source=source, **kw)
  if models.is_randomized(model):
    noise = resolved["model"]["noise"]
    print(f"Randomized model f~(x) = f(x + d), d ~ N(0, {noise['sigma']:g}^2 I): "
          f"classified by the mean softmax over {noise['samples']} fixed noise draws "
          f"and attacked through the same draws (expectation over transformation)")
  rep = evaluate(names=names, sanity=_SANITY.value and source is None,
                 lipschitz=source is None)
  print(evaluation.format_table(rep))
  if "lipschitz" in rep:
    print(evaluation.format_lipschitz(rep["lipschitz"], rep["lipschitz"]["of"]))
  if "sanity" in rep:
    print(evaluation.format_sanity(rep["sanity"]))
  if _SWEEP.value:
    rep["sweep"] = sweep(resolved, names, evaluate)
  return rep


def sweep(resolved, names, evaluate):
  """Accuracy at multiples of each attack's eps, plotted to a PNG."""
  curves = {}
  for label, spec in evaluation.select(resolved["eval"]["attacks"], names).items():
    if "eps" in spec:
      eps_values = [spec["eps"] * f for f in evaluation.SWEEP_FACTORS]
      rep = evaluate(specs={f"{label}@{e:g}": evaluation.scaled(spec, e / spec["eps"])
                            for e in eps_values})
      curves[label] = [(e, r["accuracy"]) for e, r in zip(eps_values, rep["results"])]
  path = _PLOT.value or str(Path(_WORKDIR.value) / "sweep.png")
  evaluation.plot_sweep(curves, path)
  print(f"wrote {path}")
  return {label: [{"eps": e, "accuracy": a} for e, a in c] for label, c in curves.items()}


def certify(resolved, model, state):
  """Certified accuracy of the smoothed model at radii 0, 0.25, 0.5, ...."""
  test_set = experiment.load_split(resolved, _SPLIT.value)
  x, y = test_set.x, test_set.y
  if _LIMIT.value:
    checks.integer_at_least("limit", _LIMIT.value, 1)
    x, y = x[:_LIMIT.value], y[:_LIMIT.value]
  # A noise-trained model is smoothed through its base classifier f: the
  # smoothing supplies the noise.
  method = "base" if models.is_randomized(model) else None
  logits_fn = lambda xb: model.apply(state.variables, xb, train=False, method=method)
  settings = dict(sigma=_SIGMA.value, n0=_N0.value, n=_N.value, alpha=_ALPHA.value)
  start = time.perf_counter()
  pred, radius = smoothing.certify(
      logits_fn, x, jax.random.key(resolved["seed"]),
      batch_size=_BATCH.value or 1000, **settings)
  rep = smoothing.certification_report(pred, radius, y, seconds=time.perf_counter() - start,
                                       **settings)
  print(smoothing.format_certification_table(rep))
  path = _PLOT.value or str(Path(_WORKDIR.value) / f"certify_sigma{_SIGMA.value:g}.png")
  smoothing.plot_certified_accuracy(rep, path)
  print(f"wrote {path}")
  return rep


if __name__ == "__main__":
  cli.run(main, sys.argv)
