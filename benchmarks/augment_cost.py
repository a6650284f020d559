"""The cost of on-device augmentation in a PGD-AT training step.

  python benchmarks/augment_cost.py                  # seed_cnn, 32x32x3, batch 128, PGD-7
  python benchmarks/augment_cost.py --model small_cnn --repeats 9

Times the jitted data-parallel step (`training.make_train_step`) with and
without random crop (4 pixels, zero padding) and flip, alternately in one
process so that a shared machine's load falls on both, and prints the median
seconds per step of each and their ratio.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))  # `python benchmarks/augment_cost.py` from a clone

from jaxrobust import parallel  # noqa: E402

parallel.use_host_devices()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxrobust import attacks, models  # noqa: E402
from jaxrobust.training import augment
from jaxrobust.training import step as training


def main() -> None:
  """Times the training step with and without augmentation; prints both."""
  parser = argparse.ArgumentParser()
  parser.add_argument("--model", default="seed_cnn")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--steps", type=int, default=7, help="PGD steps")
  parser.add_argument("--repeats", type=int, default=7)
  args = parser.parse_args()
  mesh = parallel.mesh()
  model = models.create(
    args.model, num_classes=10, mean=(0.5,) * 3, std=(0.25,) * 3, axis_name=parallel.BATCH_AXIS
  )
  tx = training.make_optimizer(dict(name="sgd", learning_rate=0.01), 1000)
  x = jax.random.uniform(jax.random.key(0), (args.batch, 32, 32, 3))
  y = jnp.arange(args.batch) % 10
  batch = jax.device_put((x, y), parallel.batch_sharding(mesh))
  attack = attacks.pgd(norm="linf", eps=8 / 255, steps=args.steps)
  steps = {
    name: training.make_train_step(model, tx, attack, mesh, augment=fn)
    for name, fn in (("plain", None), ("crop_flip", augment.create("crop_flip")))
  }
  states = {}
  for name, step in steps.items():  # compile and warm up
    state = jax.device_put(
      training.init_state(model, tx, (32, 32, 3), jax.random.key(0)), parallel.replicated(mesh)
    )
    states[name] = jax.block_until_ready(step(state, *batch, jax.random.key(1))[0])
  times: dict[str, list[float]] = {name: [] for name in steps}
  for _ in range(args.repeats):
    for name, step in steps.items():
      start = time.perf_counter()
      states[name] = jax.block_until_ready(step(states[name], *batch, jax.random.key(1))[0])
      times[name].append(time.perf_counter() - start)
  median = {name: statistics.median(t) for name, t in times.items()}
  print(
    f"{args.model}, batch {args.batch}, PGD-{args.steps}, {mesh.devices.size} devices, "
    f"median of {args.repeats}:"
  )
  for name, seconds in median.items():
    print(f"  {name:10s} {seconds * 1000:8.1f} ms/step")
  print(f"  ratio crop_flip / plain: {median['crop_flip'] / median['plain']:.3f}")


if __name__ == "__main__":
  main()
