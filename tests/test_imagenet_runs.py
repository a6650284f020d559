"""ImageNet end to end, on generated data: convert -> train -> kill -9 -> resume ->
eval.py, and a PyTorch ResNet-50 evaluated on the setting (both slow)."""

import json
import signal
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image
from test_imagenet import load, make_imagenet, run
from test_reliability import KILL_DURING_SAVE  # train.py, SIGKILLed inside a checkpoint save

from jaxrobust import data
from jaxrobust.data import crops


# End to end: convert -> train -> kill -9 -> resume -> eval

# A config file: the imagenet setting (its data, crops, eps 4/255 PGD-3) with a
# small CNN on 32x32 crops, 2 epochs of 4 steps, a checkpoint every step.
TINY_CONFIG = """
from jaxrobust.configs import pgd_at

def get_config():
  c = pgd_at.get_config("imagenet")
  c.model = dict(name="small_cnn", width=4)
  c.data.image_size = 32
  c.data.workers = 0
  c.batch_size = 6
  c.epochs = 2
  c.checkpoint_every_steps = 1
  c.log_every_steps = 1
  c.eval.limit = 6
  c.eval.batch_size = 6
  return c
"""


@pytest.mark.slow  # three training runs and an evaluation: .ci/run runs it after the fast suite
def test_convert_train_kill_resume_eval_end_to_end(tmp_path: Path) -> None:
  from jaxrobust.training import loop as experiment

  imagenet_dir = make_imagenet(tmp_path / "folder" / "imagenet")
  data_dir = tmp_path / "data"
  out = run("-m", "jaxrobust.data", "convert", f"imagenet:{imagenet_dir}", data_dir / "imagenet")
  assert out.returncode == 0, out.stderr
  config_file = tmp_path / "tiny_imagenet.py"
  config_file.write_text(TINY_CONFIG)
  env = {"JAXROBUST_DATA": str(data_dir)}
  # The uninterrupted run, in this process, decoding in 2 grain workers.
  sys.path.insert(0, str(tmp_path))
  try:
    import tiny_imagenet  # noqa: PLC0415
  finally:
    sys.path.remove(str(tmp_path))
  config = tiny_imagenet.get_config()
  config.data.name = f"imagenet:{(data_dir / 'imagenet').resolve()}"
  config.data.workers = 2
  reference = experiment.train(config, tmp_path / "reference", progress=False)
  assert int(reference.step) == 8
  # kill -9 while saving step 5, then resume to the end (in this process: 0 workers).
  workdir = tmp_path / "run"
  train = ["train.py", "--config", config_file, "--workdir", workdir, "--progress=false"]
  killed = run("-c", KILL_DURING_SAVE, *train, env={**env, "KILL_AT_SAVE": "5"})
  assert killed.returncode == -signal.SIGKILL, killed.stderr
  assert "5" not in [p.name for p in (workdir / "checkpoints").iterdir()]
  resumed = run(*train, env=env)
  assert resumed.returncode == 0, resumed.stderr
  resolved, _, state = experiment.restore(workdir)
  assert resolved["data"]["name"] == config.data.name
  assert resolved["dataset"]["input_shape"] == [32, 32, 3]
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(reference), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # eval.py on the val/ split's 6 center crops.
  report = tmp_path / "report.json"
  evaluated = run(
    "eval.py", "--workdir", workdir, "--attacks", "pgd_linf", "--limit", "6", "--out", report
  )
  assert evaluated.returncode == 0, evaluated.stderr
  _, model, state = experiment.restore(workdir)
  test = load(config.data.name, "test")
  logits = model.apply(state.variables, data.as_float(test.x), train=False)
  clean = float(np.mean(np.argmax(np.asarray(logits), -1) == test.y))
  assert json.loads(report.read_text())["clean_accuracy"] == pytest.approx(clean)


@pytest.mark.slow  # a full-width ResNet-50 at 224 on the CPU: .ci/run runs it after the fast suite
def test_a_torch_resnet_50_evaluates_on_the_setting_with_sorted_wnid_labels(tmp_path: Path) -> None:
  """eval.py --torch-checkpoint --arch resnet-50 --data imagenet (RobustBench's
  ImageNet models' way in): 1,000 class folders, two validation images filed
  under the class the model predicts for the first and another for the second,
  so that clean accuracy is 1/2 exactly when label i is the i-th sorted wnid."""
  from jaxrobust import interop, models

  root, wnids = tmp_path / "imagenet", [f"n{k:08d}" for k in range(1000)]
  rng = np.random.default_rng(0)
  for wnid in wnids[::-1]:
    (root / "train" / wnid).mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), np.uint8)).save(
      root / "train" / wnid / "a.JPEG"
    )
  model = models.create(
    "resnet50", num_classes=1000, mean=crops.IMAGENET_MEAN, std=crops.IMAGENET_STD, stem="imagenet"
  )
  variables = model.init(jax.random.key(0), np.zeros((1, 224, 224, 3), np.float32))
  interop.save_checkpoint(tmp_path / "r50.pt", model, jax.device_get(variables))
  images = [Image.fromarray(rng.integers(0, 256, (300, 400, 3), np.uint8)) for _ in range(2)]
  x = np.stack([crops.eval_crop(image, 224) for image in images])
  predicted = np.argmax(np.asarray(model.apply(variables, data.as_float(x), train=False)), -1)
  for i, label in enumerate([predicted[0], (predicted[1] + 1) % 1000]):
    (root / "val" / wnids[label]).mkdir(parents=True, exist_ok=True)
    images[i].save(root / "val" / wnids[label] / f"v{i}.JPEG", quality=95)
  # The test JPEGs are decoded again: the crops eval.py sees are those of the saved files.
  saved = [Image.open(next((root / "val").rglob(f"v{i}.JPEG"))).convert("RGB") for i in range(2)]
  x = np.stack([crops.eval_crop(image, 224) for image in saved])
  predicted_saved = np.argmax(np.asarray(model.apply(variables, data.as_float(x), train=False)), -1)
  expected = np.mean(predicted_saved == [predicted[0], (predicted[1] + 1) % 1000])
  report = tmp_path / "report.json"
  result = run(
    "eval.py",
    "--torch-checkpoint",
    tmp_path / "r50.pt",
    "--arch",
    "resnet-50",
    "--data",
    "imagenet",
    "--attacks",
    "pgd_linf",
    "--config.eval.attacks.pgd_linf.steps=1",
    "--out",
    report,
    env={"JAXROBUST_DATA": str(tmp_path)},
  )
  assert result.returncode == 0, result.stderr
  assert json.loads(report.read_text())["clean_accuracy"] == expected == 0.5
