"""The memory row: the memory one PGD call needs at 10 and at 100 steps, each side
measured in a process of its own (`benchmarks/peak_memory.py`)."""

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.bench import Bench
from benchmarks.harness import Row


def pgd_memory(b: Bench) -> Row:
  """The memory one PGD call needs at 10 and at 100 steps, each side in a
  process of its own (`benchmarks/peak_memory.py`: the peak resident set
  above the one before the call, and XLA's temporary buffers), batch
  `--batch-size`, on a fresh `--model`. The loop must not grow with the steps."""
  probe = Path(__file__).resolve().parents[1] / "peak_memory.py"
  runs = {}
  for side in ("jaxrobust", "torchattacks"):
    for steps in (10, 100):
      out = subprocess.run(
        [sys.executable, str(probe), f"--side={side}", f"--steps={steps}"]
        + [f"--model={b.args.model}", f"--batch={b.batch}"],
        check=True,
        capture_output=True,
        text=True,
      ).stdout
      runs[side, steps] = json.loads(out.strip().splitlines()[-1])
  peak = lambda side, steps: runs[side, steps]["second_call_peak_above_mib"]
  b.notes.append(
    "pgd_memory: peak resident set above the process's before one PGD call (MiB, "
    f"batch {b.batch}, {b.args.model}): jaxrobust PGD-10 {peak('jaxrobust', 10):.0f}, "
    f"PGD-100 {peak('jaxrobust', 100):.0f} (XLA temporaries "
    f"{runs['jaxrobust', 10]['xla_temp_mib']:.1f} and "
    f"{runs['jaxrobust', 100]['xla_temp_mib']:.1f}); torchattacks PGD-10 "
    f"{peak('torchattacks', 10):.0f}, PGD-100 {peak('torchattacks', 100):.0f}."
  )
  return {
    "row": "pgd_memory",
    "label": f"memory of one PGD call, 100 steps against 10 (batch {b.batch})",
    "kind": "memory",
    "unit": "MiB",
    "runs": [runs[k] for k in sorted(runs)],
    "jaxrobust": peak("jaxrobust", 100),
    "pytorch": peak("torchattacks", 100),
    "growth": {s: peak(s, 100) / peak(s, 10) for s in ("jaxrobust", "torchattacks")},
  }
