"""`python eval.py ...` in a clone: the `jaxrobust-eval` command (jaxrobust/programs/eval.py)."""

if __name__ == "__main__":
  from jaxrobust import launch

  launch.eval_main()
