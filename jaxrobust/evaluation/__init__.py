"""Robust accuracy of a model under attacks, attacking only what is still robust.

An example is robust to a threat model (a norm and an eps) when it is
classified correctly clean and under every attack of that threat model. The
evaluation is a cascade: each attack, and each stage of a staged attack
(AutoAttack, `worst_case`), runs only on the examples still robust, packed
into full batches of one fixed size (so nothing recompiles), and its row
reports the robust accuracy after it. Skipping changes no example's
outcome: every attack is per example, with the key of example i under
attack a `fold_in(fold_in(key, a), i)` (stage j: folded with j too), so the
result is the same as running every attack on every example, for any batch
size and device count, and it is the same when an interrupted evaluation is
resumed from its state file (`state_path`). With `individual`, every attack
runs on all clean-correct examples instead (each row: that attack alone).

An adversarial example counts only within its attack's ball (up to float32
rounding, and the rounding to the images' type when it is narrower, such as
float16; the report's `outside_ball` counts any that was not, which a
correct attack never produces, and `run` warns of them). Transfer (black-box) evaluation crafts the
examples on a source model and classifies them with the target.

Compiled programs are cached per (model function, attack, batch shape,
mesh), with eps an argument: eps sweeps and sanity checks reuse them. Pass
the same `apply_fn` object across calls to benefit.
"""

import dataclasses
import functools
import hashlib
import json
import math
import time
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxrobust import attacks as attacks_lib
from jaxrobust import checks, data, fastpath, parallel
from jaxrobust.models import inference
from jaxrobust import keys as keys_lib

# Float rounding allowed on the ball's radius when judging an adversarial example.
BALL_TOLERANCE = 1e-4
# The smallest batch a device gets for a stage's last few examples.
MIN_PER_DEVICE = 8
# The state file is rewritten at most this often (and after every round).
SAVE_SECONDS = 5.0
# The layout of the state file: 2 records each round of a stage (`rounds`).
STATE_FORMAT = 2


def build_attacks(specs):
  """`{label: Attack}` from `{label: spec}` (a spec: `{"name": ..., **settings}`,
  or an `Attack` already). A targeted attack is refused: robust accuracy is
  judged on the true labels."""
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


def select(specs, names):
  """The specs named in the comma-separated `names` ("all" or None: every one)."""
  if names in (None, "", "all"):
    return dict(specs)
  chosen = [n.strip() for n in names.split(",") if n.strip()]
  unknown = [n for n in chosen if n not in specs]
  checks.require(
    not unknown,
    f"unknown attack {unknown[0]!r}; this run defines {', '.join(specs) or 'none'}"
    if unknown
    else "",
  )
  return {n: specs[n] for n in chosen}


@dataclasses.dataclass
class Outcome:
  """Per-example results of one attack (all its stages).

  Attributes:
    robust: bool [N], correct clean and under the attack (and, in a
      cascade, under the attacks of its threat model before it).
    fooled_by: int [N], the stage that fooled the example (-1: none).
    l2, size: float [N], ||x_adv - x||_2 and its size in the attack's norm,
      where the attack fooled the example (NaN elsewhere).
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
  def start(cls, robust, rounds, x=None):
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


def rounds(attack):
  """`[(stage index, stage, round index)]`: what `run` runs for `attack`, in order.

  An attack's stages (`Attack.stages`, or the attack itself) each run in
  rounds: a stage that is a cascade of runs (`Attack.rounds`: APGD-T's and
  FAB-T's targets) runs each (`Attack.round_fn`) on the examples the
  rounds before it left robust, as the reference implementation drops
  examples as they fall; any other stage is one round. Round m of stage j
  of example i uses the key `fold_in(fold_in(k_i, j), m)`, as the stage
  itself does, and every round of a stage is one compiled program."""
  return [
    (j, stage, m)
    for j, stage in enumerate(attack.stages or (attack,))
    for m in range(stage.rounds or 1)
  ]


def threat_model(attack):
  """The (norm, eps) an attack's row is grouped by; an attack without a
  ball is a group of its own."""
  if attack.norm is None or attack.eps is None:
    return (attack.norm, None, id(attack))
  return (attack.norm, float(attack.eps))


def run(
  apply_fn,
  variables,
  x,
  y,
  attacks,
  *,
  key,
  batch_size=500,
  mesh=None,
  source=None,
  stochastic_apply_fn=None,
  individual=False,
  state_path=None,
  log=None,
  return_adversarial=False,
):
  """Runs the cascade; returns (clean correct [N], {label: Outcome}).

  Args:
    apply_fn: `apply_fn(variables, x) -> logits`, the model in inference mode.
    variables: its variables.
    x, y: images in [0, 1] [N, ...] and labels [N] (numpy).
    attacks: `{label: Attack or spec}`, in order.
    key: PRNG key of the attacks.
    batch_size: examples per compiled batch (rounded to the device count).
      What is left of a stage after its full batches runs in batches of
      batch_size / 2^k (at least `MIN_PER_DEVICE` examples a device), little
      padding wasted (`_parts`), so a stage left with few examples costs
      little; each of these few shapes compiles once.
    mesh: devices to split batches over (default: all).
    source: optional `(apply_fn, variables)` of the model the attacks run on.
    stochastic_apply_fn: `(variables, x, key) -> logits`, one random draw of
      a randomized model, for attacks with EOT (`Attack.stochastic`), which
      it also judges, as AutoAttack's "rand" version does: an example counts
      when a draw classifies it correctly clean (one draw per example, the
      same for every stage) and another draw does after the attack.
    individual: run every attack on all clean-correct examples, not only on
      those the attacks of its threat model before it left robust.
    state_path: a file to write the progress to (every `SAVE_SECONDS` and
      after every round), and to resume from (refused if it belongs to
      another evaluation).
    log: optional `log(message)` for progress lines.
    return_adversarial: keep each fooled example's adversarial image
      (`Outcome.x_adv`).
  """
  checks.check_images(x)
  x, y = np.asarray(x), np.asarray(y)
  checks.check_labels(y, len(x))
  checks.integer_at_least("batch_size", batch_size, 1)
  inference.check_apply_fn(apply_fn, variables, x[:1])
  if source is not None:
    inference.check_apply_fn(*source, x[:1])
  attack_fns = build_attacks(attacks)
  mesh = mesh or parallel.mesh()
  devices = mesh.devices.size
  batch = devices * math.ceil(min(batch_size, len(x)) / devices)
  state = _State(state_path, _fingerprint(variables, x, y, attack_fns, key, source, individual))
  log = log or (lambda message: None)

  clean = state.get("clean")
  if clean is None:
    clean = predictions(apply_fn, variables, x, batch_size=batch, mesh=mesh) == y
    state.put("clean", clean)
  if stochastic_apply_fn is None and any(a.stochastic for a in attack_fns.values()):
    log("warning: attacks with EOT on a deterministic model: every draw is the same")

  context = _Context(
    apply_fn=apply_fn,
    variables=variables,
    source=source or (None, None),
    stochastic_apply_fn=stochastic_apply_fn,
    x=x,
    y=y,
    mesh=mesh,
    batch=batch,
    log=log,
    keep_adversarial=return_adversarial,
  )
  robust_of = {}
  outcomes = {}
  for index, (label, attack) in enumerate(attack_fns.items()):
    group = threat_model(attack)
    start = clean if individual else robust_of.get(group, clean)
    plan = rounds(attack)
    outcome = state.outcome(label, start, len(plan), x if return_adversarial else None)
    for r, (j, stage, m) in enumerate(plan):
      todo = np.flatnonzero(outcome.robust & ~outcome.attacked[r])
      if len(todo):
        began = time.perf_counter()
        where = _Where(label, j, stage, m, r, bool(attack.stages))
        _run_round(context, where, jax.random.fold_in(key, index), todo, outcome, state)
        outcome.seconds[r] += time.perf_counter() - began
        state.save(label, outcome, force=True)
      if m == max(stage.rounds, 1) - 1:
        seconds = outcome.seconds[r - m : r + 1].sum()
        log(
          f"{label}{'' if not attack.stages else ' ' + stage.label}: robust accuracy "
          f"{outcome.robust.mean():.2%} after {seconds:.1f} s"
        )
    outcomes[label] = outcome
    if not individual:
      robust_of[group] = outcome.robust
  return clean, outcomes


@dataclasses.dataclass(frozen=True)
class _Context:
  """What every round of `run` shares."""

  apply_fn: object
  variables: object
  source: tuple
  stochastic_apply_fn: object
  x: np.ndarray
  y: np.ndarray
  mesh: object
  batch: int
  log: object
  keep_adversarial: bool


@dataclasses.dataclass(frozen=True)
class _Where:
  """Which round of which attack: label, stage j, round m (flat index r)."""

  label: str
  j: int
  stage: object
  m: int
  r: int
  staged: bool


def _run_round(context, where, attack_key, todo, outcome, state):
  """Runs one round on the examples `todo`, in parts of compiled batches
  (`_parts`), and records what it fooled in `outcome`. The next part is
  dispatched before the current one's results are read, so the host's
  bookkeeping overlaps the device's work."""
  c, stage = context, where.stage
  program = _attack_program(
    c.apply_fn,
    c.source[0],
    c.stochastic_apply_fn,
    _program_key(stage),
    c.mesh,
    where.staged,
    c.keep_adversarial,
  )
  eps = None if stage.eps is None else jnp.float32(stage.eps)
  limit = np.inf if stage.eps is None else _ball_limit(stage, c.x)
  pending = []
  begin = 0
  for count, compiled in _parts(len(todo), c.batch, c.mesh.devices.size):
    chosen, begin = todo[begin : begin + count], begin + count
    # A part smaller than its batch repeats examples, then drops them.
    padded = np.resize(chosen, compiled)
    arrays = data.to_devices((c.x[padded], c.y[padded], padded.astype(np.int32)), c.mesh)
    stage_index = (jnp.int32(where.j), jnp.int32(where.m))
    pending.append(
      (chosen, program(c.variables, c.source[1], *arrays, attack_key, *stage_index, eps))
    )
    if len(pending) == 2:
      _record(c, where, limit, *pending.pop(0), outcome, state)
  for chosen, results in pending:
    _record(c, where, limit, chosen, results, outcome, state)


def _record(context, where, limit, chosen, results, outcome, state):
  """Reads one part's results and records them in `outcome`."""
  results = [r[: len(chosen)] for r in jax.device_get(results)]
  correct, l2, size = results[:3]
  inside = size <= limit
  fooled = ~correct & inside
  outside = int(np.sum(~correct & ~inside))
  if outside:
    outcome.outside_ball += outside
    context.log(
      f"warning: {where.label} {where.stage.label} found {outside} adversarial examples "
      f"outside its ball ({where.stage.norm} {where.stage.eps:g}; largest "
      f"{np.max(size[~correct & ~inside]):.6g}): not counted (outside_ball)"
    )
  hit = chosen[fooled]
  outcome.robust[hit] = False
  outcome.fooled_by[hit] = where.j
  outcome.l2[hit], outcome.size[hit] = l2[fooled], size[fooled]
  if context.keep_adversarial:
    outcome.x_adv[hit] = results[3][fooled]
  outcome.attacked[where.r, chosen] = True
  state.save(where.label, outcome)


def predictions(apply_fn, variables, x, *, batch_size=500, mesh=None):
  """The model's classes for images `x` [N, ...], in batches split over `mesh`."""
  mesh = mesh or parallel.mesh()
  devices = mesh.devices.size
  batch = devices * math.ceil(min(batch_size, len(x)) / devices)
  predict = _predict_program(apply_fn, mesh)
  out = []
  for xb, _, mask in data.eval_batches(x, np.zeros(len(x), np.int32), batch, multiple_of=batch):
    out.append(np.asarray(predict(variables, data.to_devices(xb, mesh)))[mask])
  return np.concatenate(out)


def evaluate(
  apply_fn, variables, x, y, attacks, *, individual=False, return_adversarial=False, **options
):
  """Runs the attacks (`run`, which takes the same arguments) and returns the report.

  With `return_adversarial`, returns `(report, adversarial)`, where
  `adversarial[label]` is `{"x_adv": [N, ...] (each fooled example's
  adversarial image, x elsewhere), "fooled": bool [N], "stage": str [N]
  (the stage that fooled it, "" for none)}`, as AutoAttack's reference
  returns its adversarial examples.

  `{"n_examples", "clean_accuracy", "mode": "cascade" | "individual",
  "results": [{"attack", "name", "norm", "eps", "accuracy", "attacked",
  "seconds", "median_l2", "max_perturbation", "outside_ball", "settings",
  "stages": [{"stage", "accuracy", "attacked", "seconds"}]}],
  "threat_models": [{"norm", "eps", "attacks", "accuracy"}],
  "worst_case_accuracy", "seconds"}`, accuracies in [0, 1]: a row's
  accuracy is the robust accuracy after its attack (cascade: and the
  attacks of its threat model before it); a threat model's is after all of
  its attacks; the worst case counts an example robust when it is robust to
  every threat model. `median_l2` and `max_perturbation` are over the
  successful adversarial examples (None if there are none).
  """
  began = time.perf_counter()
  attack_fns = build_attacks(attacks)
  clean, outcomes = run(
    apply_fn,
    variables,
    x,
    y,
    attack_fns,
    individual=individual,
    return_adversarial=return_adversarial,
    **options,
  )
  rep = report(clean, outcomes, attack_fns, individual=individual)
  rep["seconds"] = time.perf_counter() - began
  if not return_adversarial:
    return rep
  return rep, {label: adversarial(outcomes[label], a) for label, a in attack_fns.items()}


def adversarial(outcome, attack):
  """An `Outcome`'s adversarial examples (see `evaluate`)."""
  labels = np.array([""] + [s.label for s in attack.stages or (attack,)])
  return {
    "x_adv": outcome.x_adv,
    "fooled": outcome.fooled_by >= 0,
    "stage": labels[outcome.fooled_by + 1],
  }


def robust_accuracy(logits_fn, x, y, attack, *, key, batch_size=500) -> float:
  """The fraction of examples (`x` [N, ...] in [0, 1], labels `y` [N])
  classified correctly clean and under `attack` (each of its stages run on
  what the stages before it left robust): `evaluate` in one line.

  `logits_fn(x) -> logits` is called with its variables as constants of
  the compiled program, which is cached per `logits_fn` object: to evaluate
  changing weights without recompiling, call `evaluate` with
  `(apply_fn, variables)` (`inference.split`).
  """
  checks.require(
    isinstance(attack, attacks_lib.Attack), f"attack must be an Attack, got {attack!r}"
  )
  rep = evaluate(
    inference.constant_apply(logits_fn),
    {},
    x,
    y,
    {"attack": attack},
    key=key,
    batch_size=batch_size,
  )
  return rep["results"][0]["accuracy"]


def report(clean, outcomes, attack_fns, *, individual=False):
  """The JSON-ready summary of `run`'s results (see `evaluate`)."""
  rows, groups = [], {}
  for label, attack in attack_fns.items():
    o = outcomes[label]
    fooled = o.fooled_by >= 0
    stages = attack.stages or (attack,)
    robust_after = [(o.robust | (o.fooled_by > j)).mean() for j in range(len(stages))]
    # A stage's first round ran on all it attacked; its time is its rounds'.
    first_round, seconds = {}, np.zeros(len(stages))
    for r, (j, _, _) in enumerate(rounds(attack)):
      first_round.setdefault(j, r)
      seconds[j] += o.seconds[r]
    rows.append(
      {
        "attack": label,
        "name": attack.name,
        "norm": attack.norm,
        "eps": attack.eps,
        "accuracy": float(o.robust.mean()),
        "attacked": int(o.attacked[0].sum()),
        "seconds": float(o.seconds.sum()),
        "median_l2": float(np.median(o.l2[fooled])) if fooled.any() else None,
        "max_perturbation": float(np.max(o.size[fooled])) if fooled.any() else None,
        "outside_ball": o.outside_ball,
        "settings": {k: v for k, v in attack.spec.items() if k not in ("name", "norm", "eps")},
        "stages": [
          {
            "stage": s.label,
            "accuracy": float(a),
            "attacked": int(o.attacked[first_round[j]].sum()),
            "seconds": float(seconds[j]),
          }
          for j, (s, a) in enumerate(zip(stages, robust_after))
        ],
      }
    )
    group = threat_model(attack)
    entry = groups.setdefault(
      group, {"norm": attack.norm, "eps": attack.eps, "attacks": [], "robust": clean.copy()}
    )
    entry["attacks"].append(label)
    entry["robust"] = entry["robust"] & o.robust
  worst = np.logical_and.reduce([clean] + [g["robust"] for g in groups.values()])
  threat_models = [
    {
      "norm": g["norm"],
      "eps": g["eps"],
      "attacks": g["attacks"],
      "accuracy": float(g["robust"].mean()),
    }
    for g in groups.values()
  ]
  return {
    "n_examples": int(len(clean)),
    "clean_accuracy": float(clean.mean()),
    "mode": "individual" if individual else "cascade",
    "results": rows,
    "threat_models": threat_models,
    "worst_case_accuracy": float(worst.mean()),
  }


def robustbench_report(rep, row):
  """One threat model of a report in the shape RobustBench records a result:
  clean and robust accuracy (%), norm, eps, examples, version, the robust
  accuracy after each stage, and the seconds it took."""
  r = next(r for r in rep["results"] if r["attack"] == row)
  return {
    "clean_acc": 100 * rep["clean_accuracy"],
    "robust_acc": 100 * r["accuracy"],
    "threat_model": {"linf": "Linf", "l2": "L2", "l1": "L1"}.get(r["norm"], r["norm"]),
    "eps": r["eps"],
    "n_examples": rep["n_examples"],
    "version": r["settings"].get("version", r["name"]),
    "stages": {s["stage"]: 100 * s["accuracy"] for s in r["stages"]},
    "seconds": r["seconds"],
  }


# ----------------------------------------------------------------------------
# Compiled programs, cached.


def _parts(n, batch, devices):
  """How `n` examples of a stage are run: `[(count, size)]`, each part
  `count` examples padded to a compiled batch of `size`. The sizes are the
  ladder `batch`, `batch` / 2, ... (each rounded up to a multiple of
  `devices`, down to `MIN_PER_DEVICE` examples a device); a part takes the
  smallest size that holds what is left unless that wastes more than the
  smallest size, else the largest size that the rest fills (156 examples
  with sizes 256, 128, ..., 16: 128 + 28 in 32, not 156 in 256)."""
  ladder = [batch]
  while True:
    half = devices * math.ceil(ladder[-1] / 2 / devices)
    if half < MIN_PER_DEVICE * devices or half >= ladder[-1]:
      break
    ladder.append(half)
  parts = []
  while n > 0:
    holds = min((s for s in ladder if s >= min(n, batch)), default=batch)
    size = holds if holds - n <= ladder[-1] else max(s for s in ladder if s <= n)
    parts.append((min(n, size), size))
    n -= min(n, size)
  return parts


def _ball_limit(attack, x):
  """The largest perturbation counted inside `attack`'s ball: eps, float32's
  rounding, and the rounding of images `x` [N, ...] to their type if it is
  narrower (at most a quarter of its machine epsilon a coordinate in [0, 1],
  summed over the coordinates in the norm)."""
  limit = attack.eps * (1 + BALL_TOLERANCE) + 1e-6
  if np.issubdtype(x.dtype, np.floating) and np.finfo(x.dtype).bits < 32:
    rounding = float(np.finfo(x.dtype).eps) / 4
    dims = 1 if attack.norm == "linf" else math.prod(x.shape[1:])
    limit += rounding * (dims if attack.norm == "l1" else math.sqrt(dims))
  return limit


def _program_key(attack):
  """What a compiled program depends on: the attack with its eps left out
  (eps is an argument), but whether it has one kept."""
  return dataclasses.replace(attack, eps=None if attack.eps is None else 0.0)


@functools.cache
def _predict_program(apply_fn, mesh):
  batch = P(parallel.BATCH_AXIS)
  return jax.jit(
    parallel.data_parallel(
      lambda variables, x: jnp.argmax(fastpath.fast(apply_fn)(variables, x), -1),
      mesh,
      in_specs=(P(), batch),
      out_specs=batch,
    )
  )


@functools.cache
def _attack_program(apply_fn, source_apply_fn, stochastic_apply_fn, attack, mesh, staged, keep):
  """Jitted, data-parallel `(variables, source_variables, x, y, index, key,
  stage, round, eps) -> (correct, l2, size[, x_adv if keep])` for `attack`
  (a `_program_key`: its eps comes as an argument)."""

  def device_step(variables, source_variables, x, y, index, key, stage, round_, eps):
    target = lambda xb: fastpath.fast(apply_fn)(variables, xb)  # attacks: fast already
    crafted_on = variables if source_apply_fn is None else source_variables
    model = apply_fn if source_apply_fn is None else source_apply_fn
    if attack.stochastic:
      if stochastic_apply_fn is None:
        logits_fn = lambda xb, k: model(crafted_on, xb)
      else:
        logits_fn = lambda xb, k: stochastic_apply_fn(crafted_on, xb, k)
    else:
      logits_fn = lambda xb: model(crafted_on, xb)
    keys = keys_lib.example_keys(key, index)
    if staged:
      keys = keys_lib.fold(keys, stage)
    with checks.trusted():  # `run` checked the inputs on the host
      if attack.rounds:
        x_adv = attack.round_fn(logits_fn, x, y, keys_lib.fold(keys, round_), eps, round_)
      else:
        x_adv = attack.fn(logits_fn, x, y, keys, eps)
    d = (x_adv.astype(jnp.float32) - x.astype(jnp.float32)).reshape(len(x), -1)
    l2 = jnp.sqrt(jnp.sum(jnp.square(d), -1))
    size = {"linf": jnp.max(jnp.abs(d), -1), "l1": jnp.sum(jnp.abs(d), -1)}.get(attack.norm, l2)
    if attack.stochastic and stochastic_apply_fn is not None:
      # A randomized model is judged as AutoAttack's "rand" judges it: by a
      # draw of it, clean (the same draw for every stage) and attacked.
      judge = _draw_judge(stochastic_apply_fn, variables)
      clean_keys = keys_lib.fold(keys_lib.example_keys(key, index), _CLEAN_DRAW)
      correct = judge(x, clean_keys, y) & judge(x_adv, keys_lib.fold(keys, _ATTACKED_DRAW), y)
    else:
      correct = jnp.argmax(target(x_adv), -1) == y
    return (correct, l2, size, x_adv) if keep else (correct, l2, size)

  batch = P(parallel.BATCH_AXIS)
  return jax.jit(
    parallel.data_parallel(
      device_step,
      mesh,
      in_specs=(P(), P(), batch, batch, batch, P(), P(), P(), P()),
      out_specs=batch,
    )
  )


# The folds of an example's keys that draw the randomized model judging it.
_CLEAN_DRAW, _ATTACKED_DRAW = 2**31 - 1, 2**31 - 2


def _draw_judge(stochastic_apply_fn, variables):
  """`(x [B, ...], keys [B], y) -> correct [B]`: each example classified by
  its own draw of the randomized model."""

  def correct(x, keys, y):
    one = lambda xi, k: stochastic_apply_fn(variables, xi[None], k)[0]
    return jnp.argmax(jax.vmap(one)(x, keys), -1) == y

  return correct


# ----------------------------------------------------------------------------
# Resumable progress.


def _digest(*arrays):
  sha = hashlib.sha256()
  for a in arrays:
    a = np.ascontiguousarray(a)
    sha.update(f"{a.shape}{a.dtype}".encode())
    sha.update(a.tobytes())
  return sha.hexdigest()[:16]


def _fingerprint(variables, x, y, attack_fns, key, source, individual):
  """What an evaluation's result depends on, to refuse a state file of another."""
  leaves = jax.tree.leaves(jax.device_get(variables))
  if source is not None:
    leaves += jax.tree.leaves(jax.device_get(source[1]))
  return {
    "model": _digest(*leaves),
    "data": _digest(x, y),
    "attacks": json.dumps({l: a.spec for l, a in attack_fns.items()}, sort_keys=True, default=str),
    "key": _digest(np.asarray(jax.random.key_data(key))),
    "mode": "individual" if individual else "cascade",
    "format": STATE_FORMAT,
  }


class _State:
  """The progress of an evaluation in a .npz file, rewritten atomically at
  most every `SAVE_SECONDS` (and when asked to: after every round); None
  path: in memory only."""

  def __init__(self, path, fingerprint):
    self.path = None if path is None else Path(path)
    self.fingerprint = fingerprint
    self.arrays = {}
    self.written = time.monotonic()
    if self.path is not None and self.path.exists():
      self.arrays = _read_state(self.path, fingerprint)

  def get(self, name):
    return self.arrays.get(name)

  def put(self, name, value):
    self.arrays[name] = value
    self._write()

  def outcome(self, label, robust, rounds, x=None):
    saved = {f: self.arrays.get(f"{label}/{f}") for f in _OUTCOME_FIELDS}
    if saved["robust"] is None:
      return Outcome.start(robust, rounds, x)
    x_adv = self.arrays.get(f"{label}/x_adv")
    if x is not None and x_adv is None:  # resumed, now keeping the adversarial images
      raise checks.InputError(
        "the evaluation state was written without the adversarial images; "
        "use another --state file or delete this one"
      )
    return Outcome(
      **{f: v for f, v in saved.items() if f != "outside_ball"},
      outside_ball=int(saved["outside_ball"]),
      x_adv=None if x is None else x_adv,
    )

  def save(self, label, outcome, *, force=False):
    if self.path is None or not (force or time.monotonic() - self.written >= SAVE_SECONDS):
      return
    for f in _OUTCOME_FIELDS:
      self.arrays[f"{label}/{f}"] = np.asarray(getattr(outcome, f))
    if outcome.x_adv is not None:
      self.arrays[f"{label}/x_adv"] = outcome.x_adv
    self._write()

  def _write(self):
    if self.path is None:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    tmp = self.path.with_name(f".{self.path.name}.tmp")
    with open(tmp, "wb") as f:
      np.savez(f, __fingerprint__=json.dumps(self.fingerprint), **self.arrays)
    tmp.replace(self.path)
    self.written = time.monotonic()


_OUTCOME_FIELDS = ("robust", "fooled_by", "l2", "size", "attacked", "seconds", "outside_ball")


def _read_state(path, fingerprint):
  try:
    with np.load(path, allow_pickle=False) as archive:
      arrays = {k: archive[k] for k in archive.files}
    saved = json.loads(str(arrays.pop("__fingerprint__")))
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
    raise checks.InputError(
      f"{str(path)!r} is not an evaluation state file (written by --state / state_path); "
      "use another --state file or delete this one"
    ) from None
  for what in ("format", "model", "data", "attacks", "key", "mode"):
    checks.require(
      saved.get(what) == fingerprint[what],
      f"the evaluation state {str(path)!r} belongs to another evaluation "
      f"(its {what} differs); use another --state file or delete this one",
    )
  return arrays
