"""AutoAttack (Croce & Hein 2020, "Reliable evaluation of adversarial
robustness with an ensemble of diverse parameter-free attacks"): the field's
standard robustness evaluation, as a cascade of attacks."""

from typing import Any

from jaxrobust import checks
from jaxrobust.attacks import core
from jaxrobust.attacks.apgd import apgd
from jaxrobust.attacks.apgd_t import apgd_t
from jaxrobust.attacks.attack import NORMS, Attack, factory
from jaxrobust.attacks.combinators import worst_case
from jaxrobust.attacks.fab import fab, fab_t
from jaxrobust.attacks.square import square

VERSIONS = ("standard", "plus", "rand")


@factory("autoattack")
def autoattack(
  *,
  norm: str = "linf",
  eps: float,
  version: str = "standard",
  steps: int = 100,
  queries: int = 5000,
  num_targets: int = 9,
) -> Attack:
  """AutoAttack's suite in one of its versions, as in the authors' code.

  * "standard": APGD-CE (1 run), APGD-T (`num_targets` targets), FAB-T
    (`num_targets` targets) and Square (`queries` queries), in that order;
    in L1 (Croce & Hein 2021), APGD-CE with 5 restarts and APGD-T with 5
    targets, both with `use_largereps`, then FAB-T and Square in L1;
  * "plus": APGD-CE and APGD-DLR with 5 restarts, FAB with 5 restarts,
    Square, APGD-T and FAB-T;
  * "rand", for randomized models: APGD-CE and APGD-DLR, each gradient the
    mean over 20 draws of the model (EOT); the model is then stochastic,
    `logits_fn(x, key)` (see `apgd`'s `eot_samples`).

  The iterative attacks run `steps` iterations (the authors: 100). Robust
  accuracy is the fraction of examples classified correctly clean and after
  every stage. Called as an attack, every stage runs on every example and
  each example keeps the first stage's output that fools the model (the
  stages in `stages`; `worst_case`); `evaluation.evaluate` instead runs
  each stage only on the examples still robust, packed into full batches,
  which gives the same per-example result at a cost that falls as the model
  breaks, and reports the robust accuracy after each stage.

  Args:
    norm: "linf", "l2" or "l1".
    eps: radius of the ball, > 0.
    version: "standard", "plus" or "rand".
    steps: iterations of APGD, APGD-T, FAB and FAB-T, >= 1.
    queries: Square's queries, >= 0.
    num_targets: target classes of APGD-T and FAB-T, >= 1.

  Returns:
    An `Attack` whose `stages` are the suite's attacks, in order.

  References:
    Croce & Hein, 2020, "Reliable evaluation of adversarial robustness with an
    ensemble of diverse parameter-free attacks".
  """
  norm = core.check_norm(norm, NORMS)
  core.check_eps(eps)
  checks.one_of("version", version, VERSIONS)
  ball: dict[str, Any] = dict(norm=norm, eps=eps)
  targeted: dict[str, Any] = dict(ball, steps=steps, num_targets=num_targets)
  if version == "standard" and norm == "l1":
    stages = [
      apgd(**ball, steps=steps, loss="ce", restarts=5, use_largereps=True),
      apgd_t(**dict(targeted, num_targets=min(num_targets, 5)), use_largereps=True),
      fab_t(**targeted),
      square(**ball, queries=queries),
    ]
  elif version == "standard":
    stages = [
      apgd(**ball, steps=steps, loss="ce"),
      apgd_t(**targeted),
      fab_t(**targeted),
      square(**ball, queries=queries),
    ]
  elif version == "plus":
    stages = [
      apgd(**ball, steps=steps, loss="ce", restarts=5),
      apgd(**ball, steps=steps, loss="dlr", restarts=5),
      fab(**ball, steps=steps, restarts=5),
      square(**ball, queries=queries),
      apgd_t(**targeted),
      fab_t(**targeted),
    ]
  else:
    stages = [
      apgd(**ball, steps=steps, loss="ce", eot_samples=20),
      apgd(**ball, steps=steps, loss="dlr", eot_samples=20),
    ]
  return worst_case(attacks=stages)
