"""The bad-input catalogue: one test per bad input, across the library API and
both command lines.

Each case asserts that the message names the bad value; command-line cases
also that the tool exits with code 2 and prints no traceback, and that nothing
on disk changed (a new workdir is not created; an existing one is unchanged,
byte for byte and directory for directory).

Where a bad input is already tested at the library level, the test is not
repeated here; this index says where each bad input named in issues 2-5 and 7
is tested ("here" means this module):

| bad input | where |
| --- | --- |
| eps negative or NaN, steps < 1, step_size <= 0, unknown norm | here (train.py); test_attacks.py::test_bad_settings |
| unknown loss | test_attacks.py::test_bad_settings (the configs set no loss, and overrides cannot add keys) |
| images outside [0, 1] or NaN, labels outside [0, classes), wrong rank | test_attacks.py::test_bad_inputs, test_smoothing.py::test_bad_images_raise; in data files: here |
| batch size not divisible by the device count | here (train.py refuses); evaluation pads (data.eval_batches) |
| unknown data set, missing data file, tfds data set not prepared | here (train.py); test_data.py::test_unknown_name_lists_the_sources, test_missing_path_is_named, test_tfds_not_prepared_says_how_to_prepare |
| workdir of a different config | here (train.py); test_training.py::test_workdir_of_another_config_is_refused_and_untouched |
| eval.py on a workdir without a checkpoint | here |
| unknown attack name in eval.py | here |
| C&W steps or search steps < 1, kappa < 0, DI prob outside [0, 1], resize_rate outside (0, 1], mixture weights not summing to 1, empty attack list | not yet written (jaxrobust.attacks has fgsm and pgd) |
| SpectralNorm target <= 0, n_steps < 1, a layer without a kernel | test_spectral.py::test_spectral_norm_rejects_bad_settings |
| noise sigma <= 0, eot_samples < 1 (gaussian and rat objectives) | not yet written |
| smoothing sigma <= 0, n0 or n < 1, alpha outside (0, 1), batch_size < 1 | test_smoothing.py::test_bad_settings_raise (eval.py --certify not yet written) |
| config keys that do not exist, malformed overrides | here |
| unreadable or non-image files in folder: data | here; test_data.py::test_folder_errors_name_the_file |
| a workdir that is a file, no write permission, an incompatible checkpoint | here |
| eval.py --torch-checkpoint: not a checkpoint, truncated (.pt, .safetensors), another architecture, missing keys, wrong shapes, no --arch or --data, images or classes of the data that do not fit | here; in the library: test_interop.py |
| eval.py --export-flax and --flax-checkpoint: an existing output, a directory without metadata, corrupt metadata or variables, variables of another architecture, another zoo entry | here; in the library: test_flax_export.py |

docs/bad_input.md lists every case of this catalogue with its message (a
test checks that it names each one).

No write permission: tests run as root, for whom permission bits do not
apply, so the case tested is a workdir below a regular file, which no user
can create; train.py refuses both with "cannot write to workdir" before
touching anything (it checks the nearest existing ancestor with os.access).
"""

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import program_env

from jaxrobust import checks, interop
from jaxrobust.training import checkpoints
from jaxrobust.evaluation import sanity
from jaxrobust.configs import common

ROOT = Path(__file__).resolve().parents[1]
# The settings of the `trained` workdir (conftest.BAD_INPUT_SETTINGS).
SETTINGS = {"model.width": 4, "batch_size": 32, "epochs": 1, "eval.limit": 8}
NATURAL = ["--config", "natural", *[f"--config.{k}={v}" for k, v in SETTINGS.items()]]


def assert_user_error(result, *fragments):
  """Exit code 2, no traceback, and one `error: ...` line holding every fragment."""
  assert result.returncode == 2, (result.stdout, result.stderr)
  assert "Traceback" not in result.stdout + result.stderr, result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, result.stderr
  for fragment in fragments:
    assert fragment in errors[0], result.stderr


@pytest.fixture
def untouched(snapshot, trained):
  """The trained workdir, checked to be unchanged after the test."""
  before = snapshot(trained)
  yield trained
  assert snapshot(trained) == before


# train.py: bad settings, refused before anything is read or written.

TRAIN_SETTINGS = {
  "eps negative": (["--config.train_attack.eps=-0.1"], ["eps", "-0.1"]),
  "eps NaN": (["--config.train_attack.eps=nan"], ["eps", "nan"]),
  "steps < 1": (["--config.train_attack.steps=0"], ["steps", "got 0"]),
  "step_size <= 0": (["--config.train_attack.step_size=0.0"], ["step_size", "0.0"]),
  "unknown norm": (["--config.train_attack.norm=l3"], ["'l3'"]),
  "unknown attack": (["--config.train_attack.name=deepfool"], ["'deepfool'"]),
  "unknown objective": (["--config.objective=free_at"], ["unknown objective 'free_at'"]),
  "unknown augmentation": (["--config.data.augment=cutout"], ["unknown data.augment 'cutout'"]),
  "unknown padding mode": (
    ["--config.data.augment=crop", "--config.data.padding_mode=edge"],
    ["unknown data.padding_mode 'edge'"],
  ),
  "ema decay 1": (["--config.ema=1.0"], ["ema must lie in [0.0, 1.0), got 1.0"]),
  "ema decay negative": (["--config.ema=-0.5"], ["ema must lie in", "-0.5"]),
  "validation slice zero": (
    ["--config.eval.every_epochs=1"],
    ["eval.validation_examples must be >= 1", "got 0"],
  ),
  "validation slice too large": (
    ["--config.eval.every_epochs=1", "--config.eval.validation_examples=5000"],
    ["eval.validation_examples 5000 must be smaller"],
  ),
  "learning rate <= 0": (["--config.optimizer.learning_rate=-1.0"], ["learning_rate", "-1.0"]),
  "unknown optimizer": (["--config.optimizer.name=rmsprop"], ["'rmsprop'"]),
  "bad evaluation attack": (["--config.eval.attacks.pgd_l2.eps=-1.0"], ["eps", "-1.0"]),
  "epochs < 1": (["--config.epochs=0"], ["epochs", "got 0"]),
  "log interval < 1": (["--config.log_every_steps=0"], ["log_every_steps", "got 0"]),
  "batch not divisible by the devices": (
    ["--config.batch_size=33"],
    ["batch_size 33", "divisible by the 2 devices"],
  ),
  "config key that does not exist": (["--config.no_such_key=1"], ["no_such_key"]),
  "nested key that does not exist": (["--config.optimizer.momentun=0.5"], ["momentun"]),
  "override value of the wrong type": (["--config.epochs=two"], ["two"]),
  "override of a section by a value": (["--config.model=4"], ["--config.model=4"]),
  "unknown packaged config": (["--config", "pgd_att"], ["'pgd_att'", "pgd_at, pgd_at_sn_noise"]),
  "missing config file": (["--config", "configs/missing.py"], ["configs/missing.py", "not found"]),
  "unknown model": (["--config.model.name=resnet9000"], ["'resnet9000'"]),
  "unknown data set": (["--config.data.name=cifar11"], ["'cifar11'"]),
  "missing data file": (["--config.data.name=npz:/nonexistent/d.npz"], ["/nonexistent/d.npz"]),
  "tfds data set not prepared, offline": (
    ["--config.data.name=tfds:mnist", "--config.data.data_dir=/nonexistent/tfds"],
    ["tfds:mnist", "not prepared", "/nonexistent/tfds"],
  ),
  "num_processes < 1": (["--num_processes=0"], ["--num_processes", "got 0"]),
  "process_id out of range": (["--num_processes=2", "--process_id=2"], ["--process_id", "got 2"]),
  "config key that does not exist, near a real one": (
    ["--config.epoch=1"],
    ["the config has no setting 'epoch'; did you mean 'epochs'?"],
  ),
  "stray argument": (["extra_arg"], ["unexpected argument 'extra_arg'"]),
  "ImageNet directory missing": (
    ["--config", "pgd_at:imagenet", "--config.data.name=imagenet:/nonexistent/imagenet"],
    ["ImageNet directory /nonexistent/imagenet does not exist", "train/<wnid>/*.JPEG"],
  ),
  "ImageNet folder without train/": (
    ["--config", "pgd_at:imagenet", f"--config.data.name=imagenet:{ROOT / 'docs'}"],
    [f"ImageNet directory {ROOT / 'docs'} has no train/ folder"],
  ),
  "ImageNet crop size < 1": (
    ["--config", "pgd_at:imagenet", "--config.data.image_size=0"],
    ["data.image_size must be an integer >= 1, got 0"],
  ),
  "unknown precision": (
    ["--config.precision=float16"],
    ["unknown precision 'float16'; choose one of 'float32', 'bfloat16'"],
  ),
}


@pytest.mark.parametrize("args, fragments", TRAIN_SETTINGS.values(), ids=TRAIN_SETTINGS)
def test_train_refuses_a_bad_setting(args, fragments, cli, tmp_path):
  workdir = tmp_path / "run"
  assert_user_error(cli("train.py", "--workdir", workdir, *args), *fragments)
  assert not workdir.exists()


# train.py: config files of the user's that do not load. Each message names the file.

CONFIG_FILES = {
  "get_config raises": (
    "def get_config():\n  raise RuntimeError('boom')\n",
    ["raised RuntimeError at line 2: boom"],
  ),
  "get_config returns 42": (
    "def get_config():\n  return 42\n",
    ["get_config() returned int 42, not an ml_collections.ConfigDict"],
  ),
  "no get_config": ("settings = 1\n", ["defines no get_config()"]),
  "syntax error": ("def get_config(:\n", ["SyntaxError", "line 1"]),
  "import of a missing module": (
    "import no_such_module\n",
    ["raised ModuleNotFoundError at line 1", "no_such_module"],
  ),
}


@pytest.mark.parametrize("text, fragments", CONFIG_FILES.values(), ids=CONFIG_FILES)
def test_train_refuses_a_config_file_that_does_not_load(snapshot, text, fragments, cli, tmp_path):
  config = tmp_path / "my_config.py"
  config.write_text(text)
  before = snapshot(tmp_path)
  result = cli("train.py", "--workdir", tmp_path / "run", "--config", config)
  assert_user_error(result, f"config file {str(config)!r}", *fragments)
  assert snapshot(tmp_path) == before


# train.py: bad data files.


def png(path, pixels):
  from PIL import Image  # pylint: disable=g-import-not-at-top

  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(pixels).save(path)
  return path


def folder_with(tmp_path, name, content):
  """A folder: data set of two classes of 8x8 grey images, plus file `name`."""
  for label in ("a", "b"):
    for i in range(4):
      png(tmp_path / "data" / label / f"{i}.png", np.full((8, 8), 60 * i, np.uint8))
  (tmp_path / "data/b" / name).write_bytes(content)
  return f"folder:{tmp_path}/data"


def npz_with(tmp_path, **arrays):
  np.savez(tmp_path / "d.npz", **arrays)
  return f"npz:{tmp_path}/d.npz"


GREY = np.full((8, 8, 8), 0.5, np.float32)
LABELS = np.arange(8) % 2
BAD_DATA = {
  "non-image file in folder:": (
    lambda p: folder_with(p, "notes.txt", b"not an image"),
    ["data/b/notes.txt"],
  ),
  "unreadable (truncated) image in folder:": (
    lambda p: folder_with(p, "4.png", png(p / "x.png", GREY[0].astype(np.uint8)).read_bytes()[:40]),
    ["data/b/4.png"],
  ),
  "images outside [0, 1]": (lambda p: npz_with(p, x=GREY * 3, y=LABELS), ["[0, 1]", "1.5"]),
  "images with NaN": (
    lambda p: npz_with(p, x=np.where(LABELS[:, None, None], np.nan, GREY), y=LABELS),
    ["d.npz", "NaN"],
  ),
  "batch larger than the data set": (
    lambda p: npz_with(p, x=GREY, y=LABELS),
    ["batch_size 64", "8 training examples"],
  ),
  "labels outside [0, num_classes)": (
    lambda p: npz_with(p, x=GREY, y=LABELS * 7, class_names=np.array(["a", "b"])),
    ["[0, 2)", "[7]"],
  ),
  "npz: file of random bytes": (
    lambda p: file_with(p / "d.npz", np.random.default_rng(0).bytes(3000)),
    ["d.npz is not a valid .npz archive"],
  ),
  "npz: file of text": (
    lambda p: file_with(p / "d.npz", b"x,y\n0.5,1\n"),
    ["d.npz is not a valid .npz archive"],
  ),
}


def file_with(path, content):
  path.write_bytes(content)
  return f"npz:{path}"


@pytest.mark.parametrize("make, fragments", BAD_DATA.values(), ids=BAD_DATA)
def test_train_refuses_bad_data(snapshot, make, fragments, cli, tmp_path):
  name = make(tmp_path)
  before = snapshot(tmp_path)
  result = cli(
    "train.py",
    "--workdir",
    tmp_path / "run",
    f"--config.data.name={name}",
    env={"JAXROBUST_CACHE": str(tmp_path / "cache")},
  )
  assert_user_error(result, *fragments)
  assert snapshot(tmp_path) == before


# train.py: bad workdirs.


def test_train_refuses_a_workdir_that_is_a_file(snapshot, cli, tmp_path):
  path = tmp_path / "file"
  path.write_text("keep me")
  assert_user_error(cli("train.py", "--workdir", path), str(path), "not a directory")
  assert snapshot(tmp_path) == {Path("file"): b"keep me"}


def test_train_refuses_a_workdir_it_cannot_write(snapshot, cli, tmp_path):
  (tmp_path / "file").write_text("keep me")
  workdir = tmp_path / "file/run"
  assert_user_error(
    cli("train.py", "--workdir", workdir),
    f"cannot write to workdir {str(workdir)!r}",
    str(tmp_path / "file"),
  )
  assert snapshot(tmp_path) == {Path("file"): b"keep me"}


def test_train_refuses_a_workdir_of_another_config(cli, untouched):
  result = cli("train.py", "--workdir", untouched, *NATURAL, "--config.seed=7")
  assert_user_error(result, "different config", "seed = 0 there, 7 here")


def test_incompatible_checkpoint_is_refused_by_train_and_eval(snapshot, cli, trained, tmp_path):
  # The checkpoint holds a width-4 model; config.json is edited to width 8.
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  config = json.loads((workdir / "config.json").read_text())
  config["model"]["width"] = 8
  (workdir / "config.json").write_text(json.dumps(config))
  before = snapshot(workdir)
  message = [
    f"checkpoint {str(workdir.absolute() / 'checkpoints/2')!r} does not fit",
    "params['Conv_0']['bias'] (4,) float32 where the model has (8,) float32",
  ]
  assert_user_error(cli("eval.py", "--workdir", workdir), *message)
  assert_user_error(
    cli("train.py", "--workdir", workdir, *NATURAL, "--config.model.width=8"), *message
  )
  assert snapshot(workdir) == before  # in particular, not moved aside as corrupt


# eval.py

EVAL_FLAGS = {
  "unknown attack name": (["--attacks", "pgd_linf,fgsm_l7"], ["'fgsm_l7'"]),
  "limit < 1": (["--limit", "-3"], ["limit", "-3"]),
  "unknown split": (["--split", "validation"], ["validation"]),
  "batch size < 1": (["--batch_size", "-5"], ["batch_size", "-5"]),
  "unknown suite": (["--suite", "autoatack"], ["--suite", "'autoatack'"]),
  "unknown version": (["--suite", "autoattack", "--version", "strong"], ["'strong'"]),
  "unknown norm": (["--suite", "autoattack", "--norm", "l3"], ["--norm", "'l3'"]),
  "eps <= 0": (["--suite", "autoattack", "--eps", "-0.1"], ["eps", "-0.1"]),
  "eps NaN": (["--suite", "autoattack", "--eps", "nan"], ["eps", "nan"]),
  "suite and attacks": (
    ["--suite", "autoattack", "--attacks", "pgd_linf"],
    ["either --suite or --attacks"],
  ),
  "norm without a suite": (["--norm", "l2"], ["--norm and --eps set a --suite"]),
  # Output files are checked before any work: the folder exists and is
  # writable, the path is not a directory ({tmp}: the test's folder).
  "--certify --plot in a missing folder": (
    ["--certify", "--n", "100", "--limit", "20", "--plot", "{tmp}/missing/c.png"],
    ["cannot write --plot '{tmp}/missing/c.png': folder '{tmp}/missing' does not exist"],
  ),
  "--sweep --plot in a missing folder": (
    ["--sweep", "--attacks", "pgd_linf", "--plot", "/proc/nope/s.png"],
    ["cannot write --plot '/proc/nope/s.png': folder '/proc/nope' does not exist"],
  ),
  "--plot a directory": (["--sweep", "--plot", "{tmp}"], ["--plot '{tmp}' is a directory"]),
  "--out in a missing folder": (
    ["--out", "{tmp}/missing/r.json"],
    ["cannot write --out '{tmp}/missing/r.json'", "does not exist"],
  ),
  "--out a directory": (["--out", "{tmp}/dir.pt"], ["--out '{tmp}/dir.pt' is a directory"]),
  "--save-adversarial in a missing folder": (
    ["--attacks", "pgd_linf", "--save-adversarial", "{tmp}/missing/a.npz"],
    ["cannot write --save-adversarial '{tmp}/missing/a.npz'", "does not exist"],
  ),
  "--export-torch .pt in a missing folder": (
    ["--export-torch", "/proc/nope/m.pt"],
    ["cannot write --export-torch '/proc/nope/m.pt': folder '/proc/nope' does not exist"],
  ),
  "--export-torch .safetensors in a missing folder": (
    ["--export-torch", "{tmp}/missing/m.safetensors"],
    ["cannot write --export-torch '{tmp}/missing/m.safetensors'", "does not exist"],
  ),
  "--export-torch a directory": (
    ["--export-torch", "{tmp}/dir.pt"],
    ["--export-torch '{tmp}/dir.pt' is a directory"],
  ),
  "--state in a missing folder": (
    ["--attacks", "pgd_linf", "--state", "{tmp}/missing/s.state"],
    ["cannot write --state '{tmp}/missing/s.state'", "does not exist"],
  ),
  "--state file of random bytes": (
    ["--attacks", "pgd_linf", "--state", "{tmp}/random.bin"],
    ["--state '{tmp}/random.bin' is not a valid evaluation state file"],
  ),
  "--state file of text": (
    ["--attacks", "pgd_linf", "--state", "{tmp}/text.txt"],
    ["--state '{tmp}/text.txt' is not a valid evaluation state file"],
  ),
  "empty --attacks": (["--attacks="], ["--attacks '' names no attack"]),
  "stray argument": (["extra_arg"], ["unexpected argument 'extra_arg'"]),
  "config key that does not exist, near a real one": (
    ["--config.epoch=1"],
    ["the config has no setting 'epoch'; did you mean 'epochs'?"],
  ),
  "config key that does not exist": (["--config.bogus=1"], ["the config has no setting 'bogus'"]),
  "nested config key that does not exist": (
    ["--config.eval.attacks.pgd_linf.step=3"],
    ["no setting 'eval.attacks.pgd_linf.step'; did you mean 'eval.attacks.pgd_linf.steps'?"],
  ),
  "--export-flax an existing directory": (
    ["--export-flax", "{tmp}/dir.pt"],
    ["--export-flax '{tmp}/dir.pt' exists; give a new directory"],
  ),
  "--export-flax an existing file": (
    ["--export-flax", "{tmp}/text.txt"],
    ["--export-flax '{tmp}/text.txt' exists; give a new directory"],
  ),
  "--export-flax in a missing folder": (
    ["--export-flax", "{tmp}/missing/out"],
    ["cannot write --export-flax '{tmp}/missing/out': folder '{tmp}/missing' does not exist"],
  ),
  "--export-flax with --export-torch": (
    ["--export-flax", "{tmp}/new", "--export-torch", "{tmp}/m.pt"],
    ["give either --export-torch or --export-flax, not both"],
  ),
  "unknown --precision": (
    ["--precision", "float16"],
    ["unknown precision 'float16'; choose one of 'float32', 'bfloat16'"],
  ),
  "--precision with --zoo": (
    [
      "--zoo",
      "cifar10/Linf/Standard",
      "--torch-checkpoint",
      "{tmp}/random.bin",
      "--precision",
      "bfloat16",
    ],
    ["--precision goes with --workdir or --torch-checkpoint, not --zoo"],
  ),
}


@pytest.fixture
def outputs(snapshot, tmp_path):
  """A folder of files eval.py is pointed at, checked to be unchanged after
  the test: a directory `dir.pt`, and `random.bin` and `text.txt`, which are
  not evaluation states."""
  (tmp_path / "dir.pt").mkdir()
  (tmp_path / "random.bin").write_bytes(np.random.default_rng(0).bytes(3000))
  (tmp_path / "text.txt").write_text("not an evaluation state\n")
  before = snapshot(tmp_path)
  yield tmp_path
  assert snapshot(tmp_path) == before


@pytest.mark.parametrize("args, fragments", EVAL_FLAGS.values(), ids=EVAL_FLAGS)
def test_eval_refuses_a_bad_flag(args, fragments, cli, untouched, outputs):
  fill = lambda text: text.replace("{tmp}", str(outputs))
  result = cli("eval.py", "--workdir", untouched, *map(fill, args))
  assert_user_error(result, *map(fill, fragments))


def test_eval_refuses_a_transfer_source_of_other_images_or_classes(
  snapshot, cli, trained, tmp_path
):
  # A run of 3-channel images and 5 classes, as its config.json says: the
  # source is refused from config.json alone, before any model is restored.
  rgb = tmp_path / "rgb"
  shutil.copytree(trained, rgb)
  config = json.loads((rgb / "config.json").read_text())
  config["dataset"].update(input_shape=[8, 8, 3], num_classes=5)
  (rgb / "config.json").write_text(json.dumps(config))
  before = snapshot(tmp_path)
  assert_user_error(
    cli("eval.py", "--workdir", rgb, "--transfer-from", trained),
    f"--transfer-from {str(trained)!r} has a model of 8x8x1 images and 10 classes",
    f"--workdir {str(rgb)!r} has one of 8x8x3 images and 5 classes",
  )
  assert_user_error(
    cli("eval.py", "--workdir", trained, "--transfer-from", rgb),
    f"--transfer-from {str(rgb)!r} has a model of 8x8x3 images and 5 classes",
  )
  assert snapshot(tmp_path) == before


def test_eval_says_when_every_checkpoint_is_corrupt(snapshot, cli, trained, tmp_path):
  # Every data file of every checkpoint cut in half (the largest alone may
  # hold bytes no array needs): orbax's and TensorStore's complaints stay
  # out of the terminal.
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  for data in (workdir / "checkpoints").rglob("d/*"):
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
  before = snapshot(workdir)
  result = cli("eval.py", "--workdir", workdir)
  assert_user_error(
    result, f"no intact checkpoint in {str(workdir.absolute() / 'checkpoints')!r}", "is corrupt"
  )
  assert result.stderr.count("\n") == 1 and "train first" not in result.stderr
  assert snapshot(workdir) == before


def test_eval_refuses_a_state_file_that_is_not_one(cli, untouched):
  state = untouched / "config.json"
  assert_user_error(
    cli("eval.py", "--workdir", untouched, "--attacks", "pgd_linf", "--state", state),
    "evaluation state",
    str(state),
  )


def test_eval_needs_a_workdir(cli):
  assert_user_error(cli("eval.py"), "--workdir")


def test_eval_refuses_a_directory_without_a_run(snapshot, cli, tmp_path):
  assert_user_error(cli("eval.py", "--workdir", tmp_path), str(tmp_path), "config.json")
  assert snapshot(tmp_path) == {}


def test_eval_refuses_a_run_without_a_checkpoint(snapshot, cli, trained, tmp_path):
  shutil.copy(trained / "config.json", tmp_path / "config.json")
  before = snapshot(tmp_path)
  assert_user_error(cli("eval.py", "--workdir", tmp_path), "no intact checkpoint", str(tmp_path))
  assert snapshot(tmp_path) == before  # no checkpoints/ directory made


def test_eval_refuses_an_unreadable_config(snapshot, cli, tmp_path):
  (tmp_path / "config.json").write_text('{"model": ')
  assert_user_error(cli("eval.py", "--workdir", tmp_path), str(tmp_path / "config.json"))
  assert snapshot(tmp_path) == {Path("config.json"): b'{"model": '}


# eval.py --torch-checkpoint and --export-torch: bad files and flags, refused
# before anything is evaluated. The checkpoint: RobustBench's WideResNet-10-1
# on grey images, nested as RobustBench stores it.


@pytest.fixture(scope="module")
def wrn_state():
  pytest.importorskip("torch")
  net = interop.twin(
    "wide_resnet", num_classes=10, mean=(0.5,), std=(0.3,), depth=10, width=1, padding="torch"
  )
  return net.state_dict()


def save_pt(path, state):
  import torch  # pylint: disable=g-import-not-at-top

  torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
  return path


def save_safetensors(path, state):
  """As `save_pt`, as .safetensors: eval.py then runs without importing torch."""
  interop.write_safetensors(path, {f"module.{k}": v.numpy() for k, v in state.items()})
  return path


def torch_eval(cli, path, *args):
  return cli("eval.py", "--torch-checkpoint", path, "--data", "digits", *args)


def test_eval_refuses_a_file_that_is_not_a_checkpoint(snapshot, cli, tmp_path):
  for name in ("model.pt", "model.safetensors"):
    (tmp_path / name).write_text("not a checkpoint\n")
    assert_user_error(
      torch_eval(cli, tmp_path / name, "--arch", "wrn-10-1"), str(tmp_path / name), "cannot read"
    )
  assert_user_error(
    torch_eval(cli, tmp_path / "missing.pt", "--arch", "wrn-10-1"), "missing.pt", "not found"
  )


def test_eval_refuses_a_truncated_checkpoint(cli, wrn_state, tmp_path):
  path = save_pt(tmp_path / "model.pt", wrn_state)
  path.write_bytes(path.read_bytes()[:-100])
  assert_user_error(torch_eval(cli, path, "--arch", "wrn-10-1"), str(path), "not one, or truncated")
  path = tmp_path / "model.safetensors"
  interop.write_safetensors(path, {k: v.numpy() for k, v in wrn_state.items()})
  path.write_bytes(path.read_bytes()[:-100])
  assert_user_error(torch_eval(cli, path, "--arch", "wrn-10-1"), str(path), "truncated")


def test_eval_refuses_a_checkpoint_of_another_architecture(cli, wrn_state, tmp_path):
  path = save_safetensors(tmp_path / "model.safetensors", wrn_state)
  assert_user_error(
    torch_eval(cli, path, "--arch", "dm-wrn-10-1"),
    "does not fit arch 'dm-wrn-10-1'",
    "'init_conv.weight'",
  )
  assert_user_error(torch_eval(cli, path, "--arch", "wrn-28"), "unknown architecture 'wrn-28'")
  assert_user_error(torch_eval(cli, path), "records no architecture; pass --arch")


def test_eval_refuses_a_checkpoint_with_a_missing_key(cli, wrn_state, tmp_path):
  state = dict(wrn_state)
  del state["block3.layer.0.convShortcut.weight"]
  path = save_safetensors(tmp_path / "model.safetensors", state)
  assert_user_error(
    torch_eval(cli, path, "--arch", "wrn-10-1"), "lacks 'block3.layer.0.convShortcut.weight'"
  )


def test_eval_refuses_a_checkpoint_with_a_wrong_shape(cli, wrn_state, tmp_path):
  import torch  # pylint: disable=g-import-not-at-top

  path = save_safetensors(tmp_path / "model.safetensors", {**wrn_state, "fc.bias": torch.zeros(12)})
  assert_user_error(
    torch_eval(cli, path, "--arch", "wrn-10-1"),
    "'fc.bias' has shape (12,) in the checkpoint, the architecture needs (10,)",
  )
  assert_user_error(
    torch_eval(cli, path, "--arch", "wrn-10-2"),
    "'block1.layer.0.bn2.weight' has shape (16,) in the checkpoint, the architecture needs (32,)",
  )


def test_eval_refuses_a_checkpoint_that_does_not_fit_the_data(cli, tmp_path):
  pytest.importorskip("torch")
  rgb = interop.twin(
    "wide_resnet",
    num_classes=10,
    mean=(0.5,) * 3,
    std=(0.3,) * 3,
    depth=10,
    width=1,
    padding="torch",
  )
  path = save_safetensors(tmp_path / "rgb.safetensors", rgb.state_dict())
  assert_user_error(
    torch_eval(cli, path, "--arch", "wrn-10-1"),
    "takes 3-channel images; data set 'digits' has 1 channels",
  )
  five = interop.twin("wide_resnet", num_classes=5, mean=(0.5,), std=(0.3,), depth=10, width=1)
  path = save_safetensors(tmp_path / "five.safetensors", five.state_dict())
  assert_user_error(
    torch_eval(cli, path, "--arch", "wrn-10-1"), "has 5 classes; data set 'digits' has 10"
  )


def test_eval_refuses_bad_torch_checkpoint_flags(cli, wrn_state, trained, tmp_path):
  path = save_pt(tmp_path / "model.pt", wrn_state)
  assert_user_error(
    cli("eval.py", "--torch-checkpoint", path, "--arch", "wrn-10-1"),
    "--torch-checkpoint needs --data",
  )
  assert_user_error(
    torch_eval(cli, path, "--arch", "wrn-10-1", "--workdir", trained),
    "either --workdir or --torch-checkpoint",
  )
  assert_user_error(
    torch_eval(cli, path, "--arch", "wrn-10-1", "--certify"), "--certify needs a --workdir"
  )
  assert_user_error(
    cli("eval.py", "--workdir", trained, "--arch", "wrn-10-1"),
    "--arch and --data go with --torch-checkpoint",
  )


def test_export_refuses_a_bad_file_name(snapshot, cli, untouched, tmp_path):
  assert_user_error(
    cli("eval.py", "--workdir", untouched, "--export-torch", tmp_path / "model.onnx"),
    "'model.onnx'",
    ".safetensors",
  )
  assert snapshot(tmp_path) == {}


# eval.py --flax-checkpoint: a directory that is not one, or whose variables
# do not fit the architecture it names, refused in one line, untouched.


@pytest.fixture
def flax_checkpoint(wrn_state: dict[str, Any], tmp_path: Path) -> Path:
  """A flax checkpoint (`--export-flax`) of the grey WideResNet-10-1."""
  from jaxrobust.interop import flax_files  # pylint: disable=g-import-not-at-top

  model, variables = interop.from_torch(wrn_state, "wrn-10-1")
  return flax_files.save(tmp_path / "wrn", model, variables, arch="wrn-10-1")


def flax_eval(cli: Callable[..., Any], path: Path, *args: Any) -> Any:
  return cli("eval.py", "--flax-checkpoint", path, "--data", "digits", *args)


def test_eval_refuses_a_directory_that_is_not_a_flax_checkpoint(
  snapshot: Callable[[Path], Any], cli: Callable[..., Any], tmp_path: Path
) -> None:
  assert_user_error(
    flax_eval(cli, tmp_path / "missing"), f"{str(tmp_path / 'missing')!r} not found"
  )
  (tmp_path / "file").write_text("x")
  assert_user_error(flax_eval(cli, tmp_path / "file"), "is not a directory")
  (tmp_path / "empty").mkdir()
  assert_user_error(flax_eval(cli, tmp_path / "empty"), "is not a flax checkpoint: it has no")
  before = snapshot(tmp_path)
  assert_user_error(cli("eval.py", "--export-flax", tmp_path / "out"), "--export-flax needs")
  assert snapshot(tmp_path) == before


def test_eval_refuses_corrupt_flax_metadata(
  snapshot: Callable[[Path], Any], cli: Callable[..., Any], flax_checkpoint: Path
) -> None:
  meta = flax_checkpoint / "jaxrobust.json"
  text = meta.read_text()
  meta.write_text(text[: len(text) // 2])
  before = snapshot(flax_checkpoint)
  assert_user_error(flax_eval(cli, flax_checkpoint), f"cannot read {str(meta)!r}: not JSON")
  meta.write_text(json.dumps({**json.loads(text), "format": "other"}))
  assert_user_error(flax_eval(cli, flax_checkpoint), "does not describe a flax checkpoint")
  meta.write_text(json.dumps({k: v for k, v in json.loads(text).items() if k != "num_classes"}))
  assert_user_error(flax_eval(cli, flax_checkpoint), "lacks 'num_classes'")
  meta.write_text(text[: len(text) // 2])
  assert snapshot(flax_checkpoint) == before


def test_eval_refuses_flax_variables_of_another_architecture(
  snapshot: Callable[[Path], Any], cli: Callable[..., Any], flax_checkpoint: Path
) -> None:
  meta = flax_checkpoint / "jaxrobust.json"
  edited = json.loads(meta.read_text())
  edited.update(arch="wrn-10-2", settings={**edited["settings"], "width": 2})
  meta.write_text(json.dumps(edited))
  before = snapshot(flax_checkpoint)
  assert_user_error(
    flax_eval(cli, flax_checkpoint),
    "does not fit its architecture wrn-10-2: 'params/",
    "in the checkpoint, the architecture needs",
  )
  assert snapshot(flax_checkpoint) == before
  edited.update(model="vit")
  meta.write_text(json.dumps(edited))
  assert_user_error(flax_eval(cli, flax_checkpoint), "names model 'vit'; jaxrobust has")


def test_eval_refuses_corrupt_flax_variables(
  snapshot: Callable[[Path], Any], cli: Callable[..., Any], flax_checkpoint: Path
) -> None:
  for data in (flax_checkpoint / "variables").rglob("d/*"):
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
  before = snapshot(flax_checkpoint)
  assert_user_error(
    flax_eval(cli, flax_checkpoint),
    f"cannot read the variables of flax checkpoint {str(flax_checkpoint)!r}",
  )
  assert snapshot(flax_checkpoint) == before


def test_eval_refuses_bad_flax_checkpoint_flags(
  cli: Callable[..., Any], flax_checkpoint: Path, wrn_state: dict[str, Any], tmp_path: Path
) -> None:
  assert_user_error(
    cli("eval.py", "--flax-checkpoint", flax_checkpoint), "--flax-checkpoint needs --data"
  )
  assert_user_error(
    flax_eval(cli, flax_checkpoint, "--arch", "wrn-10-1"), "--arch goes with --torch-checkpoint"
  )
  path = save_pt(tmp_path / "model.pt", wrn_state)
  assert_user_error(
    flax_eval(cli, flax_checkpoint, "--torch-checkpoint", path), "either --torch-checkpoint or"
  )
  assert_user_error(
    flax_eval(cli, flax_checkpoint, "--certify"), "--certify needs a --workdir, not a --flax"
  )
  assert_user_error(
    cli("eval.py", "--zoo", "cifar10/Linf/Wong2020Fast", "--flax-checkpoint", flax_checkpoint),
    "holds architecture wrn-10-1; zoo entry cifar10/Linf/Wong2020Fast is preact-resnet-18-plain",
  )


# Inputs that crashed a command after its work: they now run.


def test_eval_sanity_checks_of_cw_l2(cli, untouched):
  # C&W-L2's spec has an eps but no norm: the checks read its Attack's norm.
  result = cli(
    "eval.py",
    "--workdir",
    untouched,
    "--attacks",
    "cw_l2",
    "--limit",
    "20",
    "--config.eval.attacks.cw_l2.steps=2",
    "--config.eval.attacks.cw_l2.binary_search_steps=1",
  )
  assert result.returncode == 0, result.stderr
  assert "cw_l2: accuracy near 0 at a large eps (eps 4:" in result.stdout


def test_sanity_checks_of_every_attack_of_a_config():
  # `--attacks all` without --nosanity: every attack the configs define.
  specs = common.eval_attacks(0.2, 1.0, 0.75)
  seen = []

  def evaluate_specs(check_specs, **kw):
    del kw
    seen.extend(check_specs)
    return {"results": [{"attack": label, "accuracy": 0.0} for label in check_specs]}

  rep = {"clean_accuracy": 0.5, "results": []}
  results = sanity.attack_checks(rep, evaluate_specs, specs, (8, 8, 1))
  assert {f"{label}@large" for label in specs} <= set(seen)
  assert "cw_l2: accuracy near 0 at a large eps" in [r["check"] for r in results]
  assert sanity.threat_norm(specs["cw_l2"]) == "l2"


# --help, and Ctrl-C.


@pytest.mark.parametrize(
  "script, flag, lines",
  [
    ("eval.py", "--help", ["  --workdir: Run directory written by train.py.", "  --[no]sanity: "]),
    ("eval.py", "-h", ["  --state: Write the evaluation's progress"]),
    ("train.py", "--help", ["  --workdir: Run directory", "  --config: Experiment config file"]),
    ("train.py", "--helpfull", ["  --[no]progress: Show a progress bar.", "absl.logging:"]),
  ],
)
def test_help_lists_the_flags(cli, script, flag, lines):
  result = cli(script, flag)
  assert result.returncode == 0 and not result.stderr, result.stderr
  for line in lines:
    assert line in result.stdout
  assert re.search(r"^  --\S+: \S", result.stdout, re.M)


def start(*args):
  env = {**program_env(), "PYTHONUNBUFFERED": "1"}
  return subprocess.Popen(
    [sys.executable, *map(str, args)],
    cwd=ROOT,
    env=env,
    text=True,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
  )


def test_ctrl_c_while_eval_starts(untouched):
  process = start("eval.py", "--workdir", untouched)
  time.sleep(0.5)  # importing JAX and the program
  process.send_signal(signal.SIGINT)
  out, err = process.communicate(timeout=120)
  assert process.returncode == 130, err
  assert "Traceback" not in out + err and "interrupted" in err


@pytest.mark.slow  # a minute's equivalence run: .ci/run runs it after the fast suite
def test_ctrl_c_during_an_evaluation(untouched, tmp_path):
  state = tmp_path / "s.state"
  process = start(
    "eval.py",
    "--workdir",
    untouched,
    "--attacks",
    "pgd_linf",
    "--nosanity",
    "--config.eval.attacks.pgd_linf.steps=20000",  # seconds a batch
    "--batch_size",
    "16",
    "--state",
    state,
  )
  deadline = time.monotonic() + 300
  while not state.exists():  # written once a batch is done, SAVE_SECONDS in
    assert process.poll() is None, process.communicate()
    assert time.monotonic() < deadline, "timed out"
    time.sleep(0.05)
  process.send_signal(signal.SIGINT)
  out, err = process.communicate(timeout=120)
  assert process.returncode == 130, err
  assert "Traceback" not in out + err
  assert err.strip().splitlines()[-1] == (
    f"interrupted; the evaluation's progress is saved in {str(state)!r}: "
    "rerun the same command to resume it"
  )


SWALLOWED = """
import gc, signal, time
from jaxrobust import cli

# Ctrl-C deliverable, as from a terminal, whatever the test runner's disposition.
signal.signal(signal.SIGINT, signal.default_int_handler)

def main(argv):
  def interrupt(phase, info):  # Ctrl-C inside a garbage collector callback
    gc.callbacks.remove(interrupt)
    raise KeyboardInterrupt
  gc.callbacks.append(interrupt)
  gc.collect()
  time.sleep(30)

cli.run(main, interrupted="interrupted; test")
"""


def test_ctrl_c_in_a_callback_is_not_swallowed(cli, tmp_path):
  (tmp_path / "swallowed.py").write_text(SWALLOWED)
  result = cli(tmp_path / "swallowed.py")
  assert result.returncode == 130 and result.stderr == "interrupted; test\n", result.stderr


def test_the_catalogue_is_listed_in_docs():
  listed = (ROOT / "docs/bad_input.md").read_text()
  for cases in (TRAIN_SETTINGS, CONFIG_FILES, BAD_DATA, EVAL_FLAGS):
    for name in cases:
      assert f"| {name} |" in listed, name


# Library API (what the command lines cannot reach)


def test_write_atomic_names_a_path_it_cannot_write(snapshot, tmp_path):
  with pytest.raises(checks.InputError, match="missing/report.json"):
    checkpoints.write_atomic(tmp_path / "missing/report.json", "{}")
  assert snapshot(tmp_path) == {}
