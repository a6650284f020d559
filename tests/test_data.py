"""Data loading from every source, its errors, and batching."""

import gzip
import io
import struct
import tarfile
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from jaxrobust import data, parallel
from jaxrobust.data import folder
from jaxrobust.checks import InputError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared/data"


def assert_valid(dataset, shape, num_classes):
  x, y = dataset
  assert x.shape == shape and x.dtype == np.float32 and x.flags.c_contiguous
  assert y.shape == shape[:1] and y.dtype == np.int32
  assert x.min() >= 0 and x.max() <= 1
  assert y.min() >= 0 and y.max() < num_classes
  assert dataset.num_classes == num_classes


# digits


def test_digits_split_is_fixed_stratified_and_disjoint():
  from sklearn.datasets import load_digits

  train, test = data.load("digits", "train"), data.load("digits", "test")
  assert_valid(train, (1497, 8, 8, 1), 10)
  assert_valid(test, (300, 8, 8, 1), 10)
  assert train.x.max() == 1.0  # pixel value 16 / 16
  assert train.class_names == [str(c) for c in range(10)]
  np.testing.assert_array_equal(np.bincount(test.y), [30] * 10)
  np.testing.assert_array_equal(data.load("digits", "test").x, test.x)
  # Together the splits hold every example exactly once.
  digits = load_digits()
  rows = lambda x, y: np.sort(
    np.concatenate([np.round(x.reshape(len(x), -1) * 16), y[:, None]], 1), axis=0
  )
  np.testing.assert_array_equal(
    rows(np.concatenate([train.x, test.x]), np.concatenate([train.y, test.y])),
    rows(digits.images / 16, digits.target),
  )


# npz


def test_npz_uint8_rank3_with_split_in_path(tmp_path):
  rng = np.random.default_rng(0)
  for split, n in [("train", 5), ("test", 3)]:
    np.savez(
      tmp_path / f"d-{split}.npz",
      x=rng.integers(0, 256, (n, 4, 6), dtype=np.uint8),
      y=np.arange(n) % 3,
    )
  for split, n in [("train", 5), ("test", 3)]:
    dataset = data.load(f"npz:{tmp_path}/d-{{split}}.npz", split)
    assert_valid(dataset, (n, 4, 6, 1), 3)
    with np.load(tmp_path / f"d-{split}.npz") as raw:
      np.testing.assert_allclose(dataset.x[..., 0], raw["x"] / 255, rtol=1e-6)
      np.testing.assert_array_equal(dataset.y, raw["y"])
    assert dataset.class_names is None


def test_npz_float_with_split_keys_and_class_names(tmp_path):
  rng = np.random.default_rng(1)
  arrays = {
    "x_train": rng.random((4, 3, 3, 3)),
    "y_train": np.array([0, 1, 0, 1]),
    "x_test": rng.random((2, 3, 3, 3)).astype(np.float32),
    "y_test": np.array([1, 1]),
    "class_names": np.array(["a", "b", "c"]),
  }
  np.savez(tmp_path / "d.npz", **arrays)
  for split in data.SPLITS:
    dataset = data.load(f"npz:{tmp_path}/d.npz", split)
    assert_valid(dataset, arrays[f"x_{split}"].shape, 3)
    np.testing.assert_allclose(dataset.x, arrays[f"x_{split}"], rtol=1e-6)
    np.testing.assert_array_equal(dataset.y, arrays[f"y_{split}"])
    assert dataset.class_names == ["a", "b", "c"]


@pytest.mark.parametrize(
  "arrays, message",
  [
    ({"x": np.full((2, 3, 3), 1.5), "y": np.array([0, 1])}, r"\[0, 1\]"),
    (
      {
        "x": np.zeros((2, 3, 3), np.uint8),
        "y": np.array([0, 5]),
        "class_names": np.array(["a", "b"]),
      },
      r"\[0, 2\), got \[5\]",
    ),
    ({"x": np.zeros((2, 3, 3), np.uint8), "y": np.array([0])}, "2 images but 1"),
    ({"x": np.zeros((2, 3, 3), np.int64), "y": np.array([0, 1])}, "int64"),
    ({"images": np.zeros((2, 3, 3), np.uint8)}, "holds images"),
  ],
)
def test_npz_bad_contents_name_the_file(tmp_path, arrays, message):
  np.savez(tmp_path / "bad.npz", **arrays)
  with pytest.raises(InputError, match=message) as error:
    data.load(f"npz:{tmp_path}/bad.npz", "train")
  assert "bad.npz" in str(error.value)


def test_npz_image_and_label_keys(tmp_path):
  """The layout of the published generated images (Gowal et al. 2021, Wang et al. 2023)."""
  rng = np.random.default_rng(4)
  image, label = rng.integers(0, 256, (6, 4, 4, 3), dtype=np.uint8), np.arange(6) % 2
  np.savez(tmp_path / "generated.npz", image=image, label=label)
  for split in data.SPLITS:
    dataset = data.load(f"npz:{tmp_path}/generated.npz", split)
    assert_valid(dataset, (6, 4, 4, 3), 2)
    np.testing.assert_array_equal(dataset.x, image / np.float32(255))
    np.testing.assert_array_equal(dataset.y, label)


def test_npz_that_is_not_an_archive(tmp_path):
  (tmp_path / "junk.npz").write_bytes(b"not a zip file at all")
  np.save(tmp_path / "array.npy", np.zeros(3))
  for name in ["junk.npz", "array.npy"]:
    with pytest.raises(InputError, match=name):
      data.load(f"npz:{tmp_path}/{name}", "train")


# idx


def idx_bytes(array, magic):
  return struct.pack(f">{1 + array.ndim}i", magic, *array.shape) + array.tobytes()


def write_idx(directory, prefix, images, labels, compress):
  for kind, array, magic in [("images-idx3", images, 2051), ("labels-idx1", labels, 2049)]:
    path = directory / f"{prefix}-{kind}-ubyte"
    if compress:
      path.with_name(path.name + ".gz").write_bytes(gzip.compress(idx_bytes(array, magic)))
    else:
      path.write_bytes(idx_bytes(array, magic))


@pytest.mark.parametrize("compress", [False, True])
def test_idx_round_trip(tmp_path, compress):
  rng = np.random.default_rng(2)
  images = {
    s: rng.integers(0, 256, (n, 5, 4), dtype=np.uint8) for s, n in [("train", 6), ("test", 4)]
  }
  labels = {
    "train": np.array([0, 1, 2, 3, 4, 5], np.uint8),
    "test": np.array([3, 0, 1, 1], np.uint8),
  }
  write_idx(tmp_path, "train", images["train"], labels["train"], compress)
  write_idx(tmp_path, "t10k", images["test"], labels["test"], compress)
  for split in data.SPLITS:
    dataset = data.load(f"idx:{tmp_path}", split)
    assert_valid(dataset, images[split].shape + (1,), labels[split].max() + 1)
    np.testing.assert_array_equal(np.round(dataset.x[..., 0] * 255), images[split])
    np.testing.assert_array_equal(dataset.y, labels[split])


@pytest.mark.parametrize("compress", [False, True])
def test_idx_truncated_file_names_it(tmp_path, compress):
  images = np.zeros((3, 4, 4), np.uint8)
  write_idx(tmp_path, "t10k", images, np.zeros(3, np.uint8), compress=False)
  path = tmp_path / "t10k-images-idx3-ubyte"
  cut = path.read_bytes()[:-5]
  if compress:
    path.unlink()
    path = path.with_name(path.name + ".gz")
    cut = gzip.compress(cut)
  path.write_bytes(cut)
  with pytest.raises(InputError, match=f"{path}.*truncated"):
    data.load(f"idx:{tmp_path}", "test")


def test_idx_corrupt_gzip_wrong_magic_and_count_mismatch(tmp_path):
  images, labels = np.zeros((3, 2, 2), np.uint8), np.zeros(2, np.uint8)
  write_idx(tmp_path, "t10k", images, labels, compress=True)
  with pytest.raises(InputError, match="3 images but .*2 labels"):
    data.load(f"idx:{tmp_path}", "test")
  (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels, 2051)))
  with pytest.raises(InputError, match="t10k-labels-idx1-ubyte.gz.*magic"):
    data.load(f"idx:{tmp_path}", "test")
  (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b garbage")
  with pytest.raises(InputError, match="t10k-labels-idx1-ubyte.gz"):
    data.load(f"idx:{tmp_path}", "test")
  with pytest.raises(InputError, match="train-images-idx3-ubyte"):
    data.load(f"idx:{tmp_path}", "train")


# folder


def png_bytes(pixels):
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="PNG")
  return buffer.getvalue()


def image_tree(root, splits=data.SPLITS):
  """Writes tiny 3x2 RGB PNGs: {split}/{class}/{name}.png, returns expectations.

  The class folders are listed unsorted, and "b_cat" has 3 images per split,
  "a_dog" 2, so that labels (0 for a_dog) and order (classes interleaved,
  `folder.interleaved`) can be checked.
  """
  expected = {}
  for s, split in enumerate(splits):
    xs, ys = [], []
    for label, (name, count) in sorted(enumerate([("a_dog", 2), ("b_cat", 3)]), reverse=True):
      folder = root / split / name
      folder.mkdir(parents=True)
      for i in reversed(range(count)):
        pixels = np.full((3, 2, 3), 40 * i + 100 * label + s, np.uint8)
        (folder / f"{i:02d}.png").write_bytes(png_bytes(pixels))
    # Classes interleaved: each class's first image, then each one's second, ...
    for label, i in [(0, 0), (1, 0), (0, 1), (1, 1), (1, 2)]:
      xs.append(np.full((3, 2, 3), 40 * i + 100 * label + s, np.uint8))
      ys.append(label)
    expected[split] = (np.stack(xs) / np.float32(255), np.array(ys))
  return expected


def tarball(directory, path):
  with tarfile.open(path, "w:gz") as tar:
    for child in sorted(directory.iterdir()):
      tar.add(child, arcname=child.name)
  return path


def test_folder_directory_and_tarball(tmp_path):
  expected = image_tree(tmp_path / "tree")
  archive = tarball(tmp_path / "tree", tmp_path / "tree.tar.gz")
  for spec in [f"folder:{tmp_path}/tree", f"folder:{archive}"]:
    for split in data.SPLITS:
      dataset = data.load(spec, split, cache_dir=tmp_path / "cache")
      assert_valid(dataset, (5, 3, 2, 3), 2)
      assert dataset.class_names == ["a_dog", "b_cat"]
      np.testing.assert_array_equal(dataset.x, expected[split][0])
      np.testing.assert_array_equal(dataset.y, expected[split][1])


def test_folder_without_split_folders_and_split_in_path(tmp_path):
  expected = image_tree(tmp_path / "tree")
  for split in data.SPLITS:
    tarball(tmp_path / "tree" / split, tmp_path / f"{split}.tgz")
  for split in data.SPLITS:
    for spec in [f"folder:{tmp_path}/tree/{{split}}", f"folder:{tmp_path}/{{split}}.tgz"]:
      x, y = data.load(spec, split, cache_dir=tmp_path / "cache")
      np.testing.assert_array_equal(x, expected[split][0])
      np.testing.assert_array_equal(y, expected[split][1])


def test_folder_cache_is_used_and_corrupt_cache_rebuilt(tmp_path, monkeypatch):
  image_tree(tmp_path / "tree")
  archive = tarball(tmp_path / "tree", tmp_path / "tree.tar.gz")
  monkeypatch.setenv("JAXROBUST_CACHE", str(tmp_path / "cache"))
  first = data.load(f"folder:{archive}", "test")
  [cache_file] = (tmp_path / "cache").glob("*.npz")

  def no_decoding(*args):
    raise AssertionError("decoded despite the cache")

  with monkeypatch.context() as patch:
    patch.setattr(folder, "_decode_image", no_decoding)
    cached = data.load(f"folder:{archive}", "test")
  np.testing.assert_array_equal(cached.x, first.x)
  np.testing.assert_array_equal(cached.y, first.y)
  assert cached.class_names == first.class_names

  cache_file.write_bytes(b"corrupt")
  rebuilt = data.load(f"folder:{archive}", "test")
  np.testing.assert_array_equal(rebuilt.x, first.x)
  assert list((tmp_path / "cache").iterdir()) == [cache_file]
  with np.load(cache_file) as arrays:
    np.testing.assert_array_equal(arrays["labels"], first.y)


def test_folder_cache_follows_changes_to_the_directory(tmp_path):
  image_tree(tmp_path / "tree", splits=["train"])
  spec = f"folder:{tmp_path}/tree"
  before = data.load(spec, "train", cache_dir=tmp_path / "cache")
  white = np.full((3, 2, 3), 255, np.uint8)
  (tmp_path / "tree/train/a_dog/00.png").write_bytes(png_bytes(white))
  changed = data.load(spec, "train", cache_dir=tmp_path / "cache")
  np.testing.assert_array_equal(changed.x[0], white / np.float32(255))
  np.testing.assert_array_equal(changed.x[1:], before.x[1:])
  (tmp_path / "tree/train/a_dog/05.png").write_bytes(png_bytes(white))
  added = data.load(spec, "train", cache_dir=tmp_path / "cache")
  assert len(added.x) == len(before.x) + 1


def test_folder_grey_and_mixed_images(tmp_path):
  grey = np.arange(6, dtype=np.uint8).reshape(3, 2) * 40
  for name in ["a", "b"]:
    (tmp_path / "grey" / name).mkdir(parents=True)
    (tmp_path / "grey" / name / "0.png").write_bytes(png_bytes(grey))
  x, _ = data.load(f"folder:{tmp_path}/grey", "test", cache_dir=tmp_path / "c")
  assert x.shape == (2, 3, 2, 1)
  np.testing.assert_array_equal(x[0, ..., 0], grey / np.float32(255))
  (tmp_path / "grey" / "b" / "1.png").write_bytes(png_bytes(np.zeros((3, 2, 3), np.uint8)))
  x, _ = data.load(f"folder:{tmp_path}/grey", "test", cache_dir=tmp_path / "c")
  assert x.shape == (3, 3, 2, 3)
  np.testing.assert_array_equal(x[0], np.repeat(grey[..., None], 3, -1) / np.float32(255))


def test_folder_errors_name_the_file(tmp_path):
  image_tree(tmp_path / "tree")
  (tmp_path / "tree/test/b_cat/notes.txt").write_text("not an image")
  with pytest.raises(InputError, match="test/b_cat/notes.txt"):
    data.load(f"folder:{tmp_path}/tree", "test", cache_dir=tmp_path / "cache")
  archive = tarball(tmp_path / "tree", tmp_path / "tree.tar.gz")
  with pytest.raises(InputError, match="tree.tar.gz/test/b_cat/notes.txt"):
    data.load(f"folder:{archive}", "test", cache_dir=tmp_path / "cache")
  (tmp_path / "tree/train/a_dog/big.png").write_bytes(png_bytes(np.zeros((4, 4, 3), np.uint8)))
  with pytest.raises(InputError, match="a_dog/big.png is 4x4"):
    data.load(f"folder:{tmp_path}/tree", "train", cache_dir=tmp_path / "cache")
  (tmp_path / "only").mkdir()
  (tmp_path / "only/train").mkdir()
  (tmp_path / "only/train/c").mkdir()
  (tmp_path / "only/train/c/0.png").write_bytes(png_bytes(np.zeros((2, 2), np.uint8)))
  with pytest.raises(InputError, match="no test/ folder"):
    data.load(f"folder:{tmp_path}/only", "test", cache_dir=tmp_path / "cache")
  (tmp_path / "junk.tar.gz").write_bytes(b"not a tarball")
  with pytest.raises(InputError, match="junk.tar.gz"):
    data.load(f"folder:{tmp_path}/junk.tar.gz", "test", cache_dir=tmp_path / "cache")


# tfds


def test_tfds_mock_data(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    dataset = data.load("tfds:mnist", "test", data_dir=tmp_path)
  assert_valid(dataset, (6, 28, 28, 1), 10)
  assert dataset.class_names == [str(c) for c in range(10)]


def test_tfds_not_prepared_says_how_to_prepare(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(InputError) as error:
    data.load("tfds:mnist", "train", data_dir=tmp_path)
  message = str(error.value)
  for part in [
    "not prepared",
    str(tmp_path),
    "cannot download",
    "pip install tensorflow-cpu",
    "tfds.builder('mnist'",
    "download_and_prepare()",
  ]:
    assert part in message
  with pytest.raises(InputError, match="no_such_set"):
    data.load("tfds:no_such_set", "train", data_dir=tmp_path)


# names, paths, splits


@pytest.mark.parametrize("name", ["mnist", "npz:", "digits:x", "csv:/a.csv"])
def test_unknown_name_lists_the_sources(name):
  with pytest.raises(
    InputError, match=f"{name!r}.*digits, npz:<path>, idx:<dir>, folder:<path>, tfds:<name>"
  ):
    data.load(name, "train")


@pytest.mark.parametrize("source", ["npz", "idx", "folder"])
def test_missing_path_is_named(tmp_path, source):
  with pytest.raises(InputError, match=f"{tmp_path}/absent-test"):
    data.load(f"{source}:{tmp_path}/absent-{{split}}", "test", cache_dir=tmp_path)


def test_bad_split_is_named():
  with pytest.raises(InputError, match="'validation'"):
    data.load("digits", "validation")


# batching


def test_epoch_permutation_depends_on_seed_and_epoch_only():
  a = data.epoch_permutation(50, 3, 1)
  np.testing.assert_array_equal(a, data.epoch_permutation(50, 3, 1))
  np.testing.assert_array_equal(np.sort(a), np.arange(50))
  assert not np.array_equal(a, data.epoch_permutation(50, 3, 2))
  assert not np.array_equal(a, data.epoch_permutation(50, 4, 1))


def take(iterator, count):
  return [next(iterator) for _ in range(count)]


def test_train_batches_walk_each_epoch_permutation():
  x, y = np.arange(10) * 10, np.arange(10)
  batches = take(data.train_batches(x, y, 3, seed=7), 9)  # 3 epochs of 3 steps
  for xb, yb in batches:
    assert xb.shape == (3,) and np.array_equal(xb, yb * 10)
  for epoch in range(3):
    seen = np.concatenate([yb for _, yb in batches[3 * epoch : 3 * epoch + 3]])
    np.testing.assert_array_equal(seen, data.epoch_permutation(10, 7, epoch)[:9])
  again = take(data.train_batches(x, y, 3, seed=7), 9)
  assert all(np.array_equal(a[1], b[1]) for a, b in zip(batches, again))
  other = take(data.train_batches(x, y, 3, seed=8), 3)
  assert not all(np.array_equal(a[1], b[1]) for a, b in zip(batches, other))


@pytest.mark.parametrize("start_step", [0, 1, 4, 7, 12])
def test_train_batches_resume_equals_uninterrupted_tail(start_step):
  x, y = np.random.default_rng(0).random((11, 2, 2, 1)), np.arange(11)
  full = take(data.train_batches(x, y, 4, seed=1), 20)
  resumed = take(data.train_batches(x, y, 4, seed=1, start_step=start_step), 20 - start_step)
  for (xa, ya), (xb, yb) in zip(full[start_step:], resumed):
    np.testing.assert_array_equal(xa, xb)
    np.testing.assert_array_equal(ya, yb)


@pytest.mark.parametrize("batch_size", [0, 11, 2.0])
def test_train_batches_bad_batch_size(batch_size):
  with pytest.raises(InputError, match="batch_size"):
    data.train_batches(np.zeros(10), np.zeros(10), batch_size, seed=0)


@pytest.mark.parametrize(
  "n, batch_size, multiple_of, sizes",
  [
    (10, 4, 2, [4, 4, 2]),
    (11, 4, 2, [4, 4, 4]),
    (7, 6, 3, [6, 3]),
    (5, 5, 1, [5]),
  ],
)
def test_eval_batches_cover_every_example_once(n, batch_size, multiple_of, sizes):
  x, y = np.arange(n, dtype=np.float32)[:, None] / n, np.arange(n)
  batches = list(data.eval_batches(x, y, batch_size, multiple_of=multiple_of))
  assert [len(xb) for xb, _, _ in batches] == sizes
  assert all(len(yb) == len(mask) == len(xb) for xb, yb, mask in batches)
  np.testing.assert_array_equal(np.concatenate([yb[mask] for _, yb, mask in batches]), y)
  np.testing.assert_array_equal(np.concatenate([xb[mask] for xb, _, mask in batches]), x)
  _, last_y, last_mask = batches[-1]
  assert np.all(last_y[~last_mask] == n - 1)


def test_eval_batches_bad_arguments():
  with pytest.raises(InputError, match="multiple_of 4"):
    data.eval_batches(np.zeros(8), np.zeros(8), 6, multiple_of=4)
  with pytest.raises(InputError, match="same leading size"):
    data.eval_batches(np.zeros(8), np.zeros(7), 4)


def test_to_devices_splits_the_batch():
  assert jax.device_count() >= 2, "tests/conftest.py asks for 2 host devices"
  mesh = parallel.mesh(jax.devices()[:2])
  xb, yb = np.arange(8.0).reshape(4, 2), np.arange(4)
  xd, yd = data.to_devices((xb, yb), mesh)
  assert xd.sharding == parallel.batch_sharding(mesh)
  assert sorted(s.data.shape for s in xd.addressable_shards) == [(2, 2), (2, 2)]
  np.testing.assert_array_equal(np.asarray(xd), xb)
  np.testing.assert_array_equal(np.asarray(yd), yb)
  with pytest.raises(InputError, match=r"2 devices.*\(3, 2\)"):
    data.to_devices((np.zeros((3, 2)), np.zeros(3)), mesh)


def test_channel_stats():
  x = np.random.default_rng(0).random((5, 4, 3, 2)).astype(np.float32)
  x[..., 1] *= 0.5
  mean, std = data.channel_stats(x)
  assert isinstance(mean, tuple) and all(isinstance(m, float) for m in mean)
  np.testing.assert_allclose(mean, x.mean(axis=(0, 1, 2)), rtol=1e-6)
  np.testing.assert_allclose(std, x.std(axis=(0, 1, 2)), rtol=1e-5)


def test_channel_stats_of_uint8_images_are_those_of_their_float_values():
  x = np.random.default_rng(1).integers(0, 256, (7, 5, 4, 3), dtype=np.uint8)
  x[..., 2] //= 3
  counts = data.pixel_histogram(x)
  assert counts.shape == (3, 256) and counts.sum() == x.size
  np.testing.assert_array_equal(counts[0], np.bincount(x[..., 0].ravel(), minlength=256))
  mean, std = data.channel_stats(x)
  float_mean, float_std = data.channel_stats(x / np.float32(255))
  np.testing.assert_allclose(mean, float_mean, rtol=1e-12)
  np.testing.assert_allclose(std, float_std, rtol=1e-12)


# real data, when ../shared/data is present


@pytest.mark.slow
@pytest.mark.shared_data
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="no shared/data")
def test_real_cifar10_and_mnist(tmp_path):
  start = time.perf_counter()
  cifar = data.load(
    f"folder:{SHARED_DATA}/cifar10/cifar10-{{split}}-jpeg.tar.gz", "test", cache_dir=tmp_path
  )
  assert time.perf_counter() - start < 60
  assert_valid(cifar, (10_000, 32, 32, 3), 10)
  np.testing.assert_array_equal(np.bincount(cifar.y), [1000] * 10)
  assert cifar.class_names[:3] == ["airplane", "automobile", "bird"]
  mean, std = data.channel_stats(cifar.x)
  np.testing.assert_allclose(mean, [0.4941, 0.4851, 0.4504], atol=1e-3)
  np.testing.assert_allclose(std, [0.2448, 0.2422, 0.2606], atol=1e-3)
  mnist = data.load(f"idx:{SHARED_DATA}/mnist", "test")
  assert_valid(mnist, (10_000, 28, 28, 1), 10)
  np.testing.assert_array_equal(
    np.bincount(mnist.y), [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
  )
