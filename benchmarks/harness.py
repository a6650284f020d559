"""The benchmark's harness: timing both sides alternately, medians, ratios, rows, the table.

Every row is measured the same way (`time_alternately`): one warm-up run per
side, then `repeats` timed runs of each, alternating which goes first, with a
sample of the matrix-product ceiling (`MatmulCeiling`) after every pair, so
that a shared machine's load falls on both sides. A row (`make_row`) holds
the medians' throughputs, their ratio, and jaxrobust's compile time (its
warm-up run minus its median run) apart from them.
"""

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from jaxrobust import parallel

LINF_EPS, L2_EPS = 8 / 255, 0.5
SIGMA = 0.25

Row = dict[str, Any]


def median(values: Sequence[float]) -> float:
  """The median of `values`, NaN when there are none."""
  return statistics.median(values) if values else float("nan")


class MatmulCeiling:
  """The single-precision matrix-product throughput the machine reaches now.

  One sample is the best of a `jnp.dot` of two n x n matrices on one device
  and the same product with its rows split over every device (XLA:CPU may
  use the cores better either way), in FLOP/s (2 n^3 per product).
  """

  def __init__(self, jax: Any, jnp: Any, mesh: Any, n: int = 2048) -> None:
    self.flops = 2 * n**3
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    self.dot = jax.jit(jnp.dot)
    self.pairs = [
      (jax.device_put(a, jax.devices()[0]), jax.device_put(b, jax.devices()[0])),
      (
        jax.device_put(a, parallel.batch_sharding(mesh)),
        jax.device_put(b, parallel.replicated(mesh)),
      ),
    ]
    for pair in self.pairs:
      self.dot(*pair).block_until_ready()
      self.dot(*pair).block_until_ready()

  def sample(self) -> float:
    """One sample of the ceiling, in FLOP/s."""
    best = 0.0
    for pair in self.pairs:
      start = time.perf_counter()
      self.dot(*pair).block_until_ready()
      best = max(best, self.flops / (time.perf_counter() - start))
    return best


def torch_synchronize() -> None:
  """Waits for queued CUDA work (PyTorch runs asynchronously on a GPU)."""
  import torch  # pylint: disable=g-import-not-at-top

  if torch.cuda.is_available():
    torch.cuda.synchronize()


def time_alternately(
  jax_run: Callable[[int], Any],
  torch_run: Callable[[int], Any],
  repeats: int,
  ceiling: MatmulCeiling,
) -> tuple[list[float], list[float], list[float], list[Any], list[Any], float]:
  """Warm-up, then `repeats` timed runs of each side, alternating which goes first.

  Args:
    jax_run: `jax_run(i)` runs on input batch i and returns its outputs,
      blocked until ready.
    torch_run: the same for PyTorch (synchronised here).
    repeats: timed runs per side; run 0 is the warm-up (compilation for
      jaxrobust), excluded from the times.
    ceiling: sampled once after every pair of timed runs.

  Returns:
    (jax seconds, torch seconds, ceiling samples, jax outputs, torch outputs,
    jaxrobust's compile seconds: its warm-up run minus its median run).
  """

  def synchronized_torch_run(i: int) -> Any:
    out = torch_run(i)
    torch_synchronize()
    return out

  start = time.perf_counter()
  jax_outputs = [jax_run(0)]
  warm_up = time.perf_counter() - start
  torch_outputs = [synchronized_torch_run(0)]
  jax_times: list[float] = []
  torch_times: list[float] = []
  ceilings = []
  for i in range(1, repeats + 1):
    order = [("jax", jax_run), ("torch", synchronized_torch_run)]
    if i % 2 == 0:
      order.reverse()
    for side, run in order:
      start = time.perf_counter()
      out = run(i)
      seconds = time.perf_counter() - start
      (jax_times if side == "jax" else torch_times).append(seconds)
      (jax_outputs if side == "jax" else torch_outputs).append(out)
    ceilings.append(ceiling.sample())
  compile_seconds = warm_up - median(jax_times)
  return jax_times, torch_times, ceilings, jax_outputs, torch_outputs, compile_seconds


def time_in_turn(
  sides: dict[str, Callable[[int], Any]], repeats: int, ceiling: MatmulCeiling
) -> tuple[dict[str, float], dict[str, list[float]], dict[str, Any], list[float]]:
  """`time_alternately` for any number of sides: a warm-up run of each, then
  `repeats` rounds in which each side runs once, the first side rotating.

  Args:
    sides: name -> run(i), its outputs blocked until ready.
    repeats: timed runs per side.
    ceiling: sampled once after every round.

  Returns:
    (each side's warm-up seconds, each side's timed seconds, each side's
    warm-up outputs, the ceiling samples).
  """
  first, outputs = {}, {}
  times: dict[str, list[float]] = {k: [] for k in sides}
  ceilings = []
  for k, run in sides.items():
    start = time.perf_counter()
    outputs[k] = run(0)
    first[k] = time.perf_counter() - start
  order = list(sides)
  for i in range(1, repeats + 1):
    turn = i % len(order)
    for k in order[turn:] + order[:turn]:
      start = time.perf_counter()
      sides[k](i)
      times[k].append(time.perf_counter() - start)
    ceilings.append(ceiling.sample())
  return first, times, outputs, ceilings


def make_row(
  name: str,
  label: str,
  jax_times: Sequence[float],
  torch_times: Sequence[float],
  ceilings: Sequence[float],
  work: float,
  unit: str,
  jax_flops: float,
  torch_flops: float,
  *,
  compile_seconds: float,
) -> Row:
  """A row: each side's throughput (`work` per median run), their ratio, the
  seconds of every timed run, the median ceiling, the compile seconds apart,
  and each side's fraction of the ceiling when `jax_flops` is counted."""
  jax_rate, torch_rate = work / median(jax_times), work / median(torch_times)
  ceiling = median(ceilings)
  out = {
    "row": name,
    "label": label,
    "unit": unit,
    "work_per_run": work,
    "jaxrobust": jax_rate,
    "pytorch": torch_rate,
    "ratio": jax_rate / torch_rate,
    "jaxrobust_seconds": jax_times,
    "pytorch_seconds": torch_times,
    "matmul_ceiling_flops": ceiling,
    "compile_seconds": compile_seconds,
  }
  if jax_flops:
    out["gflop_per_run"] = jax_flops / 1e9
    out["jaxrobust_ceiling_fraction"] = jax_flops / median(jax_times) / ceiling
    out["pytorch_ceiling_fraction"] = torch_flops / median(torch_times) / ceiling
  return out


def in_dtype_row(row: Row, dtype: str, float32_row: Row | None) -> Row:
  """`row`, measured in `dtype`, named for it and compared with its float32
  twin (when one ran): each side's speed-up over float32 and whether the
  agreement column holds, i.e. neither side's accuracy moved by more than one
  point (or one example, when fewer than 100 are counted) from float32's."""
  row = {**row, "row": f"{row['row']}_{dtype}", "label": f"{row['label']} [{dtype}]"}
  row["dtype"] = dtype
  if float32_row is not None:
    a, b = row["agreement"], float32_row["agreement"]
    tolerance = max(0.01, 1 / a["examples"])
    moved = {side: a[side] - b[side] for side in ("jaxrobust", "pytorch")}
    row["versus_float32"] = {
      "speedup": {side: row[side] / float32_row[side] for side in ("jaxrobust", "pytorch")},
      "agreement_moved": moved,
      "agreement_holds": all(abs(m) <= tolerance + 1e-9 for m in moved.values()),
    }
  return row


# ----------------------------------------------------------------------------
# The machine.


def cpu_name() -> str:
  """The CPU's model name."""
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
  """The CPU's vector and matrix extensions that matter to the rows."""
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("flags"):
        flags = set(line.split(":", 1)[1].split())
        return [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
  except OSError:
    pass
  return []


def memory_gib() -> float | None:
  """The machine's memory in GiB, when the system says."""
  try:
    return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
  except (ValueError, OSError):
    return None


def machine_description(jax: Any, torch: Any, torchattacks: Any, torch_threads: int) -> dict:
  """The machine and the versions of both sides, for the table's header."""
  cores = len(os.sched_getaffinity(0))
  devices = jax.devices()
  return {
    "cpu": cpu_name(),
    "cpu_features": cpu_flags(),
    "cores": cores,
    "memory_gib": memory_gib(),
    "os": platform.platform(),
    "python": platform.python_version(),
    "jax": jax.__version__,
    "jax_backend": jax.default_backend(),
    "jax_devices": f"{len(devices)} x {devices[0].device_kind}",
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "torch": torch.__version__,
    "torchattacks": torchattacks.__version__,
    "torch_threads": torch_threads,
    "torch_device": "cuda" if torch.cuda.is_available() else "cpu",
    "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
  }


# ----------------------------------------------------------------------------
# Output.


def format_rate(v: float) -> str:
  """A throughput as the table prints it."""
  return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def format_table(results: dict) -> str:
  """The results as the printed report: the machine, then the rows as markdown."""
  m = results["machine"]
  lines = [
    f"Machine: {m['cpu']} ({m['cores']} cores; {', '.join(m['cpu_features'])}), "
    f"{m['memory_gib']} GiB; {m['os']}",
    f"jax {m['jax']} on {m['jax_devices']} ({m['jax_backend']}; XLA_FLAGS={m['xla_flags']!r}); "
    f"torch {m['torch']} on {m['torch_device']} ({m['torch_threads']} threads), "
    f"torchattacks {m['torchattacks']}; Python {m['python']}",
    f"Model: {results['model']}; data: {results['data']}",
    f"Batch {results['batch_size']}; median of {results['repeats']} timed runs per side "
    f"after a warm-up, alternating; clean accuracy on the attacked images "
    f"{100 * results['clean_accuracy']:.1f} %",
    f"Matmul ceiling (float32 jnp.dot 2048^2, median over the run; every dtype's % is of it): "
    f"{results['matmul_ceiling_gflops']:.0f} GFLOP/s; forward {results['forward_mflop']:.1f} "
    f"MFLOP/image, forward + input gradient {results['step_mflop']:.1f} MFLOP/image "
    f"(XLA cost analysis)",
    f"Load average at start {m['load_average_at_start']}, at end {results['load_average_at_end']}",
    "",
    "| row | jaxrobust | PyTorch | ratio | jaxrobust compile (s) | GFLOP/run "
    "| % of ceiling jr / pt | agreement jr / pt |",
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
  ]
  for r in results["rows"]:
    if r.get("kind") == "memory":
      g = r["growth"]
      lines.append(
        f"| {r['label']} | PGD-100 {r['jaxrobust']:.0f} MiB ({g['jaxrobust']:.2f}x PGD-10) | "
        f"PGD-100 {r['pytorch']:.0f} MiB ({g['torchattacks']:.2f}x PGD-10) | | | | | |"
      )
      continue
    unit = r["unit"]
    flop = f"{r['gflop_per_run']:.1f}" if "gflop_per_run" in r else ""
    frac = (
      f"{100 * r['jaxrobust_ceiling_fraction']:.0f} / {100 * r['pytorch_ceiling_fraction']:.0f} %"
      if "gflop_per_run" in r
      else ""
    )
    a = r.get("agreement", {})
    agree = (
      f"{100 * a['jaxrobust']:.1f} / {100 * a['pytorch']:.1f} % ({a['what']}, {a['examples']})"
      if a
      else ""
    )
    lines.append(
      f"| {r['label']} | {format_rate(r['jaxrobust'])} {unit} | "
      f"{format_rate(r['pytorch'])} {unit} | {r['ratio']:.2f}x | {r['compile_seconds']:.1f} "
      f"| {flop} | {frac} | {agree} |"
    )
  versus = [r for r in results["rows"] if "versus_float32" in r]
  if versus:
    lines += [
      "",
      "| row | speed-up over float32 jr / pt | agreement moved jr / pt (points) "
      "| agreement holds |",
      "| --- | ---: | ---: | --- |",
    ]
    for r in versus:
      v = r["versus_float32"]
      up, moved = v["speedup"], v["agreement_moved"]
      lines.append(
        f"| {r['label']} | {up['jaxrobust']:.2f}x / {up['pytorch']:.2f}x "
        f"| {100 * moved['jaxrobust']:+.1f} / {100 * moved['pytorch']:+.1f} "
        f"| {'yes' if v['agreement_holds'] else 'NO: use float32'} |"
      )
  if results["notes"]:
    lines += ["", "Notes:"] + [f"- {n}" for n in results["notes"]]
  return "\n".join(lines)
