"""Memory and throughput of training from `records:`: flat memory, and a pipeline faster than the step.

  python benchmarks/data_pipeline.py --json runs/data_pipeline.json   # as docs/data.md reports
  python benchmarks/data_pipeline.py --sizes 2000,20000 --npz-sizes 200,2000 --repeats 3

Memory (`benchmarks/data_memory.py`): `train.py` (natural training in the
CIFAR-10 setting, seed_cnn, batch 128) on `records:` data sets of N and 10N
generated uint8 CIFAR-sized images, and on `npz:` ones (read whole into
memory as float32), each run a process of its own stopped after `--steps`
steps; its peak resident set size, and the ratio of the largest set's to the
smallest's. The data sets are written in chunks and deleted after their run.

Throughput (`benchmarks/data_throughput.py`): images/s of the input pipeline
alone (`data.train_batches` with 0 and with K grain workers, each batch put
on the training mesh) against images/s of the PGD-7 adversarial-training
step, timed in turns in one process: the CIFAR-10 setting (`pgd_at:cifar10`,
seed_cnn, 32x32, on `records:` of generated images) and the ImageNet layout
(`pgd_at:imagenet` with PGD-7, on the records conversion of a generated
ILSVRC folder of random JPEGs of `--jpeg-size`, decoded and cropped to
`--image-size` in the pipeline, with `--imagenet-model`).
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))  # `python benchmarks/data_pipeline.py` from a clone

from jaxrobust import parallel  # noqa: E402

MIB = 2**20


def _ints(text: str) -> list[int]:
  return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """The command line."""
  p = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--sizes", type=_ints, default=[50_000, 500_000], help="records: sizes")
  p.add_argument("--npz-sizes", type=_ints, default=[5_000, 50_000], help="npz: sizes")
  p.add_argument("--test-size", type=int, default=1000, help="test images of every set")
  p.add_argument("--steps", type=int, default=20, help="training steps of each train.py run")
  p.add_argument("--workers", type=_ints, default=[0, 2], help="grain worker counts")
  p.add_argument("--repeats", type=int, default=5, help="timed runs per side")
  p.add_argument("--cifar-batch", type=int, default=128)
  p.add_argument(
    "--per-run", type=int, default=40, help="batches per timed pipeline run (ImageNet: a quarter)"
  )
  p.add_argument("--imagenet-images", type=int, default=512, help="generated JPEGs (train)")
  p.add_argument("--jpeg-size", type=_ints, default=[375, 500], help="their height,width")
  p.add_argument("--image-size", type=int, default=224, help="the crops' side")
  p.add_argument("--imagenet-model", default="resnet50")
  p.add_argument("--imagenet-batch", type=int, default=8)
  p.add_argument("--imagenet-repeats", type=int, default=3, help="timed runs per side")
  p.add_argument("--skip", default="", help="comma-separated parts to skip: memory,cifar,imagenet")
  p.add_argument(
    "--scratch", default=None, help="where to write the data sets (default: a temp dir)"
  )
  p.add_argument("--json", default=None, help="also write the results to this JSON file")
  return p.parse_args(argv)


def make_imagenet(root: Path, images: int, size: tuple[int, int], classes: int = 8) -> Path:
  """An ILSVRC-layout folder of random JPEGs (quality 90): `images` in train/, a few in val/.

  Args:
    root: the folder (created).
    images: training images, spread over `classes` wnid folders.
    size: (height, width) of every image.
    classes: class folders.

  Returns:
    `root`.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  for split, count in (("train", images), ("val", classes)):
    for i in range(count):
      folder = root / split / f"n{i % classes:08d}"
      folder.mkdir(parents=True, exist_ok=True)
      pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
      Image.fromarray(pixels).save(folder / f"{i:06d}.JPEG", quality=90)
  return root


def _throughput_part(args: argparse.Namespace, scratch: Path, part: str) -> dict[str, Any]:
  """The throughput of the CIFAR-10 setting or the ImageNet layout."""
  from benchmarks import data_memory, data_throughput  # pylint: disable=g-import-not-at-top
  from jaxrobust.data import convert  # pylint: disable=g-import-not-at-top

  mesh = parallel.mesh()
  if part == "cifar":
    records = data_memory.write_records(scratch / "cifar", args.sizes[0], args.test_size)
    config = data_throughput.cifar_config(records, args.cifar_batch)
  else:
    folder = make_imagenet(scratch / "ilsvrc", args.imagenet_images, tuple(args.jpeg_size))
    records = convert.convert(f"imagenet:{folder}", scratch / "imagenet", progress=False)
    config = data_throughput.imagenet_config(
      records, args.imagenet_batch, args.image_size, args.imagenet_model
    )
  per_run = args.per_run if part == "cifar" else max(1, args.per_run // 4)
  repeats = args.repeats if part == "cifar" else args.imagenet_repeats
  setting = data_throughput.Setting(config, mesh)
  result = data_throughput.throughput(setting, args.workers, per_run, repeats)
  result.update(model=config.model.name, image_size=list(setting.train_set.x.shape[1:]))
  result["images"] = len(setting.train_set.y)
  for written in (part, "ilsvrc"):
    shutil.rmtree(scratch / written, ignore_errors=True)
  return result


def run(args: argparse.Namespace) -> dict[str, Any]:
  """Runs the parts of the benchmark `args` asks for; returns the results."""
  from benchmarks import data_memory  # pylint: disable=g-import-not-at-top

  skip = {s.strip() for s in args.skip.split(",") if s.strip()}
  made = args.scratch is None
  scratch = Path(args.scratch or tempfile.mkdtemp(prefix="data_pipeline-")).absolute()
  results: dict[str, Any] = {
    "command": " ".join(["python benchmarks/data_pipeline.py", *args.argv]),
    "machine": machine(),
  }
  try:
    if "memory" not in skip:
      print("memory: train.py's peak resident set", flush=True)
      results["memory"] = data_memory.memory_runs(
        scratch / "memory", args.sizes, args.npz_sizes, args.test_size, args.steps
      )
    for part in ("cifar", "imagenet"):
      if part not in skip:
        print(f"throughput: {part} ...", flush=True)
        results[part] = _throughput_part(args, scratch, part)
  finally:
    shutil.rmtree(scratch if made else scratch / "memory", ignore_errors=True)
  results["machine"]["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
  return results


def machine() -> dict[str, Any]:
  """The machine: CPU, cores, memory, load."""
  from benchmarks.harness import cpu_name, memory_gib  # pylint: disable=g-import-not-at-top

  return {
    "cpu": cpu_name(),
    "cores": len(os.sched_getaffinity(0)),
    "memory_gib": memory_gib(),
    "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
  }


def format_report(results: dict[str, Any]) -> str:
  """The results as the printed report: the machine, the memory table, the throughput table."""
  m = results["machine"]
  lines = [
    f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; load average "
    f"{m['load_average_at_start']} at start, {m.get('load_average_at_end')} at end",
  ]
  if "memory" in results:
    mem = results["memory"]
    lines += [
      "",
      "| train.py on | images | on disk (MiB) | steps | peak resident (MiB) |",
      "| --- | ---: | ---: | ---: | ---: |",
    ]
    for kind in ("records", "npz"):
      for r in mem[kind]:
        lines.append(
          f"| {kind}: | {r['images']:,} | {r['disk_mib']:,.0f} | {r['steps']} "
          f"| {r['peak_rss_mib']:,.0f} |"
        )
    for kind in ("records", "npz"):
      if f"{kind}_ratio" in mem:
        runs = mem[kind]
        lines.append(
          f"{kind}: peak at {runs[-1]['images']:,} images / at {runs[0]['images']:,}: "
          f"{mem[f'{kind}_ratio']:.3f}; the peak grew by "
          f"{mem[f'{kind}_bytes_per_image']:,.0f} bytes per image added"
        )
  for part, title in (("cifar", "CIFAR-10 setting"), ("imagenet", "ImageNet layout")):
    if part in results:
      lines += ["", *_throughput_lines(results[part], title)]
  return "\n".join(lines)


def _throughput_lines(r: dict[str, Any], title: str) -> list[str]:
  """The throughput table of one setting."""
  shape = "x".join(map(str, r["image_size"]))
  lines = [
    f"{title}: {r['model']}, {shape} images, batch {r['batch']}, {r['images']:,} training "
    f"images; median of {len(r['step']['seconds'])} timed runs per side, in turns",
    "",
    "| side | images/s | pipeline / step |",
    "| --- | ---: | ---: |",
  ]
  for k, timing in r["pipeline"].items():
    lines.append(
      f"| pipeline, {k} grain workers | {timing['images_per_second']:,.1f} "
      f"| {r['ratio'][k]:,.1f}x |"
    )
  lines.append(f"| PGD-7 training step | {r['step']['images_per_second']:,.1f} | |")
  return lines


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """Runs the benchmark, prints its report and returns its results."""
  args = parse_args(argv)
  args.argv = sys.argv[1:] if argv is None else list(argv)
  parallel.use_host_devices()  # as train.py: one XLA:CPU device per core
  start = time.perf_counter()
  results = run(args)
  results["seconds"] = time.perf_counter() - start
  print()
  print(format_report(results))
  if args.json:
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(f"\nwrote {args.json}")
  return results


if __name__ == "__main__":
  main()
