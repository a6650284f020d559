"""`python eval.py ...` in a clone: the `jaxrobust-eval` command (jaxrobust/programs/eval.py)."""

import os
import signal
import sys


def interrupted_while_starting(signum, frame):
  """Ctrl-C while JAX and the program load (nothing done yet): exit at once.
  (A KeyboardInterrupt could land in a callback that swallows it.)"""
  del signum, frame
  print("interrupted while starting; nothing was evaluated", file=sys.stderr, flush=True)
  os._exit(130)


if __name__ == "__main__":
  signal.signal(signal.SIGINT, interrupted_while_starting)
  from jaxrobust.programs import eval as eval_program

  signal.signal(signal.SIGINT, signal.default_int_handler)
  eval_program.run()
