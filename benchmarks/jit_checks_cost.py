"""The cost of checking input values under `jax.jit` (`checks.on_device`).

  python benchmarks/jit_checks_cost.py                 # PGD-10 L-inf, plain Flax CNN, batch 128
  python benchmarks/jit_checks_cost.py --steps 1 --repeats 15

An attack traced in your own jitted function checks its images, labels and
eps when the program runs, by one host callback of a few reductions; the
library's own programs trace their attacks inside `checks.trusted()` and
carry none. This times both forms of the same jitted attack, alternately in
one process (a shared machine's load falls on both), and prints the median
seconds of each, their ratio, and the compile seconds apart.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))  # `python benchmarks/jit_checks_cost.py` from a clone

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxrobust import attacks, checks


class PlainCNN(nn.Module):
  """Plain Flax layers, not tuned for anything: two 3x3 convolutions, a dense layer."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.relu(nn.Conv(32, (3, 3))(x))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Conv(64, (3, 3))(x))
    x = nn.max_pool(x, (2, 2), (2, 2))
    return nn.Dense(10)(x.reshape(len(x), -1))


def main() -> None:
  """Times PGD with and without the input checks; prints both."""
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--steps", type=int, default=10, help="PGD steps")
  parser.add_argument("--repeats", type=int, default=9)
  args = parser.parse_args()
  model = PlainCNN()
  x = jax.random.uniform(jax.random.key(0), (args.batch, 32, 32, 3))
  y = jnp.arange(args.batch) % 10
  variables = model.init(jax.random.key(1), x[:1])
  attack = attacks.pgd(norm="linf", eps=8 / 255, steps=args.steps)

  def run(variables, x, y, key):
    return attack(lambda xb: model.apply(variables, xb), x, y, key)

  def run_trusted(variables, x, y, key):
    with checks.trusted():
      return run(variables, x, y, key)

  programs = {"checked": jax.jit(run), "unchecked": jax.jit(run_trusted)}
  compile_seconds = {}
  for name, program in programs.items():
    began = time.perf_counter()
    jax.block_until_ready(program(variables, x, y, jax.random.key(0)))
    compile_seconds[name] = time.perf_counter() - began
  times: dict[str, list[float]] = {name: [] for name in programs}
  for r in range(args.repeats):
    for name, program in programs.items():
      began = time.perf_counter()
      jax.block_until_ready(program(variables, x, y, jax.random.key(r)))
      times[name].append(time.perf_counter() - began)
  median = {name: statistics.median(t) for name, t in times.items()}
  print(f"PGD-{args.steps} L-inf, batch {args.batch}, 32x32x3, {args.repeats} alternated runs")
  print("| form | median s | first call s (compile) |")
  print("| --- | ---: | ---: |")
  for name in programs:
    print(f"| {name} | {median[name]:.4f} | {compile_seconds[name]:.2f} |")
  print(f"checked / unchecked: {median['checked'] / median['unchecked']:.3f}")


if __name__ == "__main__":
  main()
