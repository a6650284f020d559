"""`python eval.py ...` in a clone: the `jaxrobust-eval` command (jaxrobust/programs/eval.py)."""

from jaxrobust.programs import eval as eval_program

if __name__ == "__main__":
  eval_program.run()
