"""The per-example results of one attack of an evaluation."""

import dataclasses
from typing import Any

import numpy as np

from jaxrobust import attacks as attacks_lib


@dataclasses.dataclass
class Outcome:
  """Per-example results of one attack (all its stages).

  Attributes:
    robust: bool [N], correct clean and under the attack (and, in a
      cascade, under the attacks of its threat model before it).
    fooled_by: int [N], the stage that fooled the example (-1: none).
    l2: float [N], ||x_adv - x||_2 where the attack fooled the example
      (NaN elsewhere).
    size: float [N], ||x_adv - x|| in the attack's norm, likewise.
    attacked: bool [rounds, N], the examples each round ran on (`rounds`:
      a stage's rounds, one after another).
    seconds: float [rounds], the time each round took.
    outside_ball: adversarial examples found outside the ball (not counted).
    x_adv: the adversarial example of each fooled example, x elsewhere
      [N, ...] (only when asked for: `run(..., return_adversarial=True)`).
  """

  robust: np.ndarray
  fooled_by: np.ndarray
  l2: np.ndarray
  size: np.ndarray
  attacked: np.ndarray
  seconds: np.ndarray
  outside_ball: int = 0
  x_adv: np.ndarray | None = None

  @classmethod
  def start(cls, robust: np.ndarray, rounds: int, x: np.ndarray | None = None) -> "Outcome":
    """The outcome before any round ran.

    Args:
      robust: bool [N], the examples the attack starts from.
      rounds: the number of rounds of the attack (`rounds`).
      x: the images [N, ...], to keep the adversarial examples in (None:
        keep none).

    Returns:
      An `Outcome` where nothing was attacked or fooled yet.
    """
    n = len(robust)
    return cls(
      robust=robust.copy(),
      fooled_by=np.full(n, -1, np.int32),
      l2=np.full(n, np.nan, np.float32),
      size=np.full(n, np.nan, np.float32),
      attacked=np.zeros((rounds, n), bool),
      seconds=np.zeros(rounds),
      x_adv=None if x is None else x.copy(),
    )


# The fields of an `Outcome` kept in an evaluation's state (`x_adv` aside).
FIELDS = ("robust", "fooled_by", "l2", "size", "attacked", "seconds", "outside_ball")


def adversarial(outcome: Outcome, attack: attacks_lib.Attack) -> dict[str, Any]:
  """An outcome's adversarial examples, as AutoAttack's reference returns them.

  Args:
    outcome: the `Outcome` of `attack`, run with `return_adversarial=True`.
    attack: the attack.

  Returns:
    `{"x_adv": [N, ...] (each fooled example's adversarial image, x
    elsewhere), "fooled": bool [N], "stage": str [N] (the label of the stage
    that fooled it, "" for none)}`.
  """
  labels = np.array([""] + [s.label for s in attack.stages or (attack,)])
  return {
    "x_adv": outcome.x_adv,
    "fooled": outcome.fooled_by >= 0,
    "stage": labels[outcome.fooled_by + 1],
  }
