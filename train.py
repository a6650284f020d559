"""`python train.py ...` in a clone: the `jaxrobust-train` command (jaxrobust/programs/train.py)."""

from jaxrobust.programs import train

if __name__ == "__main__":
  train.run()
