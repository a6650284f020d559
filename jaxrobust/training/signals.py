"""Pre-emption: SIGTERM and SIGINT turned into a request to stop after the current step."""

import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import jax
from jax.experimental import multihost_utils


class Interrupted(Exception):
  """SIGTERM or SIGINT stopped training after a checkpoint was saved.

  Attributes:
    exit_code: 128 + the signal number (143 for SIGTERM, 130 for SIGINT).
  """

  def __init__(self, signum: int, step: int, path: str | Path) -> None:
    super().__init__(
      f"stopped by {signal.Signals(signum).name} at step {step}; "
      f"saved checkpoint {str(path)!r}; run the same command again "
      f"to resume"
    )
    self.exit_code = 128 + signum


class StopRequests:
  """Turns SIGTERM and SIGINT into a request to stop after the current step.

  A second signal gets the handler that was there before (SIGTERM kills,
  SIGINT raises KeyboardInterrupt). Handlers are installed only in the main
  thread of a single-process run; with several processes, `requested` asks
  JAX's preemption sync point (which catches SIGTERM) every step instead.
  """

  def __enter__(self) -> "StopRequests":
    self.signum: int | None = None
    self.previous: dict[int, Any] = {}
    self.multi_process = jax.process_count() > 1
    if not self.multi_process and threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGTERM, signal.SIGINT):
        self.previous[signum] = signal.signal(signum, self._handle)
    return self

  def _handle(self, signum: int, frame: FrameType | None) -> None:
    del frame
    self.signum = signum
    signal.signal(signum, self.previous[signum] or signal.SIG_DFL)

  def requested(self, step: int) -> bool:
    """Whether a stop was requested by step `step` (all processes agree)."""
    if self.multi_process and multihost_utils.reached_preemption_sync_point(step):
      self.signum = signal.SIGTERM
    return self.signum is not None

  def __exit__(self, *exc_info: object) -> None:
    for signum, handler in self.previous.items():
      signal.signal(signum, handler or signal.SIG_DFL)
