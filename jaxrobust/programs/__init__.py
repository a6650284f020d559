"""The command-line programs: `jaxrobust-train` (train.py) and `jaxrobust-eval` (eval.py)."""
