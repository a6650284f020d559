"""The command-line programs' entry points (`jaxrobust-train`, `jaxrobust-eval`,
`python train.py`, `python eval.py`).

Until JAX and the program have loaded, Ctrl-C exits at once with code 130
and one line (a KeyboardInterrupt raised during imports could land in a
callback that swallows it); from then on the program handles it.
"""

import os
import signal
import sys
from types import FrameType, ModuleType


def train_main() -> None:
  """The `jaxrobust-train` command."""
  _start("train", "nothing was trained").run()


def eval_main() -> None:
  """The `jaxrobust-eval` command."""
  _start("eval", "nothing was evaluated").run()


def _start(program: str, nothing_done: str) -> ModuleType:
  def interrupted_while_starting(signum: int, frame: FrameType | None) -> None:
    del signum, frame
    print(f"interrupted while starting; {nothing_done}", file=sys.stderr, flush=True)
    os._exit(130)

  signal.signal(signal.SIGINT, interrupted_while_starting)
  module = __import__(f"jaxrobust.programs.{program}", fromlist=["run"])
  signal.signal(signal.SIGINT, signal.default_int_handler)
  return module
