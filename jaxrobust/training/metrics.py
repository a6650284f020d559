"""A run's metrics log: `metrics.jsonl` and TensorBoard, consistent across resumes."""

import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import tqdm

from jaxrobust.training import checkpoints

# Fields of a metrics.jsonl line that measure time, not the computation.
TIMING_FIELDS = ("seconds",)


class MetricsLog:
  """`metrics.jsonl` (one line per logged step) and a TensorBoard log.

  On resume, lines after the restored step are dropped (and TensorBoard told
  to purge them), so that no step is duplicated or missing once they are
  logged again; so is a torn last line left by a killed process.
  """

  def __init__(self, workdir: str | Path, resume_step: int) -> None:
    self.path = Path(workdir) / "metrics.jsonl"
    if self.path.exists():
      lines = self.path.read_text().splitlines()
      kept = [line for line in lines if _logged_step(line, self.path) <= resume_step]
      if kept != lines:
        checkpoints.write_atomic(self.path, "".join(l + "\n" for l in kept))
    self.file = open(self.path, "a")
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

    self.tb = SummaryWriter(
      str(Path(workdir) / "tensorboard"), purge_step=resume_step + 1 if resume_step else None
    )

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    """Logs `metrics` of `step` to both logs."""
    self.file.write(json.dumps({"step": step, **metrics}) + "\n")
    self.file.flush()
    for k, v in metrics.items():
      self.tb.add_scalar(f"train/{k}", v, step)

  def close(self) -> None:
    """Closes both logs."""
    self.file.close()
    self.tb.close()

  def __enter__(self) -> "MetricsLog":
    return self

  def __exit__(self, *exc_info: object) -> None:
    self.close()


def _logged_step(line: str, path: Path) -> float:
  """The step of a metrics.jsonl line; infinity for a torn or foreign line."""
  try:
    step = json.loads(line)["step"]
    if isinstance(step, int):
      return step
  except (ValueError, TypeError, KeyError):
    pass
  if line.strip():
    warnings.warn(
      f"dropping an unreadable line of {path} (a write cut short?): {line[:80]!r}", stacklevel=2
    )
  return float("inf")


class Progress:
  """Training progress on stderr: a bar on a terminal; elsewhere (CI, a log
  file) one line per logged step instead of carriage-return updates."""

  def __init__(self, start: int, end: int, name: str, *, enabled: bool = True) -> None:
    self.name, self.end = name, end
    self.enabled = enabled
    self.bar = None
    self.last_time, self.last_step = time.perf_counter(), start
    if enabled and sys.stderr.isatty():
      self.bar = tqdm.tqdm(total=end, initial=start, unit="step", desc=name)

  def step(self) -> None:
    """Advances the bar by one step."""
    if self.bar is not None:
      self.bar.update(1)

  def log(self, step: int, metrics: dict[str, float]) -> None:
    """Shows the metrics of a logged step."""
    if self.bar is not None:
      self.bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['accuracy']:.3f}")
    elif self.enabled:
      now = time.perf_counter()
      rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
      self.last_time, self.last_step = now, step
      print(
        f"{self.name}: step {step}/{self.end}, loss {metrics['loss']:.4f}, accuracy "
        f"{metrics['accuracy']:.4f}, {rate:.2f} steps/s",
        file=sys.stderr,
        flush=True,
      )

  def __enter__(self) -> "Progress":
    return self

  def __exit__(self, *exc_info: object) -> None:
    if self.bar is not None:
      self.bar.close()
