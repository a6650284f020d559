"""The memory one PGD-N attack call needs, jaxrobust or torchattacks, in a process of its own.

  python benchmarks/peak_memory.py --side jaxrobust --steps 100 --model seed_cnn --batch 256

`benchmarks/run.py --rows pgd_memory` runs it for both sides at 10 and 100
steps. The model is freshly initialised (memory does not depend on the
weights), the images uniform in [0, 1]; PyTorch gets the same weights
(`jaxrobust.interop.to_torch`). A thread reads the resident set size
(/proc/self/statm) every millisecond; the line printed (JSON, MiB) gives
the resident set before the attack and its peak above that during the first
call (jaxrobust: tracing and compiling included) and during a second call,
and for jaxrobust XLA's own count of the compiled program's temporary
buffers. A loop whose memory grows with its steps shows in all three.
"""

import argparse
import json
import os
import resource
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

MIB = 2**20
PAGE = os.sysconf("SC_PAGE_SIZE")


def resident_bytes() -> int:
  """This process's resident set size in bytes."""
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * PAGE


class PeakResident:
  """The largest resident set size seen while the `with` block runs."""

  def __enter__(self) -> "PeakResident":
    self.peak, self._stop = resident_bytes(), threading.Event()
    self._thread = threading.Thread(target=self._watch, daemon=True)
    self._thread.start()
    return self

  def _watch(self) -> None:
    while not self._stop.is_set():
      self.peak = max(self.peak, resident_bytes())
      time.sleep(0.001)

  def __exit__(self, *exc: object) -> None:
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, resident_bytes())


def main(argv: list[str] | None = None) -> dict:
  """Measures one side's PGD call; prints the measurement as a JSON line and returns it."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--side", choices=("jaxrobust", "torchattacks"), required=True)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--model", default="seed_cnn")
  p.add_argument("--batch", type=int, default=256)
  args = p.parse_args(argv)

  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  import jaxrobust as jr  # pylint: disable=g-import-not-at-top

  eps, alpha = 8 / 255, 2 / 255
  model = jr.models.create(args.model, num_classes=10, mean=(0.5,) * 3, std=(0.25,) * 3)
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(args.batch, 32, 32, 3)).astype(np.float32)
  y = rng.integers(0, 10, args.batch)
  variables = jax.device_get(model.init(jax.random.key(0), x[:1]))
  result = {"side": args.side, "steps": args.steps, "model": args.model, "batch": args.batch}

  if args.side == "jaxrobust":
    attack = jr.attacks.pgd(norm="linf", eps=eps, step_size=alpha, steps=args.steps)
    keys = jax.random.split(jax.random.key(0), args.batch)
    program = jax.jit(lambda v, x, y, k: attack(lambda z: model.apply(v, z, train=False), x, y, k))
    run = lambda: program(variables, x, y, keys).block_until_ready()
  else:
    import torch  # pylint: disable=g-import-not-at-top
    import torchattacks  # pylint: disable=g-import-not-at-top

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    net = jr.interop.to_torch(model, variables, (32, 32))
    for param in net.parameters():
      param.requires_grad_(False)
    pgd = torchattacks.PGD(net, eps=eps, alpha=alpha, steps=args.steps, random_start=True)
    x_t, y_t = jr.interop.nhwc_to_nchw(x), torch.from_numpy(y.astype(np.int64))
    run = lambda: pgd(x_t, y_t)

  before = resident_bytes()
  with PeakResident() as first:
    run()
  with PeakResident() as second:
    run()
  result.update(
    resident_before_mib=before / MIB,
    first_call_peak_above_mib=(first.peak - before) / MIB,
    second_call_peak_above_mib=(second.peak - before) / MIB,
    process_peak_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
  )
  if args.side == "jaxrobust":
    analysis = program.lower(variables, x, y, keys).compile().memory_analysis()
    assert analysis is not None, "XLA reported no memory analysis"
    result["xla_temp_mib"] = analysis.temp_size_in_bytes / MIB
  print(json.dumps(result), flush=True)
  return result


if __name__ == "__main__":
  main()
