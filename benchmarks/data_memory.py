"""Peak resident memory of `train.py` on a generated data set of N and of 10N images.

`benchmarks/data_pipeline.py` runs it. The images are random uint8 CIFAR-sized
ones ([32, 32, 3], 10 classes), generated in chunks of `CHUNK` and written
straight to records shards through the converter's writer
(`jaxrobust.data.convert.write_split`), or to an uncompressed `.npz`, so that
no more than a chunk (a shard, for records) is ever in memory. Each run is a
`train.py` process of its own that trains a fixed number of steps, is then
stopped with SIGTERM (it saves a checkpoint and exits with status 143, as a
pre-empted run does), and whose peak resident set size the kernel reports to
its parent (`os.wait4`'s `ru_maxrss`).
"""

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxrobust.data.convert import SplitReader, write_split
from jaxrobust.data.records import FORMAT, METADATA, VERSION

REPO = Path(__file__).resolve().parents[1]
SHAPE = (32, 32, 3)
CLASSES = 10
CHUNK = 1000  # images generated at a time


def random_chunk(seed: int, index: int) -> tuple[np.ndarray, np.ndarray]:
  """Chunk `index` of the generated images: `CHUNK` uint8 images and their labels.

  Args:
    seed: the data set's seed.
    index: the chunk's index.

  Returns:
    `(images [CHUNK, 32, 32, 3], labels [CHUNK])`, a function of `(seed, index)`.
  """
  rng = np.random.default_rng([seed, index])
  return rng.integers(0, 256, (CHUNK, *SHAPE), np.uint8), rng.integers(0, CLASSES, CHUNK)


def random_chunks(count: int, seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """The first `count` generated images and labels, a chunk at a time.

  Args:
    count: how many images.
    seed: the data set's seed.

  Returns:
    An iterator of `(images, labels)` chunks; together, `count` of each.
  """
  for index in range(-(-count // CHUNK)):
    images, labels = random_chunk(seed, index)
    keep = min(CHUNK, count - index * CHUNK)
    yield images[:keep], labels[:keep]


class RandomSplit(SplitReader):
  """`count` generated images as a converter's split, read a chunk at a time."""

  def __init__(self, count: int, seed: int) -> None:
    self.count, self.seed = count, seed
    self.shape, self.num_classes, self.class_names = SHAPE, CLASSES, None

  def __iter__(self) -> Iterator[tuple[np.ndarray, int]]:
    for images, labels in random_chunks(self.count, self.seed):
      yield from zip(images, labels.tolist())


def write_records(directory: Path, train: int, test: int, shard_size: int = 10_000) -> Path:
  """A `records:` directory of `train` and `test` generated images (raw encoding).

  Args:
    directory: where to write it (created).
    train: training images.
    test: test images.
    shard_size: images per shard.

  Returns:
    `directory`.
  """
  directory.mkdir(parents=True)
  splits = {}
  for split, count, seed in (("train", train, 0), ("test", test, 1)):
    splits[split] = write_split(
      RandomSplit(count, seed),
      directory,
      split,
      shard_size=shard_size,
      encoding="raw",
      progress=False,
    )
  metadata = {
    "format": FORMAT,
    "version": VERSION,
    "source": f"random uint8 images (benchmarks/data_memory.py), {train} + {test}",
    "encoding": "raw",
    "shape": list(SHAPE),
    "classes": CLASSES,
    "class_names": None,
    "splits": splits,
  }
  (directory / METADATA).write_text(json.dumps(metadata) + "\n")
  return directory


def write_npz(path: Path, count: int, seed: int) -> Path:
  """An uncompressed `.npz` of arrays `x` (uint8) and `y` holding `count` generated images.

  The images are those of `write_records` with the same seed, streamed into
  the archive a chunk at a time.

  Args:
    path: the file to write.
    count: how many images.
    seed: the data set's seed.

  Returns:
    `path`.
  """
  labels = np.empty(count, np.int64)
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
    with archive.open("x.npy", "w", force_zip64=True) as f:
      header = {"descr": "|u1", "fortran_order": False, "shape": (count, *SHAPE)}
      np.lib.format.write_array_header_1_0(f, header)
      done = 0
      for images, chunk_labels in random_chunks(count, seed):
        f.write(images.tobytes())
        labels[done : done + len(chunk_labels)] = chunk_labels
        done += len(chunk_labels)
    with archive.open("y.npy", "w") as f:
      np.lib.format.write_array(f, labels)
  return path


def write_npz_pair(directory: Path, train: int, test: int) -> str:
  """`npz:` files of `train` and `test` generated images; returns the data set's name."""
  directory.mkdir(parents=True)
  write_npz(directory / "data-train.npz", train, 0)
  write_npz(directory / "data-test.npz", test, 1)
  return f"npz:{directory}/data-{{split}}.npz"


def _logged_step(metrics: Path) -> int:
  """The last step `metrics.jsonl` logged (0: none yet)."""
  try:
    lines = metrics.read_text().splitlines()
  except OSError:
    return 0
  steps = [json.loads(line)["step"] for line in lines if line.endswith("}")]
  return max(steps, default=0)


def train_peak_memory(
  data_name: str, workdir: Path, steps: int, flags: Sequence[str] = (), timeout: float = 600
) -> dict[str, Any]:
  """Runs `train.py` on `data_name` for `steps` steps, then SIGTERM; its peak memory.

  The run uses the CIFAR-10 setting's natural training (`--config
  natural:cifar10`: seed_cnn, batch 128, crop and flip on the device) with
  the data set replaced by `data_name`.

  Args:
    data_name: the data set (`--config.data.name`).
    workdir: the run's directory (must not exist).
    steps: the training steps after which the run is stopped.
    flags: more `train.py` flags.
    timeout: seconds after which the run is killed and this raises.

  Returns:
    `{"data", "steps", "peak_rss_mib", "seconds"}`: the last logged step,
    the process's peak resident set size (MiB) and its wall-clock seconds.
  """
  command = [
    sys.executable,
    str(REPO / "train.py"),
    "--config=natural:cifar10",
    f"--workdir={workdir}",
    f"--config.data.name={data_name}",
    "--config.log_every_steps=1",
    "--config.checkpoint_every_steps=1000000",
    "--progress=false",
    *flags,
  ]
  log = workdir.with_suffix(".log")
  start = time.perf_counter()
  with open(log, "w") as out:
    child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
  stopped = False
  while True:
    pid, status, usage = os.wait4(child.pid, os.WNOHANG)
    if pid:
      break
    if not stopped and _logged_step(workdir / "metrics.jsonl") >= steps:
      child.send_signal(signal.SIGTERM)
      stopped = True
    if time.perf_counter() - start > timeout:
      child.kill()
      os.wait4(child.pid, 0)
      raise RuntimeError(f"train.py on {data_name} ran past {timeout:.0f} s; see {log}")
    time.sleep(0.05)
  child.returncode = os.waitstatus_to_exitcode(status)
  if child.returncode != 128 + signal.SIGTERM:
    raise RuntimeError(
      f"train.py on {data_name} exited with status {child.returncode}, not 143 (stopped by "
      f"SIGTERM after step {steps}):\n{log.read_text()[-3000:]}"
    )
  return {
    "data": data_name,
    "steps": _logged_step(workdir / "metrics.jsonl"),
    "peak_rss_mib": usage.ru_maxrss / 1024,  # KiB on Linux
    "seconds": time.perf_counter() - start,
  }


def memory_runs(
  scratch: Path, sizes: Sequence[int], npz_sizes: Sequence[int], test: int, steps: int
) -> dict[str, Any]:
  """`train.py`'s peak memory on `records:` of each of `sizes` and on `npz:` of each of
  `npz_sizes` generated images; each data set is deleted after its run.

  Args:
    scratch: a directory for the data sets and runs (created).
    sizes: training-set sizes for `records:`, the smallest first.
    npz_sizes: training-set sizes for `npz:` (read whole into memory as float32).
    test: test-set size of every data set.
    steps: training steps per run.

  Returns:
    `{"records": [run, ...], "npz": [run, ...], "records_ratio", "npz_ratio",
    "records_bytes_per_image", "npz_bytes_per_image"}`: each run
    `train_peak_memory`'s, with `images` and `disk_mib` (the data set's size
    on disk); a ratio is the largest set's peak over the smallest's, and the
    bytes per image the peak's growth between them over the images added.
  """
  import shutil  # pylint: disable=g-import-not-at-top

  scratch.mkdir(parents=True, exist_ok=True)
  out: dict[str, Any] = {"records": [], "npz": []}
  for kind, counts in (("records", sizes), ("npz", npz_sizes)):
    for count in counts:
      where = scratch / f"{kind}-{count}"
      if kind == "records":
        name = f"records:{write_records(where, count, test)}"
      else:
        name = write_npz_pair(where, count, test)
      disk = sum(f.stat().st_size for f in where.iterdir()) / 2**20
      try:
        run = train_peak_memory(name, scratch / f"run-{kind}-{count}", steps)
      finally:
        shutil.rmtree(where, ignore_errors=True)
        shutil.rmtree(scratch / f"run-{kind}-{count}", ignore_errors=True)
      out[kind].append({"images": count, "disk_mib": disk, **run})
      print(
        f"  {kind} {count:,} images ({disk:,.0f} MiB on disk): train.py peak "
        f"{run['peak_rss_mib']:,.0f} MiB",
        flush=True,
      )
    runs = out[kind]
    if len(runs) > 1:
      out[f"{kind}_ratio"] = runs[-1]["peak_rss_mib"] / runs[0]["peak_rss_mib"]
      grown = (runs[-1]["peak_rss_mib"] - runs[0]["peak_rss_mib"]) * 2**20
      out[f"{kind}_bytes_per_image"] = grown / (runs[-1]["images"] - runs[0]["images"])
  return out
