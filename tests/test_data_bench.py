"""The data benchmark's own checks (benchmarks/data_pipeline.py: the benchmark itself
runs for minutes and is run by hand, docs/data.md reports it)."""

import json
import statistics
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks import data_memory, data_pipeline, data_throughput
from jaxrobust import data


def test_generated_records_and_npz_hold_the_same_images_written_a_chunk_at_a_time(
  tmp_path: Path,
) -> None:
  count = 2 * data_memory.CHUNK + 300  # two whole chunks and a part of one
  records = data_memory.write_records(tmp_path / "records", count, 40, shard_size=900)
  name = data_memory.write_npz_pair(tmp_path / "npz", count, 40)
  stored, memory = data.load(f"records:{records}", "train"), data.load(name, "train")
  metadata = json.loads((records / "metadata.json").read_text())
  assert metadata["splits"]["train"]["records"] == [900, 900, 500]
  assert stored.x.shape == memory.x.shape == (count, 32, 32, 3)
  assert stored.x.dtype == np.uint8 and memory.x.dtype == np.float32
  np.testing.assert_array_equal(np.asarray(stored.x) / np.float32(255), memory.x)
  np.testing.assert_array_equal(stored.y, memory.y)
  # The chunks are a function of (seed, index): the third chunk's first image.
  third, _ = data_memory.random_chunk(0, 2)
  np.testing.assert_array_equal(stored.x[2 * data_memory.CHUNK], third[0])
  assert len(data.load(f"records:{records}", "test").y) == 40
  # The histogram the converter's writer stored counts every pixel of the split.
  histogram = np.asarray(metadata["splits"]["train"]["histogram"])
  pixels = np.asarray(stored.x).reshape(-1, 3)
  np.testing.assert_array_equal(histogram[1], np.bincount(pixels[:, 1], minlength=256))


def test_time_in_turns_rotates_the_sides_and_divides_images_by_the_median() -> None:
  calls = []

  def side(name: str, seconds: float) -> data_throughput.Side:
    def run() -> None:
      calls.append(name)
      time.sleep(seconds)

    return data_throughput.Side(10, run)

  timed = data_throughput.time_in_turns({"a": side("a", 0.001), "b": side("b", 0.02)}, 3)
  assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then rotating
  for name in "ab":
    assert len(timed[name]["seconds"]) == 3
    expected = 10 / statistics.median(timed[name]["seconds"])
    assert timed[name]["images_per_second"] == pytest.approx(expected)
  assert timed["a"]["images_per_second"] > timed["b"]["images_per_second"]


@pytest.mark.slow  # four train.py processes and two compiled PGD-7 steps: minutes on 2 cores
def test_the_benchmark_at_a_tiny_size_reports_memory_and_throughput(
  tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
  results = data_pipeline.main(
    ["--sizes=200,2000", "--npz-sizes=200,2000", "--test-size=50", "--steps=2"]
    + ["--workers=0,1", "--repeats=2", "--cifar-batch=32", "--per-run=2"]
    + ["--imagenet-images=32", "--jpeg-size=48,64", "--image-size=32"]
    + ["--imagenet-model=small_cnn", "--imagenet-batch=8", "--imagenet-repeats=2"]
    + [f"--scratch={tmp_path / 'scratch'}", f"--json={tmp_path / 'out.json'}"]
  )
  memory = results["memory"]
  for kind in ("records", "npz"):
    peaks = [run["peak_rss_mib"] for run in memory[kind]]
    assert [run["images"] for run in memory[kind]] == [200, 2000]
    assert all(peak > 100 for peak in peaks)  # a Python process with JAX
    assert all(run["steps"] >= 2 for run in memory[kind])
    assert memory[f"{kind}_ratio"] == peaks[1] / peaks[0]
    grown = (peaks[1] - peaks[0]) * 2**20 / 1800
    assert memory[f"{kind}_bytes_per_image"] == pytest.approx(grown)
  assert not (tmp_path / "scratch" / "memory").exists()  # the data sets are deleted
  for part in ("cifar", "imagenet"):
    r = results[part]
    step = r["step"]["images_per_second"]
    assert step > 0 and len(r["step"]["seconds"]) == 2
    for k in (0, 1):
      assert r["ratio"][k] == r["pipeline"][k]["images_per_second"] / step
  assert results["imagenet"]["image_size"] == [32, 32, 3]
  report = capsys.readouterr().out
  assert "| records: | 2,000 |" in report and "PGD-7 training step" in report
  assert json.loads((tmp_path / "out.json").read_text())["memory"]["records_ratio"] > 0
