r"""Evaluates a trained run: robust accuracy under attack, transfer attacks, certification.

(`python eval.py ...` in a clone of the repository is the same program as
`jaxrobust-eval ...`.)

  python eval.py --workdir runs/pgd_at                       # AutoAttack + PGD (eval.default)
  python eval.py --workdir runs/pgd_at --checkpoint latest   # not the best (the default)
  python eval.py --workdir runs/pgd_at --suite autoattack --norm l2 --eps 1.0
  python eval.py --workdir runs/pgd_at --attacks all --individual   # every attack alone
  python eval.py --workdir runs/pgd_at --attacks pgd_linf,cw_l2 --limit 200 --out r.json
  python eval.py --workdir runs/pgd_at --config.eval.attacks.pgd_linf.eps=0.3
  python eval.py --workdir runs/pgd_at --sweep               # accuracy vs eps, PNG
  python eval.py --workdir runs/b --transfer-from runs/a     # black-box, crafted on runs/a
  python eval.py --workdir runs/gaussian --certify --n 10000 --limit 100
  python eval.py --torch-checkpoint models/cifar10/Linf/Carmon2019Unlabeled.pt \
      --arch wrn-28-10 --data cifar10 --suite autoattack --limit 1000   # a PyTorch model
  python eval.py --workdir runs/pgd_at --export-torch pgd_at.pt      # to PyTorch
  python eval.py --zoo cifar10/Linf/Carmon2019Unlabeled \
      --torch-checkpoint models/cifar10/Linf/Carmon2019Unlabeled.pt --export-flax carmon
  python eval.py --flax-checkpoint carmon --limit 1000       # no PyTorch needed
  python eval.py --workdir runs/pgd_at --precision bfloat16  # the model in bfloat16

Attacks are those of the run's config (`eval.attacks`), by label; any setting
can be overridden with --config.eval.attacks.<label>.<key>=<value>. Attacks
run as a cascade: each only on the examples the attacks of its threat model
before it left robust (`--individual`: each on every clean-correct example).
Every report also runs sanity checks that flag gradient masking. `--state
FILE` writes the progress after every batch; the same command resumes it.

`--torch-checkpoint` evaluates a PyTorch checkpoint (`.pt`, `.pth`,
`.safetensors`; e.g. from RobustBench's zoo, see docs/interop.md) of
architecture `--arch` on `--data` (a setting of jaxrobust/configs/common.py, whose
attacks and radii it uses, or a jaxrobust data-set name, with CIFAR-10's
radii), without a workdir. `--export-torch` writes a workdir's model as a
PyTorch checkpoint that records its architecture. `--export-flax DIR` writes
a converted model (or a workdir's) as a flax checkpoint, orbax's arrays and
its description, which `--flax-checkpoint DIR` evaluates without PyTorch (a
zoo model as its entry, another on `--data`).
"""

import functools
import io
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from pathlib import Path

import jax
import ml_collections
import numpy as np
from absl import flags
from flax import linen as nn
from ml_collections import config_flags

from jaxrobust import checks, cli, data, evaluation, models, zoo
from jaxrobust.training import checkpoints
from jaxrobust.training import loop as experiment
from jaxrobust.training import config as config_lib
from jaxrobust import parallel
from jaxrobust.evaluation.report import format_lipschitz, format_sanity, format_table, plot_sweep
from jaxrobust.evaluation import sanity
from jaxrobust.training import selection
from jaxrobust.models import precision as precision_lib
from jaxrobust.certification import smoothing
from jaxrobust.programs import eval_attacks, eval_checks, eval_torch
from jaxrobust.programs import eval_flags as opts

SWEEP_FACTORS = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0)

# Lines --help adds for the flags eval.py defines only once it knows the run.
FLAG_MODULES = (opts.__name__,)  # where eval.py's flags are defined (its --help lists them)
HELP_EXTRA = (
  (
    "--config.<key>=<value>",
    "Override a setting of the run's saved config (or of --data's, with --torch-checkpoint).",
  ),
)


def define_config_overrides(argv: Sequence[str]) -> None:
  """--config.<key>=<value> overrides of the run's saved config (of the data
  setting's config, with --torch-checkpoint)."""
  workdir = cli.flag_in(argv, "workdir")
  saved = checkpoints.load_config(workdir, required=False) if workdir else None
  converted = cli.flag_in(argv, "torch-checkpoint") or cli.flag_in(argv, "flax-checkpoint")
  if saved is None and converted and cli.flag_in(argv, "data"):
    saved = eval_torch.data_config(cli.flag_in(argv, "data")).to_dict()
  if saved is not None:
    try:  # ml_collections applies the overrides in argv here
      config_flags.DEFINE_config_dict("config", ml_collections.ConfigDict(saved))
    except (KeyError, AttributeError, ValueError, TypeError) as e:
      raise cli.config_error(e, argv) from None


def interrupted() -> str:
  """What eval.py says when Ctrl-C stops it."""
  if opts.STATE.value:
    return (
      f"interrupted; the evaluation's progress is saved in {opts.STATE.value!r}: "
      "rerun the same command to resume it"
    )
  return "interrupted; the evaluation did not finish (with --state FILE it can be resumed)"


def main(argv: Sequence[str]) -> None:
  """Evaluates as the flags say (`cli.run` calls it)."""
  define_config_overrides(argv)
  cli.parse_flags(argv)
  eval_checks.check_outputs()
  if opts.PRECISION.value is not None:
    precision_lib.check_precision(opts.PRECISION.value)
  if opts.EXPORT_FLAX.value and not opts.WORKDIR.value:
    return eval_torch.export_converted(
      opts.ZOO.value, opts.TORCH.value, opts.ARCH.value, opts.EXPORT_FLAX.value
    )
  if opts.ZOO.value or eval_torch.flax_zoo_entry(opts.FLAX.value):
    return evaluate_zoo()
  checks.require(
    opts.ATTACKS.value is None or any(n.strip() for n in opts.ATTACKS.value.split(",")),
    f"--attacks {opts.ATTACKS.value!r} names no attack; name the run's attacks "
    "(comma-separated) or 'all', or leave --attacks out for the config's eval.default",
  )
  if opts.TORCH.value or opts.FLAX.value:
    resolved, model, state, about = eval_torch.load_converted()
    if "config" in flags.FLAGS:
      resolved = {**flags.FLAGS.config.to_dict(), "model": resolved["model"]}
    model = in_precision(model)
    rep = attack(resolved, model, state)
    rep.update(**about, split=opts.SPLIT.value)
  else:
    checks.require(opts.WORKDIR.value, "--workdir (or --torch-checkpoint) is required")
    checks.require(
      opts.ARCH.value is None and opts.DATA.value is None,
      "--arch and --data go with --torch-checkpoint",
    )
    workdir = checkpoints.check_workdir(str(opts.WORKDIR.value))
    if opts.TRANSFER.value:
      eval_checks.check_transfer_source(opts.TRANSFER.value, workdir)
    which = selection.choose(workdir, opts.CHECKPOINT.value)
    resolved, model, state = experiment.restore(workdir, checkpoint=which)
    print(f"Checkpoint: {which} (step {int(state.step)})")
    if resolved.get("ema"):
      print(
        f"Model: the exponential moving average of the parameters (decay "
        f"{resolved['ema']:g}), step {int(state.step)}"
      )
    if opts.EXPORT.value:
      eval_torch.export_torch(precision_lib.float32_model(model), state, opts.EXPORT.value)
      return
    if opts.EXPORT_FLAX.value:
      eval_torch.export_flax(
        precision_lib.float32_model(model), state.variables, opts.EXPORT_FLAX.value, source=workdir
      )
      return
    if "config" in flags.FLAGS:
      resolved = flags.FLAGS.config.to_dict()
    model = in_precision(model)
    rep = certify(resolved, model, state) if opts.CERTIFY.value else attack(resolved, model, state)
    rep.update(
      workdir=opts.WORKDIR.value, step=int(state.step), split=opts.SPLIT.value, checkpoint=which
    )
  rep["precision"] = precision_lib.precision_of(model)
  if opts.OUT.value:
    checkpoints.write_atomic(Path(opts.OUT.value), json.dumps(rep, indent=2) + "\n")
    print(f"wrote {opts.OUT.value}")


def evaluate_zoo() -> None:
  """--zoo list: every RobustBench entry and whether it loads; --zoo ENTRY: the
  --torch-checkpoint's AutoAttack accuracy beside the leaderboard's (or the
  --flax-checkpoint's, whose entry it records)."""
  if opts.ZOO.value == "list":
    print(zoo.format_list())
    return
  checks.require(
    bool(opts.TORCH.value) != bool(opts.FLAX.value),
    "--zoo needs --torch-checkpoint (the entry's file) or --flax-checkpoint, one of them",
  )
  name = opts.ZOO.value or eval_torch.flax_zoo_entry(opts.FLAX.value)
  checks.require(
    opts.PRECISION.value is None, "--precision goes with --workdir or --torch-checkpoint, not --zoo"
  )
  n = opts.LIMIT.value or 1000
  x = y = None
  if opts.DATA.value:  # else the entry's data set from tensorflow-datasets
    test = config_lib.load_split(eval_torch.data_config(opts.DATA.value), opts.SPLIT.value)
    x, y = data.host_float(test.x[:n]), np.asarray(test.y[:n])
  result = zoo.evaluate_entry(
    str(name),
    opts.TORCH.value or opts.FLAX.value,
    x=x,
    y=y,
    n_examples=n,
    batch_size=opts.BATCH.value or 500,
    log=print,
  )
  print(result.format())
  if opts.OUT.value:
    checkpoints.write_atomic(Path(opts.OUT.value), json.dumps(result._asdict(), indent=2) + "\n")
    print(f"wrote {opts.OUT.value}")


def in_precision(model: nn.Module) -> nn.Module:
  """The model computing in --precision (without it, as restored: the run's precision)."""
  if opts.PRECISION.value is not None:
    model = precision_lib.with_precision(model, precision=opts.PRECISION.value)
  if (dtype := precision_lib.precision_of(model)) != precision_lib.DEFAULT:
    print(f"Precision: the model computes in {dtype}; attacks in float32")
  return model


def output_dir() -> Path:
  """Where plots go by default: the workdir, else the checkpoint's folder."""
  if opts.WORKDIR.value:
    return Path(opts.WORKDIR.value)
  return Path(str(opts.TORCH.value or opts.FLAX.value)).parent


def attack(resolved: dict[str, Any], model: nn.Module, state: Any) -> dict[str, Any]:
  """Runs the attacks of the flags on the model; prints and returns the report."""
  specs = eval_attacks.attack_specs(resolved, model)
  source = None
  if opts.TRANSFER.value:
    _, source_model, source_state = experiment.restore(opts.TRANSFER.value)
    source = (source_model, source_state)
    print(
      f"Transfer: examples crafted on {opts.TRANSFER.value}, classified by {opts.WORKDIR.value}"
    )
  evaluate = lambda **kw: experiment.evaluate(
    resolved,
    model,
    state,
    split=opts.SPLIT.value,
    limit=opts.LIMIT.value,
    batch_size=opts.BATCH.value or None,
    source=source,
    **kw,
  )
  if models.is_randomized(model):
    noise = resolved["model"]["noise"]
    print(
      f"Randomized model f~(x) = f(x + d), d ~ N(0, {noise['sigma']:g}^2 I): "
      f"classified by the mean softmax over {noise['samples']} fixed noise draws "
      f"and attacked through the same draws (expectation over transformation)"
    )
  rep = evaluate(
    specs=specs,
    sanity=opts.SANITY.value and source is None,
    lipschitz=source is None,
    individual=opts.INDIVIDUAL.value,
    state_path=opts.STATE.value,
    log=print,
    return_adversarial=opts.SAVE_ADVERSARIAL.value is not None,
  )
  if opts.SAVE_ADVERSARIAL.value is not None:
    rep, adversarial = rep
    save_adversarial(opts.SAVE_ADVERSARIAL.value, adversarial, resolved)
  print(format_table(rep))
  if "lipschitz" in rep:
    print(format_lipschitz(rep["lipschitz"], rep["lipschitz"]["of"]))
  if "sanity" in rep:
    print(format_sanity(rep["sanity"]))
  # RobustBench's record of every cascade (AutoAttack's versions, worst_case).
  rep["robustbench"] = [
    evaluation.robustbench_report(rep, row["attack"])
    for row in rep["results"]
    if len(row["stages"]) > 1
  ]
  if opts.SWEEP.value:
    rep["sweep"] = sweep(specs, evaluate)
  return rep


def save_adversarial(
  path: str, adversarial: Mapping[str, Any], resolved: Mapping[str, Any]
) -> None:
  """Writes `evaluation.evaluate`'s adversarial examples to the .npz `path`."""
  arrays: dict[str, Any] = {
    f"{label}/{field}": np.asarray(value)
    for label, found in adversarial.items()
    for field, value in found.items()
  }
  test_set = config_lib.load_split(resolved, opts.SPLIT.value)
  arrays["y"] = test_set.y[: opts.LIMIT.value or None]
  buffer = io.BytesIO()
  np.savez_compressed(buffer, **arrays)
  with cli.writing(path):
    checkpoints.write_atomic(Path(path), buffer.getvalue())
  print(f"wrote {path}: the adversarial examples of {', '.join(adversarial)}")


def sweep(specs: Mapping[str, Any], evaluate: Callable[..., Any]) -> dict[str, Any]:
  """Robust accuracy at multiples of each attack's eps, plotted to a PNG."""
  curves = {}
  for label, spec in specs.items():
    if spec.get("eps") is not None:
      eps_values = [spec["eps"] * f for f in SWEEP_FACTORS]
      curves[label] = sanity.eps_curve(lambda s, **kw: evaluate(specs=s, **kw), spec, eps_values)
  path = opts.PLOT.value or str(output_dir() / "sweep.png")
  with cli.writing(path):
    plot_sweep(curves, path)
  print(f"wrote {path}")
  return {label: [{"eps": e, "accuracy": a} for e, a in c] for label, c in curves.items()}


def certify(resolved: Mapping[str, Any], model: nn.Module, state: Any) -> dict[str, Any]:
  """Certified accuracy of the smoothed model at radii 0, 0.25, 0.5, ...."""
  test_set = config_lib.load_split(resolved, opts.SPLIT.value)
  x, y = test_set.x, test_set.y
  if opts.LIMIT.value:
    checks.integer_at_least("limit", opts.LIMIT.value, 1)
    x, y = x[: opts.LIMIT.value], y[: opts.LIMIT.value]
  x = data.host_float(x)
  # A noise-trained model is smoothed through its base classifier f: the
  # smoothing supplies the noise, by default at the sigma it was trained with.
  logits_fn = functools.partial(models.inference_fn(model, base=True), state.variables)
  sigma = opts.SIGMA.value
  if sigma is None:
    sigma = resolved["model"]["noise"]["sigma"] if models.is_randomized(model) else 0.25
  print(
    f"Smoothing with sigma {sigma:g} ("
    + (
      "--sigma"
      if opts.SIGMA.value is not None
      else "the model's noise.sigma"
      if models.is_randomized(model)
      else "the default"
    )
    + ")"
  )
  settings: dict[str, Any] = dict(
    sigma=sigma, n0=opts.N0.value, n=opts.N.value, alpha=opts.ALPHA.value
  )
  start = time.perf_counter()
  pred, radius = smoothing.certify(
    logits_fn, x, jax.random.key(resolved["seed"]), batch_size=opts.BATCH.value or 1000, **settings
  )
  rep = smoothing.certification_report(
    pred, radius, y, seconds=time.perf_counter() - start, **settings
  )
  print(smoothing.format_certification_table(rep))
  path = opts.PLOT.value or str(Path(str(opts.WORKDIR.value)) / f"certify_sigma{sigma:g}.png")
  with cli.writing(path):
    smoothing.plot_certified_accuracy(rep, path)
  print(f"wrote {path}")
  return rep


def run() -> None:
  """The `jaxrobust-eval` command."""
  parallel.use_host_devices()  # before JAX starts: one XLA:CPU device per core
  cli.run(main, sys.argv, interrupted=interrupted, help_extra=HELP_EXTRA)


if __name__ == "__main__":
  run()
