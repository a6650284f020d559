"""The benchmark's rows, in the order `benchmarks/run.py` runs them: each a function
of the shared `benchmarks.bench.Bench` that returns its row."""

from collections.abc import Callable

from benchmarks.bench import Bench
from benchmarks.harness import Row
from benchmarks.rows import attacks, evaluation, fast_path, memory, training

RUNNERS: dict[str, Callable[[Bench], Row]] = {
  "pgd_linf": attacks.pgd_linf,
  "pgd_l2": attacks.pgd_l2,
  "cw_l2": attacks.cw_l2,
  "mi_fgsm": attacks.mi_fgsm,
  "di_fgsm": attacks.di_fgsm,
  "pgd_at_step": training.pgd_at_step,
  "smoothing": evaluation.smoothing,
  "eval_early_stop": evaluation.eval_early_stop,
  "loop_forms": attacks.loop_forms,
  "loop_unrolled": attacks.loop_unrolled,
  "user_model": fast_path.user_model,
  "seed_network": fast_path.seed_network,
  "preact_resnet18": fast_path.preact_resnet18,
  "seed_training_step": training.seed_training_step,
  "preact_training_step": training.preact_training_step,
  "autoattack": evaluation.autoattack,
  "pgd_memory": memory.pgd_memory,
}
