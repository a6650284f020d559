"""The flags of `jaxrobust-eval` (`programs/eval.py`), defined once at import."""

from absl import flags

from jaxrobust.configs import common

WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by train.py.")
ATTACKS = flags.DEFINE_string(
  "attacks",
  None,
  "Comma-separated attack labels of the run's eval.attacks, or "
  "'all' (default: the config's eval.default).",
)
SUITE = flags.DEFINE_string(
  "suite", None, "Evaluate with a whole suite instead of --attacks: 'autoattack'."
)
NORM = flags.DEFINE_string(
  "norm", None, "The suite's threat model, linf or l2 (default: the run's training threat model)."
)
EPS = flags.DEFINE_float(
  "eps", None, "The suite's eps (default: the run's setting's eps for that norm)."
)
VERSION = flags.DEFINE_string(
  "version", "standard", "AutoAttack's version: standard, plus, or rand (randomized models)."
)
INDIVIDUAL = flags.DEFINE_boolean(
  "individual", False, "Run every attack on every clean-correct example, not as a cascade."
)
CHECKPOINT = flags.DEFINE_string(
  "checkpoint",
  None,
  "Which checkpoint to evaluate: 'best' (by validation robust "
  "accuracy, with eval.every_epochs) or 'latest' (default: best when it exists).",
)
STATE = flags.DEFINE_string(
  "state",
  None,
  "Write the evaluation's progress to this file after every batch, and resume from it.",
)
SPLIT = flags.DEFINE_enum("split", "test", ["train", "test"], "Data split to evaluate.")
LIMIT = flags.DEFINE_integer("limit", 0, "Evaluate only the first N examples (0: all).")
BATCH = flags.DEFINE_integer("batch_size", 0, "Examples per batch (0: the config's).")
OUT = flags.DEFINE_string("out", None, "Write the report as JSON to this file.")
SAVE_ADVERSARIAL = flags.DEFINE_string(
  "save-adversarial",
  None,
  "Write the adversarial examples to this .npz file: per attack <label>/x_adv (x where it "
  "failed), <label>/fooled and <label>/stage (the stage that found each), and y.",
)
PLOT = flags.DEFINE_string(
  "plot", None, "PNG path for --sweep or --certify (default: in the workdir)."
)
SANITY = flags.DEFINE_boolean("sanity", True, "Run the sanity checks.")
SWEEP = flags.DEFINE_boolean("sweep", False, "Plot accuracy against eps per attack.")
TRANSFER = flags.DEFINE_string(
  "transfer-from", None, "Craft the examples on this run's model (black-box)."
)
CERTIFY = flags.DEFINE_boolean(
  "certify", False, "Certify with randomized smoothing (Cohen et al. 2019)."
)
SIGMA = flags.DEFINE_float(
  "sigma",
  None,
  "Smoothing noise level for --certify (default: the model's noise.sigma, else 0.25).",
)
N = flags.DEFINE_integer("n", 100_000, "Noise draws to certify each example.")
N0 = flags.DEFINE_integer("n0", 100, "Noise draws to guess each example's class.")
ALPHA = flags.DEFINE_float("alpha", 0.001, "Failure probability of each certificate.")
ZOO = flags.DEFINE_string(
  "zoo",
  None,
  "A RobustBench entry (e.g. cifar10/Linf/Carmon2019Unlabeled) to evaluate the "
  "--torch-checkpoint as: its architecture, normalisation, threat model and eps, AutoAttack, "
  "and the leaderboard's number beside ours; 'list' prints every entry and whether it loads.",
)
TORCH = flags.DEFINE_string(
  "torch-checkpoint",
  None,
  "Evaluate this PyTorch checkpoint (.pt, .pth or .safetensors) instead of a workdir's model.",
)
ARCH = flags.DEFINE_string(
  "arch",
  None,
  "The --torch-checkpoint's architecture: wrn-D-W (wrn-28-10, ...; -cosine, -per-image, "
  "-pssilu), dm-wrn-D-W (-meansparse), ra-wrn-70-16(-meansparse), wrn-a4, "
  "preact-resnet-18(-plain), dm-preact-resnet-18, resnet-18(-imagenet), resnet-50(-cifar), "
  "wide-resnet-50-2, preact-resnet-50-x3, robust-wrn-..., or a jaxrobust model name "
  "(docs/interop.md lists them; default: the one the checkpoint records).",
)
DATA = flags.DEFINE_string(
  "data",
  None,
  "The --torch-checkpoint's data set: "
  f"{', '.join(common.SETTINGS)} (jaxrobust/configs/common.py), or a "
  "jaxrobust data-set name (folder:..., npz:..., tfds:...).",
)
EXPORT = flags.DEFINE_string(
  "export-torch",
  None,
  "Write the workdir's model as a PyTorch checkpoint (.pt, .pth or .safetensors) and exit.",
)
FLAX = flags.DEFINE_string(
  "flax-checkpoint",
  None,
  "Evaluate this flax checkpoint (a directory --export-flax wrote; no PyTorch needed): "
  "a zoo model's entry comes from it, another model needs --data.",
)
EXPORT_FLAX = flags.DEFINE_string(
  "export-flax",
  None,
  "Write the model of --zoo with --torch-checkpoint, of --torch-checkpoint, or of --workdir "
  "as a flax checkpoint (a new directory: orbax variables and jaxrobust.json) and exit.",
)
PRECISION = flags.DEFINE_string(
  "precision",
  None,
  "The model's compute dtype, float32 or bfloat16 (default: the run's training precision); "
  "attacks keep their iterates in float32.",
)
