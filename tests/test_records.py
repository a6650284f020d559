"""records: directories (ArrayRecord shards), their converter and mixed batches."""

import io
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from jaxrobust import data
from jaxrobust.checks import InputError
from jaxrobust.data import cli, records
from jaxrobust.data.convert import convert

ROOT = Path(__file__).resolve().parents[1]


def uint8_npz(path, n=48, shape=(5, 4, 3), classes=4, seed=0, keys=("x", "y")):
  rng = np.random.default_rng(seed)
  x = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
  y = rng.integers(0, classes, n)
  y[:classes] = np.arange(classes)  # every class present
  np.savez(path, **{keys[0]: x, keys[1]: y})
  return x, y


@pytest.fixture(scope="module")
def npz_records(tmp_path_factory):
  """An npz of uint8 images (both splits) and its raw and png conversions."""
  root = tmp_path_factory.mktemp("records")
  uint8_npz(root / "d.npz")
  dirs = {}
  for encoding in ["raw", "png"]:
    dirs[encoding] = convert(
      f"npz:{root}/d.npz", root / encoding, shard_size=10, encoding=encoding, progress=False
    )
  return f"npz:{root}/d.npz", dirs


def take(iterator, count):
  return [next(iterator) for _ in range(count)]


def test_converted_npz_is_the_source_exactly(npz_records):
  name, dirs = npz_records
  memory = data.load(name, "train")
  for directory in dirs.values():
    loaded = data.load(f"records:{directory}", "train")
    assert isinstance(loaded.x, records.RecordImages) and loaded.x.dtype == np.uint8
    assert loaded.x.shape == memory.x.shape and len(loaded.x.paths) == 5  # 48 / 10
    np.testing.assert_array_equal(np.asarray(loaded.x) / np.float32(255), memory.x)
    np.testing.assert_array_equal(loaded.y, memory.y)
    assert loaded.num_classes == memory.num_classes == 4
  metadata = json.loads((dirs["png"] / records.METADATA).read_text())
  assert metadata["encoding"] == "png" and metadata["shape"] == [5, 4, 3]
  assert metadata["splits"]["test"]["count"] == 48 and metadata["classes"] == 4


def test_records_batches_equal_in_memory_batches_and_resume(npz_records):
  name, dirs = npz_records
  memory = data.load(name, "train")
  stored = data.load(f"records:{dirs['raw']}", "train")
  full = take(data.train_batches(*memory, 8, seed=5), 14)  # over two epochs of 6 steps
  from_records = take(data.train_batches(*stored, 8, seed=5), 14)
  for (xm, ym), (xr, yr) in zip(full, from_records):
    assert xr.dtype == np.uint8
    np.testing.assert_array_equal(np.asarray(data.as_float(xr)), xm)
    np.testing.assert_array_equal(yr, ym)
  for start in [1, 6, 11]:
    resumed = take(data.train_batches(*stored, 8, seed=5, start_step=start), 14 - start)
    for (xa, ya), (xb, yb) in zip(from_records[start:], resumed):
      np.testing.assert_array_equal(xa, xb)
      np.testing.assert_array_equal(ya, yb)
  evaluated = list(data.eval_batches(*stored, 20, multiple_of=4))
  for (xm, ym, mm), (xr, yr, mr) in zip(data.eval_batches(*memory, 20, multiple_of=4), evaluated):
    np.testing.assert_array_equal(np.asarray(data.as_float(xr)), xm)
    np.testing.assert_array_equal(yr, ym)
    np.testing.assert_array_equal(mr, mm)


def test_as_float_under_jit_is_the_host_division():
  pixels = np.arange(256, dtype=np.uint8).reshape(16, 16)
  on_device = jax.jit(data.as_float)(pixels)
  assert on_device.dtype == np.float32
  np.testing.assert_array_equal(np.asarray(on_device), pixels / np.float32(255))
  floats = np.linspace(0, 1, 5, dtype=np.float32)
  np.testing.assert_array_equal(np.asarray(data.as_float(floats)), floats)
  np.testing.assert_array_equal(data.host_float(pixels), np.asarray(on_device))
  assert data.host_float(floats) is floats


def test_channel_stats_from_the_stored_histogram(npz_records):
  name, dirs = npz_records
  memory, stored = data.load(name, "train"), data.load(f"records:{dirs['raw']}", "train")
  expected = data.channel_stats(memory.x)
  got = data.channel_stats(stored.x)
  assert stored.x.reads == 0  # the histogram of the metadata, no pass over the images
  np.testing.assert_array_equal(np.float32(got), np.float32(expected))
  np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_slices_are_unread_views_with_their_own_statistics(npz_records):
  name, dirs = npz_records
  memory, stored = data.load(name, "train"), data.load(f"records:{dirs['raw']}", "train")
  head, tail = stored.x[:40], stored.x[40:]  # a training part and a validation slice
  assert isinstance(head, records.RecordImages) and head.shape == (40, 5, 4, 3)
  assert stored.x.reads == 0
  np.testing.assert_array_equal(np.asarray(tail) / np.float32(255), memory.x[40:])
  np.testing.assert_array_equal(head[[39, 0]] / np.float32(255), memory.x[[39, 0]])
  np.testing.assert_array_equal(head[2:5][1], stored.x[3])
  assert stored.x.reads == 8 + 2 + 1 + 1
  # The stored histogram, less the counts of the rows outside when they are fewer.
  for part, expected, reads in [
    (head, memory.x[:40], 8),
    (tail, memory.x[40:], 8),
    (stored.x[5:30], memory.x[5:30], 23),
    (stored.x, memory.x, 0),
  ]:
    before = stored.x.reads
    got = data.channel_stats(part)
    np.testing.assert_allclose(got, data.channel_stats(expected), rtol=1e-12)
    assert stored.x.reads - before == reads
  served = take(data.train_batches(head, stored.y[:40], 8, seed=1, start_step=3), 2)
  expected = take(data.train_batches(memory.x[:40], memory.y[:40], 8, seed=1, start_step=3), 2)
  for (xa, ya), (xb, yb) in zip(served, expected):
    np.testing.assert_array_equal(xa / np.float32(255), xb)
    np.testing.assert_array_equal(ya, yb)


def logged_reads(monkeypatch):
  """Patches RecordImages.read to log (object id, indices) of every read."""
  log = []
  read = records.RecordImages.read

  def logging_read(self, indices):
    log.append((id(self), np.asarray(indices).copy()))
    return read(self, indices)

  monkeypatch.setattr(records.RecordImages, "read", logging_read)
  return log


def test_two_processes_read_only_their_rows(npz_records, monkeypatch):
  name, dirs = npz_records
  memory = data.load(name, "train")
  log = logged_reads(monkeypatch)
  processes = [data.load(f"records:{dirs['raw']}", "train") for _ in range(2)]
  steps = 6  # one epoch: 48 examples in batches of 8
  batches = [
    take(
      data.train_batches(
        *p, 8, seed=2, rows=data.process_rows(8, process_index=i, process_count=2)
      ),
      steps,
    )
    for i, p in enumerate(processes)
  ]
  full = take(data.train_batches(*memory, 8, seed=2), steps)
  for step in range(steps):
    (x0, y0), (x1, y1) = batches[0][step], batches[1][step]
    assert len(x0) == len(x1) == 4
    np.testing.assert_array_equal(np.concatenate([x0, x1]) / np.float32(255), full[step][0])
    np.testing.assert_array_equal(np.concatenate([y0, y1]), full[step][1])
  read = {
    i: np.concatenate([ix for who, ix in log if who == id(p.x)]) for i, p in enumerate(processes)
  }
  assert [p.x.reads for p in processes] == [24, 24]
  assert not set(read[0]) & set(read[1])
  np.testing.assert_array_equal(np.sort(np.concatenate([read[0], read[1]])), np.arange(48))


def test_process_rows_of_a_mesh_and_bad_rows():
  assert data.process_rows(8, process_index=1, process_count=4) == (2, 4)
  mesh = jax.sharding.Mesh(jax.devices()[:2], ("batch",))
  assert data.process_rows(8, mesh) == (0, 8)  # one process feeds both devices
  with pytest.raises(InputError, match="divisible by the 3 processes"):
    data.process_rows(8, process_index=0, process_count=3)
  with pytest.raises(InputError, match="rows"):
    data.train_batches(np.zeros(8), np.zeros(8), 4, seed=0, rows=(2, 9))
  xb, yb = next(data.train_batches(np.arange(8), np.arange(8), 4, seed=0, rows=(0, 4)))
  global_x = data.local_to_global(xb, mesh, 4)
  np.testing.assert_array_equal(np.asarray(global_x), xb)


def test_grain_workers_give_the_same_batches(npz_records):
  _, dirs = npz_records
  stored = data.load(f"records:{dirs['png']}", "train")
  in_process = take(data.train_batches(*stored, 8, seed=9, start_step=3), 4)
  workers = data.train_batches(*stored, 8, seed=9, start_step=3, workers=2)
  in_workers = take(workers, 4)
  for (xa, ya), (xb, yb) in zip(in_process, in_workers):
    assert xb.dtype == np.uint8
    np.testing.assert_array_equal(xa, xb)
    np.testing.assert_array_equal(ya, yb)
  del workers


# the converter


def png(pixels):
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="PNG")
  return buffer.getvalue()


def test_convert_digits_within_rounding(tmp_path):
  out = convert("digits", tmp_path / "digits", shard_size=400, progress=False)
  for split in data.SPLITS:
    memory, stored = data.load("digits", split), data.load(f"records:{out}", split)
    np.testing.assert_allclose(np.asarray(stored.x) / np.float32(255), memory.x, atol=0.5 / 255)
    np.testing.assert_array_equal(stored.y, memory.y)
    assert stored.class_names == memory.class_names


def test_convert_tfds_mock_data(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    out = convert("tfds:mnist", tmp_path / "mnist", data_dir=tmp_path, progress=False)
    memory = data.load("tfds:mnist", "test", data_dir=tmp_path)
  stored = data.load(f"records:{out}", "test")
  np.testing.assert_array_equal(np.asarray(stored.x) / np.float32(255), memory.x)
  np.testing.assert_array_equal(stored.y, memory.y)
  assert stored.class_names == memory.class_names


@pytest.mark.parametrize("grey", [False, True])
def test_convert_folder_of_pngs_streams_one_file_at_a_time(tmp_path, monkeypatch, grey):
  rng = np.random.default_rng(3)
  for split in data.SPLITS:
    for name in ["cat", "dog", "emu"]:
      (tmp_path / "tree" / split / name).mkdir(parents=True)
      for i in range(rng.integers(2, 5)):
        shape = (6, 5) if grey else (6, 5, 3)
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
        (tmp_path / "tree" / split / name / f"{i}.png").write_bytes(png(pixels))
  decoded = []
  decode = data.folder._decode_image
  monkeypatch.setattr(data.folder, "_decode_image", lambda d, n: decoded.append(n) or decode(d, n))
  out = convert(f"folder:{tmp_path}/tree", tmp_path / "out", shard_size=3, progress=False)
  assert len(decoded) == len(set(decoded))  # each file decoded once, one at a time
  for split in data.SPLITS:
    memory = data.load(f"folder:{tmp_path}/tree", split, cache_dir=tmp_path / "cache")
    stored = data.load(f"records:{out}", split)
    assert stored.x.shape == memory.x.shape and stored.x.shape[-1] == (1 if grey else 3)
    np.testing.assert_array_equal(np.asarray(stored.x) / np.float32(255), memory.x)
    np.testing.assert_array_equal(stored.y, memory.y)
    assert stored.class_names == ["cat", "dog", "emu"]


def run_cli(*args):
  return subprocess.run(
    [sys.executable, "-m", "jaxrobust.data", *args], capture_output=True, text=True, cwd=ROOT
  )


def test_command_line_help_and_one_error_line(tmp_path):
  assert "--shard-size" in run_cli("convert", "--help").stdout
  result = run_cli("convert", "npz:/absent.npz", str(tmp_path / "new"))
  assert result.returncode == 2 and not (tmp_path / "new").exists()
  assert result.stderr.strip().splitlines() == ["error: data path /absent.npz does not exist"]


def test_bad_input_writes_nothing_and_overwrite_replaces(tmp_path, capsys):
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  for args, message in [
    (["convert", "digits", str(out)], "not empty; pass --overwrite"),
    (["convert", "digits", str(tmp_path / "new"), "--shard-size", "0"], "shard_size"),
    (["convert", "digits", str(tmp_path / "new"), "--encoding", "gif"], "invalid choice"),
    (["convert", "digits", str(tmp_path / "new"), "--splits", "val"], "'val'"),
    (["frobnicate"], "invalid choice"),
  ]:
    try:
      status = cli.main(args)
    except SystemExit as exit:
      status = exit.code
    assert status == 2, args
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
  assert (out / "keep.txt").read_text() == "mine" and not (tmp_path / "new").exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no partial directories
  assert cli.main(["convert", "digits", str(out), "--overwrite", "--splits", "test"]) == 0
  assert not (out / "keep.txt").exists()
  assert len(data.load(f"records:{out}", "test").y) == 300


def test_console_script_is_declared():
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  assert project["scripts"]["jaxrobust-data"] == "jaxrobust.data.cli:main"
  assert any(d.startswith("grain") for d in project["dependencies"])


def test_bad_records_directories_are_named(npz_records, tmp_path):
  _, dirs = npz_records
  with pytest.raises(InputError, match=f"{tmp_path}/nothing does not exist"):
    data.load(f"records:{tmp_path}/nothing", "train")
  with pytest.raises(InputError, match="no metadata.json"):
    data.load(f"records:{tmp_path}", "train")
  broken = tmp_path / "broken"
  convert(f"npz:{dirs['raw'].parent}/d.npz", broken, shard_size=10, progress=False)
  (broken / "train-00002-of-00005.array_record").unlink()
  with pytest.raises(InputError, match="train-00002-of-00005.array_record is missing"):
    data.load(f"records:{broken}", "train")
  shard = broken / "test-00001-of-00005.array_record"
  shard.write_bytes(shard.read_bytes()[:100])
  with pytest.raises(InputError, match="cannot read the record shard .*test-00001-of-00005"):
    next(data.train_batches(*data.load(f"records:{broken}", "test"), 48, seed=0))
  reshaped = convert(f"npz:{dirs['raw'].parent}/d.npz", tmp_path / "r", progress=False)
  metadata = json.loads((reshaped / records.METADATA).read_text())
  metadata["shape"] = [5, 4, 1]  # another shape than the records hold
  (reshaped / records.METADATA).write_text(json.dumps(metadata))
  with pytest.raises(InputError, match="record 3 of .*train-00000-of-00001.*60 bytes, not the 20"):
    data.load(f"records:{reshaped}", "train").x[3]
  metadata["splits"]["train"]["records"] = [40]
  metadata["splits"]["train"]["count"] = 40
  (reshaped / records.METADATA).write_text(json.dumps(metadata))
  np.save(reshaped / "train-labels.npy", np.zeros(40, np.int32))
  with pytest.raises(InputError, match="train-00000-of-00001.array_record holds 48 records, but"):
    data.load(f"records:{reshaped}", "train").x[3]


def test_convert_refuses_splits_that_disagree(tmp_path):
  uint8_npz(tmp_path / "a-train.npz", classes=4)
  uint8_npz(tmp_path / "a-test.npz", classes=3)
  with pytest.raises(InputError, match="train has 4 classes but test has 3"):
    convert(f"npz:{tmp_path}/a-{{split}}.npz", tmp_path / "out", progress=False)
  assert not (tmp_path / "out").exists()


# mixtures


def marked(n, offset):
  """uint8 images whose every pixel is offset + index, labels index % 3."""
  x = (offset + np.arange(n, dtype=np.uint8))[:, None, None, None] * np.ones((1, 2, 2, 1), np.uint8)
  return x, np.arange(n) % 3


def test_mixture_takes_the_fraction_of_every_batch_epochs_on_the_first():
  first, extra = marked(40, 0), marked(60, 100)
  assert data.extra_count(10, 0.7) == 7 and data.extra_count(10, 0.25) == 2
  steps = data.steps_per_epoch(40, 10, 0.7)
  assert steps == 13
  batches = take(data.mixed_batches(first, extra, 10, extra_fraction=0.7, seed=4), 2 * steps)
  seen_first = []
  for xb, yb in batches:
    ids = xb[:, 0, 0, 0].astype(int)
    assert xb.shape == (10, 2, 2, 1) and xb.dtype == np.uint8
    assert (ids >= 100).sum() == 7  # exactly round(0.7 * 10) extra examples
    np.testing.assert_array_equal(yb, (ids % 100) % 3)
    seen_first.append(ids[ids < 100])
  for epoch in range(2):
    seen = np.concatenate(seen_first[epoch * steps : (epoch + 1) * steps])
    np.testing.assert_array_equal(np.sort(seen), np.sort(data.epoch_permutation(40, 4, epoch)[:39]))
  # The extra examples also come in epochs: the first 8 batches hold 56 distinct ones.
  extra_ids = np.concatenate([xb[:, 0, 0, 0][xb[:, 0, 0, 0] >= 100] for xb, _ in batches[:8]])
  assert len(set(extra_ids.tolist())) == 56
  # Extra rows are spread over the batch, not appended.
  assert len({tuple(np.flatnonzero(xb[:, 0, 0, 0] >= 100)) for xb, _ in batches}) > 1


@pytest.mark.parametrize("start_step", [0, 1, 8, 13, 21])
def test_mixture_is_deterministic_and_resumes(start_step):
  first, extra = marked(40, 0), marked(60, 100)
  make = lambda seed, start=0: data.mixed_batches(
    first, extra, 10, extra_fraction=0.5, seed=seed, start_step=start
  )
  full, again = take(make(1), 24), take(make(1), 24)
  resumed = take(make(1, start_step), 24 - start_step)
  for (xa, ya), (xb, yb) in zip(full, again):
    np.testing.assert_array_equal(xa, xb)
    np.testing.assert_array_equal(ya, yb)
  for (xa, ya), (xb, yb) in zip(full[start_step:], resumed):
    np.testing.assert_array_equal(xa, xb)
    np.testing.assert_array_equal(ya, yb)
  other = take(make(2), 3)
  assert not all(np.array_equal(a[0], b[0]) for a, b in zip(full, other))


def test_mixture_rows_per_process_and_zero_fraction():
  first, extra = marked(40, 0), marked(60, 100)
  whole = take(data.mixed_batches(first, extra, 8, extra_fraction=0.7, seed=3), 5)
  halves = [
    take(
      data.mixed_batches(
        first,
        extra,
        8,
        extra_fraction=0.7,
        seed=3,
        rows=data.process_rows(8, process_index=i, process_count=2),
      ),
      5,
    )
    for i in range(2)
  ]
  for (xb, yb), (x0, y0), (x1, y1) in zip(whole, *halves):
    np.testing.assert_array_equal(np.concatenate([x0, x1]), xb)
    np.testing.assert_array_equal(np.concatenate([y0, y1]), yb)
  plain = take(data.train_batches(*first, 8, seed=3), 6)
  unmixed = take(data.mixed_batches(first, extra, 8, extra_fraction=0.0, seed=3), 6)
  for (xa, ya), (xb, yb) in zip(plain, unmixed):
    np.testing.assert_array_equal(xa, xb)
    np.testing.assert_array_equal(ya, yb)


@pytest.mark.parametrize("fraction", [1.0, -0.1, 1.5, True, "0.5", float("nan")])
def test_mixture_bad_fraction(fraction):
  first, extra = marked(40, 0), marked(60, 100)
  with pytest.raises(InputError, match="extra_fraction"):
    data.mixed_batches(first, extra, 10, extra_fraction=fraction, seed=0)


def test_mixture_of_an_npz_and_generated_records(tmp_path):
  """The generated images' layout (npz of `image` and `label`) and its records as extra."""
  x, y = uint8_npz(tmp_path / "generated.npz", n=30, keys=("image", "label"))
  generated = data.load(f"npz:{tmp_path}/generated.npz", "train")
  np.testing.assert_array_equal(generated.x, x / np.float32(255))
  np.testing.assert_array_equal(generated.y, y)
  out = convert(f"npz:{tmp_path}/generated.npz", tmp_path / "gen", progress=False)
  stored = data.load(f"records:{out}", "train")
  uint8_npz(tmp_path / "real.npz", n=20, seed=1)
  real = data.load(f"npz:{tmp_path}/real.npz", "train")
  from_npz = take(data.mixed_batches(real, generated, 10, extra_fraction=0.7, seed=0), 4)
  from_records = take(data.mixed_batches(real, stored, 10, extra_fraction=0.7, seed=0), 4)
  for (xa, ya), (xb, yb) in zip(from_npz, from_records):
    assert xb.dtype == np.float32  # float first, uint8 extra: the extra rows divided by 255
    np.testing.assert_array_equal(xa, xb)
    np.testing.assert_array_equal(ya, yb)
  with pytest.raises(InputError, match="has 4 classes but the extra one 5"):
    data.mixed_batches(real, data.Dataset(*stored, 5), 10, extra_fraction=0.5, seed=0)
  with pytest.raises(InputError, match=r"extra data set's images are \[2, 2, 1\]"):
    data.mixed_batches(real, marked(60, 0), 10, extra_fraction=0.5, seed=0)


def test_decode_reads_jpeg_and_names_a_bad_record():
  pixels = np.random.default_rng(5).integers(0, 256, (8, 6, 3), dtype=np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="JPEG")
  decoded = records.decode(buffer.getvalue(), "jpeg", (8, 6, 3), "record 0")
  np.testing.assert_array_equal(decoded, np.asarray(Image.open(io.BytesIO(buffer.getvalue()))))
  with pytest.raises(InputError, match="record 0 is a 8x6x3 image, not 8x6x1"):
    records.decode(buffer.getvalue(), "jpeg", (8, 6, 1), "record 0")
  with pytest.raises(InputError, match="cannot decode the png image in record 7"):
    records.decode(b"not an image", "png", (8, 6, 3), "record 7")
  grey = png(pixels[..., 0])
  np.testing.assert_array_equal(
    records.decode(grey, "png", (8, 6, 3), "r"), np.repeat(pixels[..., :1], 3, -1)
  )
  with pytest.raises(InputError, match="r is a 8x6x1 image, not 4x6x1"):
    records.decode(grey, "png", (4, 6, 1), "r")


# --- training from records and from a mixture --------------------------------------


@pytest.fixture(scope="module")
def digits_as_files(tmp_path_factory):
  """The digits as a uint8 .npz, its records: conversion, and a second .npz
  of `image`/`label` arrays (the generated sets' layout) for mixtures."""
  root = tmp_path_factory.mktemp("digits_files")
  arrays = {}
  for split in data.SPLITS:
    d = data.load("digits", split)
    arrays[f"x_{split}"] = np.round(d.x * 255).astype(np.uint8)
    arrays[f"y_{split}"] = d.y
  np.savez(root / "d.npz", **arrays, class_names=np.array([str(i) for i in range(10)]))
  np.savez(root / "gen.npz", image=arrays["x_test"], label=arrays["y_test"])
  convert(f"npz:{root}/d.npz", root / "rec", shard_size=300, progress=False)
  return root


def _train(name, workdir, steps, **overrides):
  from jaxrobust.configs import natural
  from jaxrobust.training import loop

  config = natural.get_config()
  config.update_from_flattened_dict(
    {"model.width": 4, "batch_size": 32, "epochs": 1, "log_every_steps": 4, "data.name": name}
    | {"checkpoint_every_steps": 100}
    | overrides
  )
  state = loop.train(config, workdir, max_steps=steps, progress=False)
  return jax.tree.leaves(jax.device_get(state.params))


def test_training_from_records_equals_training_from_memory(digits_as_files, tmp_path):
  # Same images (uint8 either way), same order: the same parameters, bitwise.
  root = digits_as_files
  in_memory = _train(f"npz:{root}/d.npz", tmp_path / "memory", 8)
  streamed = _train(f"records:{root}/rec", tmp_path / "records", 8)
  assert all(np.array_equal(a, b) for a, b in zip(in_memory, streamed, strict=True))


@pytest.mark.slow  # a minute's equivalence run: .ci/run runs it after the fast suite
def test_a_mixture_resumes_exactly(digits_as_files, tmp_path):
  root = digits_as_files
  mix = {"data.extra": f"npz:{root}/gen.npz", "data.extra_fraction": 0.75}
  whole = _train(f"records:{root}/rec", tmp_path / "whole", 8, **mix)
  _train(f"records:{root}/rec", tmp_path / "split", 4, **mix)
  resumed = _train(f"records:{root}/rec", tmp_path / "split", 8, **mix)
  plain = _train(f"records:{root}/rec", tmp_path / "plain", 8)
  assert all(np.array_equal(a, b) for a, b in zip(whole, resumed, strict=True))
  # The extra data changed what was learnt.
  assert not all(np.array_equal(a, b) for a, b in zip(whole, plain, strict=True))


def test_extra_fraction_without_extra_is_refused(tmp_path):
  with pytest.raises(InputError, match="data.extra_fraction needs data.extra"):
    _train("digits", tmp_path / "run", 2, **{"data.extra_fraction": 0.5})
  assert not (tmp_path / "run").exists()
