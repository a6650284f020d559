"""`python train.py ...` in a clone: the `jaxrobust-train` command (jaxrobust/programs/train.py)."""

if __name__ == "__main__":
  from jaxrobust import launch

  launch.train_main()
