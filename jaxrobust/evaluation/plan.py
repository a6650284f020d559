"""What an evaluation runs: its attacks, their rounds, and the batches of a round."""

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxrobust import attacks as attacks_lib
from jaxrobust import checks

# Float rounding allowed on the ball's radius when judging an adversarial example.
BALL_TOLERANCE = 1e-4
# The smallest batch a device gets for a stage's last few examples.
MIN_PER_DEVICE = 8

# `{label: Attack}` or `{label: {"name": ..., **settings}}`, in order.
AttackSpecs = Mapping[str, Any]
# One round: (stage index j, the stage, round index m).
Round = tuple[int, attacks_lib.Attack, int]


def build_attacks(specs: AttackSpecs) -> dict[str, attacks_lib.Attack]:
  """Builds the attacks of an evaluation, refusing targeted ones.

  Robust accuracy is judged on the true labels, so a targeted attack (whose
  labels are the classes to reach) has no place in it.

  Args:
    specs: `{label: spec}`, a spec being `{"name": ..., **settings}` (see
      `jaxrobust.attacks.create`) or an `Attack` already.

  Returns:
    `{label: Attack}`, in the order of `specs`.
  """
  built = {
    label: spec if isinstance(spec, attacks_lib.Attack) else attacks_lib.create(spec)
    for label, spec in specs.items()
  }
  for label, attack in built.items():
    checks.require(
      not attack.targeted,
      f"attack {label!r} is targeted (its labels are the classes to reach); robust accuracy "
      "is judged on the true labels: evaluate an untargeted attack, or run the targeted one "
      "in your own code with targets from jaxrobust.attacks.targets",
    )
  return built


def select(specs: AttackSpecs, names: str | None) -> dict[str, Any]:
  """The specs named in a comma-separated list.

  Args:
    specs: `{label: spec}`.
    names: comma-separated labels of `specs`; "all", "" or None: every one.

  Returns:
    `{label: spec}` of the chosen labels, in the order of `names`.
  """
  if names in (None, "", "all"):
    return dict(specs)
  assert names is not None
  chosen = [n.strip() for n in names.split(",") if n.strip()]
  unknown = [n for n in chosen if n not in specs]
  checks.require(
    not unknown,
    f"unknown attack {unknown[0]!r}; this run defines {', '.join(specs) or 'none'}"
    if unknown
    else "",
  )
  return {n: specs[n] for n in chosen}


def rounds(attack: attacks_lib.Attack) -> list[Round]:
  """What the cascade runs for `attack`, in order.

  An attack's stages (`Attack.stages`, or the attack itself) each run in
  rounds: a stage that is a cascade of runs (`Attack.rounds`: APGD-T's and
  FAB-T's targets) runs each (`Attack.round_fn`) on the examples the rounds
  before it left robust, as the reference implementation drops examples as
  they fall; any other stage is one round. Round m of stage j of example i
  uses the key `fold_in(fold_in(k_i, j), m)`, as the stage itself does, and
  every round of a stage is one compiled program.

  Args:
    attack: the attack.

  Returns:
    `[(stage index j, stage, round index m)]`.
  """
  return [
    (j, stage, m)
    for j, stage in enumerate(attack.stages or (attack,))
    for m in range(stage.rounds or 1)
  ]


def threat_model(attack: attacks_lib.Attack) -> tuple:
  """The threat model an attack's row is grouped by.

  Args:
    attack: the attack.

  Returns:
    `(norm, eps)`; for an attack without a ball, a group of its own.
  """
  if attack.norm is None or attack.eps is None:
    return (attack.norm, None, id(attack))
  return (attack.norm, float(attack.eps))


def parts(n: int, batch: int, devices: int) -> list[tuple[int, int]]:
  """How the `n` examples of a round run, in compiled batches of few sizes.

  The sizes are the ladder `batch`, `batch` / 2, ... (each rounded up to a
  multiple of `devices`, down to `MIN_PER_DEVICE` examples a device); a part
  takes the smallest size that holds what is left unless that wastes more
  than the smallest size, else the largest size that the rest fills (156
  examples with sizes 256, 128, ..., 16: 128 + 28 in 32, not 156 in 256).

  Args:
    n: the examples to run.
    batch: the largest compiled batch, a multiple of `devices`.
    devices: the devices a batch is split over.

  Returns:
    `[(count, size)]`: each part's `count` examples padded to a batch of `size`.
  """
  ladder = [batch]
  while True:
    half = devices * math.ceil(ladder[-1] / 2 / devices)
    if half < MIN_PER_DEVICE * devices or half >= ladder[-1]:
      break
    ladder.append(half)
  out = []
  while n > 0:
    holds = min((s for s in ladder if s >= min(n, batch)), default=batch)
    size = holds if holds - n <= ladder[-1] else max(s for s in ladder if s <= n)
    out.append((min(n, size), size))
    n -= min(n, size)
  return out


def ball_limit(attack: attacks_lib.Attack, x: np.ndarray) -> float:
  """The largest perturbation counted inside `attack`'s ball.

  eps, float32's rounding (`BALL_TOLERANCE`), and the rounding of images to
  their type if it is narrower than float32: at most a quarter of its
  machine epsilon a coordinate in [0, 1], summed over the coordinates in
  the norm (d of them: 1 for linf, sqrt(d) for l2, d for l1).

  Args:
    attack: an attack with a ball (`eps` not None).
    x: the images [N, ...] (their type and shape).

  Returns:
    The limit on an adversarial example's size in the attack's norm.
  """
  assert attack.eps is not None
  limit = attack.eps * (1 + BALL_TOLERANCE) + 1e-6
  if np.issubdtype(x.dtype, np.floating) and np.finfo(x.dtype).bits < 32:
    rounding = float(np.finfo(x.dtype).eps) / 4
    dims = 1 if attack.norm == "linf" else math.prod(x.shape[1:])
    limit += rounding * (dims if attack.norm == "l1" else math.sqrt(dims))
  return limit
