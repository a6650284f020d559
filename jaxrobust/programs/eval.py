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
PyTorch checkpoint that records its architecture.
"""

import collections
import contextlib
import functools
import io
import json
import sys
import time
import zipfile
from pathlib import Path

import jax
import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags

from jaxrobust import attacks as attacks_lib
from jaxrobust import checks, cli, evaluation, interop, models
from jaxrobust.training import checkpoints
from jaxrobust.training import loop as experiment
from jaxrobust.training import config as config_lib
from jaxrobust import parallel
from jaxrobust.evaluation import report
from jaxrobust.evaluation import sanity
from jaxrobust.training import selection
from jaxrobust.certification import smoothing
from jaxrobust.configs import common

SUITES = ("autoattack",)
SWEEP_FACTORS = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0)

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by train.py.")
_ATTACKS = flags.DEFINE_string(
  "attacks",
  None,
  "Comma-separated attack labels of the run's eval.attacks, or "
  "'all' (default: the config's eval.default).",
)
_SUITE = flags.DEFINE_string(
  "suite", None, "Evaluate with a whole suite instead of --attacks: 'autoattack'."
)
_NORM = flags.DEFINE_string(
  "norm", None, "The suite's threat model, linf or l2 (default: the run's training threat model)."
)
_EPS = flags.DEFINE_float(
  "eps", None, "The suite's eps (default: the run's setting's eps for that norm)."
)
_VERSION = flags.DEFINE_string(
  "version", "standard", "AutoAttack's version: standard, plus, or rand (randomized models)."
)
_INDIVIDUAL = flags.DEFINE_boolean(
  "individual", False, "Run every attack on every clean-correct example, not as a cascade."
)
_CHECKPOINT = flags.DEFINE_string(
  "checkpoint",
  None,
  "Which checkpoint to evaluate: 'best' (by validation robust "
  "accuracy, with eval.every_epochs) or 'latest' (default: best when it exists).",
)
_STATE = flags.DEFINE_string(
  "state",
  None,
  "Write the evaluation's progress to this file after every batch, and resume from it.",
)
_SPLIT = flags.DEFINE_enum("split", "test", ["train", "test"], "Data split to evaluate.")
_LIMIT = flags.DEFINE_integer("limit", 0, "Evaluate only the first N examples (0: all).")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Examples per batch (0: the config's).")
_OUT = flags.DEFINE_string("out", None, "Write the report as JSON to this file.")
_SAVE_ADVERSARIAL = flags.DEFINE_string(
  "save-adversarial",
  None,
  "Write the adversarial examples to this .npz file: per attack <label>/x_adv (x where it "
  "failed), <label>/fooled and <label>/stage (the stage that found each), and y.",
)
_PLOT = flags.DEFINE_string(
  "plot", None, "PNG path for --sweep or --certify (default: in the workdir)."
)
_SANITY = flags.DEFINE_boolean("sanity", True, "Run the sanity checks.")
_SWEEP = flags.DEFINE_boolean("sweep", False, "Plot accuracy against eps per attack.")
_TRANSFER = flags.DEFINE_string(
  "transfer-from", None, "Craft the examples on this run's model (black-box)."
)
_CERTIFY = flags.DEFINE_boolean(
  "certify", False, "Certify with randomized smoothing (Cohen et al. 2019)."
)
_SIGMA = flags.DEFINE_float(
  "sigma",
  None,
  "Smoothing noise level for --certify (default: the model's noise.sigma, else 0.25).",
)
_N = flags.DEFINE_integer("n", 100_000, "Noise draws to certify each example.")
_N0 = flags.DEFINE_integer("n0", 100, "Noise draws to guess each example's class.")
_ALPHA = flags.DEFINE_float("alpha", 0.001, "Failure probability of each certificate.")
_TORCH = flags.DEFINE_string(
  "torch-checkpoint",
  None,
  "Evaluate this PyTorch checkpoint (.pt, .pth or .safetensors) instead of a workdir's model.",
)
_ARCH = flags.DEFINE_string(
  "arch",
  None,
  "The --torch-checkpoint's architecture: wrn-28-10, "
  "wrn-34-10, wrn-34-20, wrn-70-16, dm-wrn-28-10, dm-wrn-70-16, "
  "resnet-18, preact-resnet-18, or a jaxrobust model name "
  "(default: the one the checkpoint records).",
)
_DATA = flags.DEFINE_string(
  "data",
  None,
  "The --torch-checkpoint's data set: "
  f"{', '.join(common.SETTINGS)} (jaxrobust/configs/common.py), or a "
  "jaxrobust data-set name (folder:..., npz:..., tfds:...).",
)
_EXPORT = flags.DEFINE_string(
  "export-torch",
  None,
  "Write the workdir's model as a PyTorch checkpoint (.pt, .pth or .safetensors) and exit.",
)

# Lines --help adds for the flags eval.py defines only once it knows the run.
HELP_EXTRA = (
  (
    "--config.<key>=<value>",
    "Override a setting of the run's saved config (or of --data's, with --torch-checkpoint).",
  ),
)

# A --torch-checkpoint's model state: its variables, never trained here.
Loaded = collections.namedtuple("Loaded", "variables step")


def data_config(name):
  """The config a --torch-checkpoint is evaluated with on data set `name`: its
  setting's (jaxrobust/configs/common.py), or CIFAR-10's with data `name`."""
  checks.require(
    name,
    f"--torch-checkpoint needs --data: {', '.join(common.SETTINGS)}, or a jaxrobust data-set name",
  )
  if name in common.SETTINGS:
    return common.setting(name)
  config = common.setting("cifar10")
  config.data = dict(name=name, data_dir="")
  return config


def define_config_overrides(argv):
  """--config.<key>=<value> overrides of the run's saved config (of the data
  setting's config, with --torch-checkpoint)."""
  workdir = cli.flag_in(argv, "workdir")
  saved = checkpoints.load_config(workdir, required=False) if workdir else None
  if saved is None and cli.flag_in(argv, "torch-checkpoint") and cli.flag_in(argv, "data"):
    saved = data_config(cli.flag_in(argv, "data")).to_dict()
  if saved is not None:
    try:  # ml_collections applies the overrides in argv here
      config_flags.DEFINE_config_dict("config", ml_collections.ConfigDict(saved))
    except (KeyError, AttributeError, ValueError, TypeError) as e:
      raise cli.config_error(e, argv) from None


def check_outputs():
  """Refuses output files that cannot be written, before any work starts:
  --out, --plot, --state (and a --state file that is not one), --export-torch."""
  for flag, holder in (
    ("--out", _OUT),
    ("--plot", _PLOT),
    ("--state", _STATE),
    ("--save-adversarial", _SAVE_ADVERSARIAL),
  ):
    if holder.value is not None:
      cli.check_output_file(flag, holder.value)
  if _STATE.value is not None:
    check_state_file(Path(_STATE.value))
  if _EXPORT.value is not None:
    cli.check_output_file("--export-torch", _EXPORT.value)
    interop.check_export_path(_EXPORT.value)


def check_state_file(path):
  """Refuses an existing --state file that is not an evaluation's state (an
  .npz archive that --state wrote), before it is read or overwritten."""
  if not path.exists():
    return
  try:
    with np.load(path, allow_pickle=False) as archive:
      valid = "__fingerprint__" in archive.files
  except (OSError, ValueError, EOFError, AttributeError, zipfile.BadZipFile):
    valid = False  # not an archive (AttributeError: a single .npy array)
  checks.require(
    valid,
    f"--state {str(path)!r} is not a valid evaluation state file (one that --state "
    "wrote); give a new path, or delete it",
  )


def check_transfer_source(source, target):
  """Refuses a --transfer-from run whose model takes other images (shape,
  channels) or classes than the model of --workdir: its adversarial examples
  would not fit the model evaluated."""
  theirs = checkpoints.load_config(source)["dataset"]
  ours = checkpoints.load_config(target)["dataset"]
  described = lambda d: (
    f"{'x'.join(map(str, d['input_shape']))} images and {d['num_classes']} classes"
  )
  checks.require(
    list(theirs["input_shape"]) == list(ours["input_shape"])
    and theirs["num_classes"] == ours["num_classes"],
    f"--transfer-from {str(source)!r} has a model of {described(theirs)}; --workdir "
    f"{str(target)!r} has one of {described(ours)}: transfer needs the same images and classes",
  )


@contextlib.contextmanager
def writing(path):
  """Turns a failure to write output file `path` into an InputError naming it."""
  try:
    yield
  except OSError as e:
    raise checks.InputError(f"cannot write {str(path)!r}: {e.strerror or e}") from None


def interrupted():
  """What eval.py says when Ctrl-C stops it."""
  if _STATE.value:
    return (
      f"interrupted; the evaluation's progress is saved in {_STATE.value!r}: "
      "rerun the same command to resume it"
    )
  return "interrupted; the evaluation did not finish (with --state FILE it can be resumed)"


def main(argv):
  define_config_overrides(argv)
  cli.parse_flags(argv)
  check_outputs()
  checks.require(
    _ATTACKS.value is None or any(n.strip() for n in _ATTACKS.value.split(",")),
    f"--attacks {_ATTACKS.value!r} names no attack; name the run's attacks "
    "(comma-separated) or 'all', or leave --attacks out for the config's eval.default",
  )
  if _TORCH.value:
    checks.require(not _WORKDIR.value, "give either --workdir or --torch-checkpoint, not both")
    for flag, value in (
      ("--export-torch", _EXPORT),
      ("--transfer-from", _TRANSFER),
      ("--certify", _CERTIFY),
    ):
      checks.require(not value.value, f"{flag} needs a --workdir, not a --torch-checkpoint")
    resolved, model, state, about = load_torch_checkpoint(_TORCH.value, _ARCH.value, _DATA.value)
    if "config" in flags.FLAGS:
      resolved = {**flags.FLAGS.config.to_dict(), "model": resolved["model"]}
    rep = attack(resolved, model, state)
    rep.update(**about, split=_SPLIT.value)
  else:
    checks.require(_WORKDIR.value, "--workdir (or --torch-checkpoint) is required")
    checks.require(
      _ARCH.value is None and _DATA.value is None, "--arch and --data go with --torch-checkpoint"
    )
    workdir = checkpoints.check_workdir(_WORKDIR.value)
    if _TRANSFER.value:
      check_transfer_source(_TRANSFER.value, workdir)
    which = selection.choose(workdir, _CHECKPOINT.value)
    resolved, model, state = experiment.restore(_WORKDIR.value, checkpoint=which)
    print(f"Checkpoint: {which} (step {int(state.step)})")
    if resolved.get("ema"):
      print(
        f"Model: the exponential moving average of the parameters (decay "
        f"{resolved['ema']:g}), step {int(state.step)}"
      )
    if _EXPORT.value:
      export_torch(model, state, _EXPORT.value)
      return
    if "config" in flags.FLAGS:
      resolved = flags.FLAGS.config.to_dict()
    rep = certify(resolved, model, state) if _CERTIFY.value else attack(resolved, model, state)
    rep.update(workdir=_WORKDIR.value, step=int(state.step), split=_SPLIT.value, checkpoint=which)
  if _OUT.value:
    checkpoints.write_atomic(Path(_OUT.value), json.dumps(rep, indent=2) + "\n")
    print(f"wrote {_OUT.value}")


def load_torch_checkpoint(path, arch, data_name):
  """(resolved config, model, state, what the report says of them) of the
  PyTorch checkpoint `path` of architecture `arch` (default: the one it
  records), evaluated on `data_name`."""
  config = data_config(data_name)
  if arch:
    interop.architecture(arch)  # an unknown name is refused before the file is read
  checkpoint = interop.load_checkpoint(path)
  recorded = interop.checkpoint_architecture(checkpoint)
  checks.require(
    arch or recorded,
    f"{path!r} records no architecture; pass --arch (e.g. wrn-28-10, dm-wrn-70-16)",
  )
  settings = recorded[1] if recorded and recorded[0] == (arch or recorded[0]) else {}
  arch = arch or recorded[0]
  model, variables = interop.from_torch(checkpoint, arch, **settings)
  test_set = config_lib.load_split(config, _SPLIT.value)
  channels = test_set.x.shape[-1]
  checks.require(
    len(model.mean) == channels,
    f"arch {arch!r} from {path!r} takes {len(model.mean)}-channel images; data "
    f"set {data_name!r} has {channels} channels",
  )
  checks.require(
    model.num_classes == test_set.num_classes,
    f"{path!r} has {model.num_classes} classes; data set {data_name!r} has {test_set.num_classes}",
  )
  resolved = config.to_dict()
  resolved["model"] = {"name": interop.model_name(model), **interop.model_settings(model)}
  n_params = sum(a.size for a in jax.tree.leaves(variables["params"]))
  print(
    f"PyTorch checkpoint {path}: arch {arch} (jaxrobust {resolved['model']['name']}, "
    f"{n_params:,} parameters), data {data_name} ({_SPLIT.value} split, "
    f"{config.data['name']})"
  )
  about = dict(torch_checkpoint=str(path), arch=arch, data=data_name)
  return resolved, model, Loaded(variables, 0), about


def export_torch(model, state, path):
  """Writes the workdir's model as a PyTorch checkpoint recording its architecture."""
  with writing(path):
    interop.save_checkpoint(path, model, jax.device_get(state.variables))
  print(
    f"wrote {path}: {interop.model_name(model)} {interop.model_settings(model)}, "
    f"a PyTorch state_dict (jaxrobust.interop.from_torch or eval.py "
    f"--torch-checkpoint read it back)"
  )


def output_dir():
  """Where plots go by default: the workdir, else the checkpoint's folder."""
  return Path(_WORKDIR.value) if _WORKDIR.value else Path(_TORCH.value).parent


def attack(resolved, model, state):
  specs = attack_specs(resolved, model)
  source = None
  if _TRANSFER.value:
    _, source_model, source_state = experiment.restore(_TRANSFER.value)
    source = (source_model, source_state)
    print(f"Transfer: examples crafted on {_TRANSFER.value}, classified by {_WORKDIR.value}")
  evaluate = lambda **kw: experiment.evaluate(
    resolved,
    model,
    state,
    split=_SPLIT.value,
    limit=_LIMIT.value,
    batch_size=_BATCH.value or None,
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
    sanity=_SANITY.value and source is None,
    lipschitz=source is None,
    individual=_INDIVIDUAL.value,
    state_path=_STATE.value,
    log=print,
    return_adversarial=_SAVE_ADVERSARIAL.value is not None,
  )
  if _SAVE_ADVERSARIAL.value is not None:
    rep, adversarial = rep
    save_adversarial(_SAVE_ADVERSARIAL.value, adversarial, resolved)
  print(report.format_table(rep))
  if "lipschitz" in rep:
    print(report.format_lipschitz(rep["lipschitz"], rep["lipschitz"]["of"]))
  if "sanity" in rep:
    print(report.format_sanity(rep["sanity"]))
  rep["robustbench"] = [
    evaluation.robustbench_report(rep, label)
    for label, spec in specs.items()
    if spec["name"] == "autoattack"
  ]
  if _SWEEP.value:
    rep["sweep"] = sweep(specs, evaluate)
  return rep


def save_adversarial(path, adversarial, resolved):
  """Writes `evaluation.evaluate`'s adversarial examples to the .npz `path`."""
  arrays = {
    f"{label}/{field}": np.asarray(value)
    for label, found in adversarial.items()
    for field, value in found.items()
  }
  test_set = config_lib.load_split(resolved, _SPLIT.value)
  arrays["y"] = test_set.y[: _LIMIT.value or None]
  buffer = io.BytesIO()
  np.savez_compressed(buffer, **arrays)
  with writing(path):
    checkpoints.write_atomic(Path(path), buffer.getvalue())
  print(f"wrote {path}: the adversarial examples of {', '.join(adversarial)}")


def attack_specs(resolved, model):
  """The attacks to run: --suite, else --attacks (or the config's eval.default)."""
  if _SUITE.value is None:
    checks.require(
      _NORM.value is None and _EPS.value is None,
      "--norm and --eps set a --suite's threat model; use "
      "--config.eval.attacks.<label>.eps=... to change an attack's",
    )
    return evaluation.select(
      resolved["eval"]["attacks"], _ATTACKS.value or resolved["eval"].get("default")
    )
  checks.require(_ATTACKS.value is None, "give either --suite or --attacks, not both")
  checks.one_of("--suite", _SUITE.value, SUITES)
  checks.one_of("--version", _VERSION.value, attacks_lib.AUTOATTACK_VERSIONS)
  norm = _NORM.value or training_norm(resolved)
  checks.one_of("--norm", norm, ("linf", "l2", "l1"))
  eps = _EPS.value if _EPS.value is not None else setting_eps(resolved, norm)
  if _VERSION.value == "rand" and not models.is_randomized(model):
    print(
      "warning: --version rand is for randomized models; this model is "
      "deterministic, so its 20 draws per gradient are all the same"
    )
  spec = dict(name="autoattack", norm=norm, eps=eps, version=_VERSION.value)
  attacks_lib.create(spec)  # refuses a bad eps now
  return {f"autoattack_{norm}": spec}


def training_attack(resolved):
  """The run's training attack (None for clean training)."""
  spec = resolved.get("train_attack")
  if not spec:
    return None
  return attacks_lib.create({k: v for k, v in dict(spec).items() if k != "eot_samples"})


def training_norm(resolved):
  """The norm of the run's training attack (L-infinity for clean training,
  and when its parts have several)."""
  train = training_attack(resolved)
  return (train and train.norm) or "linf"


def setting_eps(resolved, norm):
  """The eps of the run's setting for `norm`: that of its training attack in
  this norm, else of its PGD evaluation attack in this norm."""
  train = training_attack(resolved)
  if train and train.norm == norm and train.eps is not None:
    return train.eps
  for spec in resolved["eval"]["attacks"].values():
    if spec.get("name") == "pgd" and spec.get("norm", "linf") == norm:
      return spec["eps"]
  raise checks.InputError(f"the run has no default eps for norm {norm!r}; pass --eps")


def sweep(specs, evaluate):
  """Robust accuracy at multiples of each attack's eps, plotted to a PNG."""
  curves = {}
  for label, spec in specs.items():
    if spec.get("eps") is not None:
      eps_values = [spec["eps"] * f for f in SWEEP_FACTORS]
      curves[label] = sanity.eps_curve(lambda s, **kw: evaluate(specs=s, **kw), spec, eps_values)
  path = _PLOT.value or str(output_dir() / "sweep.png")
  with writing(path):
    report.plot_sweep(curves, path)
  print(f"wrote {path}")
  return {label: [{"eps": e, "accuracy": a} for e, a in c] for label, c in curves.items()}


def certify(resolved, model, state):
  """Certified accuracy of the smoothed model at radii 0, 0.25, 0.5, ...."""
  test_set = config_lib.load_split(resolved, _SPLIT.value)
  x, y = test_set.x, test_set.y
  if _LIMIT.value:
    checks.integer_at_least("limit", _LIMIT.value, 1)
    x, y = x[: _LIMIT.value], y[: _LIMIT.value]
  # A noise-trained model is smoothed through its base classifier f: the
  # smoothing supplies the noise, by default at the sigma it was trained with.
  logits_fn = functools.partial(models.inference_fn(model, base=True), state.variables)
  sigma = _SIGMA.value
  if sigma is None:
    sigma = resolved["model"]["noise"]["sigma"] if models.is_randomized(model) else 0.25
  print(
    f"Smoothing with sigma {sigma:g} ("
    + (
      "--sigma"
      if _SIGMA.value is not None
      else "the model's noise.sigma"
      if models.is_randomized(model)
      else "the default"
    )
    + ")"
  )
  settings = dict(sigma=sigma, n0=_N0.value, n=_N.value, alpha=_ALPHA.value)
  start = time.perf_counter()
  pred, radius = smoothing.certify(
    logits_fn, x, jax.random.key(resolved["seed"]), batch_size=_BATCH.value or 1000, **settings
  )
  rep = smoothing.certification_report(
    pred, radius, y, seconds=time.perf_counter() - start, **settings
  )
  print(smoothing.format_certification_table(rep))
  path = _PLOT.value or str(Path(_WORKDIR.value) / f"certify_sigma{sigma:g}.png")
  with writing(path):
    smoothing.plot_certified_accuracy(rep, path)
  print(f"wrote {path}")
  return rep


def run():
  """The `jaxrobust-eval` command."""
  parallel.use_host_devices()  # before JAX starts: one XLA:CPU device per core
  cli.run(main, sys.argv, interrupted=interrupted, help_extra=HELP_EXTRA)


if __name__ == "__main__":
  run()
