"""ImageNet: the ILSVRC layout, its crops, its records conversion, its configs
and its bad input, on a tiny generated folder of random JPEGs (3 classes,
64x64 mostly; not real data). The slow runs end to end: test_imagenet_runs.py."""

import io
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import program_env
from PIL import Image

from jaxrobust import data
from jaxrobust.checks import InputError
from jaxrobust.data import crops
from jaxrobust.data.cli import main as data_cli

ROOT = Path(__file__).resolve().parents[1]
WNIDS = ("n01440764", "n01443537", "n01484850")  # listed out of order below
SIZES = [(64, 64), (64, 80), (96, 64), (64, 64)]  # (height, width) by file


def make_imagenet(root: Path, train: int = 8, val: int = 2, seed: int = 0) -> Path:
  """An ILSVRC-layout folder of random JPEGs: train/<wnid>/*.JPEG, val/<wnid>/*.JPEG."""
  rng = np.random.default_rng(seed)
  for split, count in (("train", train), ("val", val)):
    for wnid in reversed(WNIDS):
      folder = root / split / wnid
      folder.mkdir(parents=True)
      for i in range(count):
        h, w = SIZES[i % len(SIZES)]
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        image = Image.fromarray(pixels[..., 0] if i == 1 else pixels)  # one grey file a class
        image.save(folder / f"{wnid}_{i}.JPEG", quality=90)
  (root / "train" / WNIDS[0] / ".DS_Store").write_bytes(b"not an image")
  return root


@pytest.fixture(scope="module")
def imagenet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
  return make_imagenet(tmp_path_factory.mktemp("data") / "imagenet")


@pytest.fixture(scope="module")
def converted(imagenet_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
  out = tmp_path_factory.mktemp("records") / "imagenet"
  assert data_cli(["convert", f"imagenet:{imagenet_dir}", str(out), "--shard-size", "5"]) == 0
  return out


def load(name: str, split: str) -> Any:
  """Split `split` of data set `name` with 32x32 crops."""
  return data.load(name, split, image_size=32)


def run(*args: Any, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
  return subprocess.run(
    [sys.executable, *map(str, args)],
    cwd=ROOT,
    env={**program_env(), **(env or {})},
    capture_output=True,
    text=True,
    timeout=900,
  )


# The crops


def test_crop_boxes_lie_in_the_image_and_in_the_scale_and_ratio_bounds() -> None:
  for height, width in [(64, 64), (64, 80), (375, 500), (500, 333)]:
    area, shares = height * width, []
    for k in range(300):
      top, left, h, w = crops.random_resized_crop_box(np.random.default_rng(k), height, width)
      assert top >= 0 and top + h <= height and left >= 0 and left + w <= width
      # w = round(sqrt(a r)), h = round(sqrt(a / r)): the area a and the ratio r
      # lie within half a pixel's rounding of the box.
      assert (w + 0.5) * (h + 0.5) >= 0.08 * area and (w - 0.5) * (h - 0.5) <= area
      assert (w + 0.5) / (h - 0.5) >= 3 / 4 and (w - 0.5) / (h + 0.5) <= 4 / 3
      shares.append(h * w / area)
    assert min(shares) < 0.15 and max(shares) > 0.85  # the whole range is drawn
  # No box of share >= 0.08 and ratio <= 4/3 fits 10x300: torchvision's
  # fallback, the central box of the whole height at ratio 4/3.
  assert crops.random_resized_crop_box(np.random.default_rng(0), 10, 300) == (0, 143, 10, 13)


def test_train_crop_is_the_box_resized_then_flipped_and_deterministic() -> None:
  image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (70, 90, 3), np.uint8))
  flips = set()
  for index in range(20):
    got = crops.train_crop(image, crops.example_rng(3, 1, 0, index), 32)
    again = crops.train_crop(image, crops.example_rng(3, 1, 0, index), 32)
    np.testing.assert_array_equal(got, again)
    rng = crops.example_rng(3, 1, 0, index)  # the same draws, replayed
    top, left, h, w = crops.random_resized_crop_box(rng, 70, 90)
    flip = rng.random() < 0.5
    # torchvision's resized_crop: crop (here by slicing the array), then resize.
    crop = Image.fromarray(np.asarray(image)[top : top + h, left : left + w])
    want = np.asarray(crop.resize((32, 32), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(got, want[:, ::-1] if flip else want)
    flips.add(flip)
  assert flips == {True, False}


def test_eval_crop_is_resize_256_center_crop_224() -> None:
  # torchvision's Resize(256) and CenterCrop(224) of a 375x500 image.
  assert crops.resized_shape(375, 500, 256) == (256, 341)
  assert crops.center_crop_box(256, 341, 224) == (16, 58, 224, 224)
  image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (375, 500, 3), np.uint8))
  resized = np.asarray(image.resize((341, 256), Image.Resampling.BILINEAR))
  np.testing.assert_array_equal(crops.eval_crop(image, 224), resized[16:240, 58:282])
  # At 32: the shorter side to round(32 / 0.875) = 37; 64x80 -> 37x46, crop at (2, 7).
  small = Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 80, 3), np.uint8))
  resized = np.asarray(small.resize((46, 37), Image.Resampling.BILINEAR))
  np.testing.assert_array_equal(crops.eval_crop(small, 32), resized[2:34, 7:39])


# The ILSVRC layout and its records


def test_ilsvrc_folder_classes_in_sorted_wnid_order(imagenet_dir: Path) -> None:
  train = load(f"imagenet:{imagenet_dir}", "train")
  assert train.class_names == sorted(WNIDS) and train.num_classes == 3
  assert train.x.shape == (24, 32, 32, 3) and train.x.dtype == np.uint8
  names = [name.decode() for name in train.x.store.names]
  assert [WNIDS.index(n.split("/")[0]) for n in names] == train.y.tolist()
  assert train.y[:6].tolist() == [0, 1, 2, 0, 1, 2]  # classes interleaved
  test = load(f"imagenet:{imagenet_dir}", "test")
  assert len(test.y) == 6 and test.class_names == train.class_names
  test_names = [name.decode() for name in test.x.store.names]
  grey = test.x[test_names.index(f"{WNIDS[0]}/{WNIDS[0]}_1.JPEG")]  # a grey JPEG: RGB, equal
  assert grey.shape == (32, 32, 3) and (grey == grey[..., :1]).all()
  assert data.channel_stats(train.x) == (crops.IMAGENET_MEAN, crops.IMAGENET_STD)


def test_encoded_crops_per_seed_epoch_and_example(imagenet_dir: Path) -> None:
  x = load(f"imagenet:{imagenet_dir}", "train").x
  a = x.augmented(np.array([5, 1, 7]), seed=0, epoch=2)
  np.testing.assert_array_equal(a, x.augmented(np.array([7, 5, 1]), seed=0, epoch=2)[[1, 2, 0]])
  np.testing.assert_array_equal(a[1], x[1:].augmented(np.array([0]), 0, 2)[0])  # a view
  assert not np.array_equal(a, x.augmented(np.array([5, 1, 7]), seed=0, epoch=3))
  assert not np.array_equal(a, x.augmented(np.array([5, 1, 7]), seed=1, epoch=2))
  file = Path(x.store.where(5))
  want = crops.train_crop(crops.open_rgb(file, file), crops.example_rng(0, 2, 0, 5), 32)
  np.testing.assert_array_equal(a[0], want)
  np.testing.assert_array_equal(x[2], crops.eval_crop(crops.open_rgb(x.store.where(2), ""), 32))


def test_conversion_stores_the_jpeg_files_and_reads_back_the_same(
  imagenet_dir: Path, converted: Path
) -> None:
  import grain

  metadata = json.loads((converted / "metadata.json").read_text())
  assert (metadata["encoding"], metadata["shape"]) == ("jpeg", None)
  assert metadata["class_names"] == sorted(WNIDS)
  folder = load(f"imagenet:{imagenet_dir}", "train")
  records = load(f"records:{converted}", "train")
  shards = [str(converted / name) for name in metadata["splits"]["train"]["shards"]]
  assert metadata["splits"]["train"]["records"] == [5, 5, 5, 5, 4]
  stored = grain.sources.ArrayRecordDataSource(shards)
  for i in range(len(folder.y)):
    file = Path(folder.x.store.where(i))
    assert stored[i] == file.read_bytes()  # the file's bytes, not decoded pixels
    pil = np.asarray(Image.open(io.BytesIO(stored[i])).convert("RGB"))
    np.testing.assert_array_equal(np.asarray(crops.open_rgb(stored[i], i)), pil)
  np.testing.assert_array_equal(records.y, folder.y)
  np.testing.assert_array_equal(np.asarray(records.x), np.asarray(folder.x))
  same = load(f"imagenet:{converted}", "test")  # the setting reads it too
  np.testing.assert_array_equal(np.asarray(same.x), np.asarray(folder_test(imagenet_dir)))


def folder_test(imagenet_dir: Path) -> Any:
  return load(f"imagenet:{imagenet_dir}", "test").x


def test_batches_from_folder_records_and_grain_workers_agree(
  imagenet_dir: Path, converted: Path
) -> None:
  folder = load(f"imagenet:{imagenet_dir}", "train")
  records = load(f"records:{converted}", "train")
  batches = [data.train_batches(d.x, d.y, 6, seed=4, start_step=3) for d in (folder, records)]
  workers = data.train_batches(records.x, records.y, 6, seed=4, start_step=3, workers=1)
  for _ in range(3):  # steps 3-5: epoch 0's last, epoch 1's first two
    (xa, ya), (xb, yb), (xc, yc) = next(batches[0]), next(batches[1]), next(workers)
    np.testing.assert_array_equal(xa, xb)
    np.testing.assert_array_equal(xa, xc)
    np.testing.assert_array_equal(ya, yc)
  # Step 3 = epoch 0, batch 3: the examples of epoch_permutation, cropped in epoch 0.
  xb, yb = next(data.train_batches(folder.x, folder.y, 6, seed=4, start_step=3))
  index = data.epoch_permutation(24, 4, 0)[18:24]
  np.testing.assert_array_equal(xb, folder.x.augmented(index, 4, 0))
  np.testing.assert_array_equal(yb, folder.y[index])


def test_a_mixture_crops_each_source_by_its_own_key(imagenet_dir: Path, converted: Path) -> None:
  from jaxrobust.data.mixture import MixturePlan

  first, extra = load(f"imagenet:{imagenet_dir}", "train"), load(f"records:{converted}", "test")
  batches = data.mixed_batches(
    (first.x, first.y), (extra.x, extra.y), 6, extra_fraction=0.5, seed=2, start_step=9
  )
  plan = MixturePlan(24, 6, 6, 3, seed=2)
  for step in (9, 10):  # epoch 1 of the first data set (8 steps of 3)
    xb, yb = next(batches)
    which, index = plan(step)
    for source, dataset in enumerate((first, extra)):
      rows = np.flatnonzero(which == source)
      want = dataset.x.augmented(index[rows], 2, 1, source)
      np.testing.assert_array_equal(xb[rows], want)
      np.testing.assert_array_equal(yb[rows], dataset.y[index[rows]])


BAD = {
  "missing directory": (
    lambda root: root / "none",
    "ImageNet directory {root}/none does not exist",
  ),
  "no train/": (lambda root: (root / "empty").mkdir() or root / "empty", "has no train/ folder"),
  "flat val/": (
    lambda root: flat_val(root),
    "flat/val holds no class folders: sort the validation images into val/<wnid>/",
  ),
}


def flat_val(root: Path) -> Path:
  (root / "flat" / "train" / "n0").mkdir(parents=True)
  (root / "flat" / "val").mkdir()
  (root / "flat" / "val" / "ILSVRC2012_val_00000001.JPEG").write_bytes(b"")
  return root / "flat"


@pytest.mark.parametrize("make, message", BAD.values(), ids=BAD)
def test_bad_imagenet_directories_are_named_and_nothing_is_written(
  make: Callable[[Path], Path], message: str, tmp_path: Path
) -> None:
  path = make(tmp_path)
  split = "test" if "val" in message else "train"
  with pytest.raises(InputError, match=message.format(root=tmp_path).replace("/", ".")):
    data.load(f"imagenet:{path}", split)
  out = tmp_path / "out"
  assert data_cli(["convert", f"imagenet:{path}", str(out)]) == 2
  assert not out.exists()


def test_a_file_that_is_not_an_image_is_named_when_read(tmp_path: Path) -> None:
  root = make_imagenet(tmp_path / "imagenet", train=2, val=1)
  bad = root / "train" / WNIDS[1] / f"{WNIDS[1]}_0.JPEG"
  bad.write_bytes(b"not a JPEG")
  train = load(f"imagenet:{root}", "train")  # listed, not opened
  index = [name.decode() for name in train.x.store.names].index(f"{WNIDS[1]}/{bad.name}")
  with pytest.raises(InputError, match=f"cannot decode the image {bad}"):
    train.x.augmented(np.array([index]), seed=0, epoch=0)


def test_convert_encodings_of_imagenet_and_other_sources(
  imagenet_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
  assert (
    data_cli(["convert", f"imagenet:{imagenet_dir}", str(tmp_path / "a"), "--encoding", "raw"]) == 2
  )
  assert "differ in size: they are stored as their original files" in capsys.readouterr().err
  assert data_cli(["convert", "digits", str(tmp_path / "b"), "--encoding", "jpeg"]) == 2
  assert "--encoding jpeg stores the original files" in capsys.readouterr().err
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# The configs


def test_imagenet_configs() -> None:
  from jaxrobust.configs import common, gpu_recipes, pgd_at
  from jaxrobust.training import optimizer

  c = pgd_at.get_config("imagenet")
  assert c.data.name == f"imagenet:{common.DATA.resolve() / 'imagenet'}"
  assert (c.data.image_size, c.data.augment) == (224, "none")
  assert c.model.to_dict() == dict(name="resnet50", stem="imagenet", width=64)
  assert c.train_attack.to_dict() == dict(
    name="pgd", norm="linf", eps=4 / 255, step_size=2 / 3 * 4 / 255, steps=3
  )
  assert c.eval.attacks.autoattack_linf.eps == 4 / 255 == c.eval.attacks.pgd_linf.eps
  f = gpu_recipes.get_config("imagenet_fast_at")
  assert (f.objective, f.epochs, f.get("overfit_guard")) == ("fast_at", 15, None)
  assert f.train_attack.to_dict() == dict(
    name="fgsm", norm="linf", eps=4 / 255, random_start=True, step_size=5 / 255
  )
  schedule = optimizer.make_schedule(f.optimizer, 1500)  # 100 steps an epoch
  assert float(schedule(0)) == 0 and float(schedule(100)) == pytest.approx(0.4)
  assert float(schedule(1500)) == pytest.approx(0.0, abs=1e-7)


def test_the_setting_reads_jaxrobust_data(tmp_path: Path) -> None:
  code = "from jaxrobust.configs import pgd_at; print(pgd_at.get_config('imagenet').data.name)"
  env = {**program_env(), "JAXROBUST_DATA": str(tmp_path)}
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
  assert out.stdout.strip() == f"imagenet:{tmp_path.resolve() / 'imagenet'}"


@pytest.mark.slow  # train.py in a process of its own (the catalogue in test_bad_input.py has the case too)
def test_train_py_names_the_missing_imagenet_directory(tmp_path: Path) -> None:
  result = run(
    "train.py",
    "--config",
    "pgd_at:imagenet",
    "--workdir",
    tmp_path / "run",
    env={"JAXROBUST_DATA": str(tmp_path / "none")},
  )
  assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
  missing = tmp_path.resolve() / "none" / "imagenet"
  assert f"error: ImageNet directory {missing} does not exist" in result.stderr
  assert not (tmp_path / "run").exists()
