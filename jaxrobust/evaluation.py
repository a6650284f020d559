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
import weakref
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxrobust import attacks as attacks_lib
from jaxrobust import checks, data, fastpath, inference, parallel
from jaxrobust import keys as keys_lib

# Float rounding allowed on the ball's radius when judging an adversarial example.
BALL_TOLERANCE = 1e-4
# The smallest batch a device gets for a stage's last few examples.
MIN_PER_DEVICE = 8


def build_attacks(specs):
  """`{label: Attack}` from `{label: spec}` (a spec: `{"name": ..., **settings}`,
  or an `Attack` already)."""
  return {
    label: spec if isinstance(spec, attacks_lib.Attack) else attacks_lib.create(spec)
    for label, spec in specs.items()
  }


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
    attacked: bool [stages, N], the examples each stage ran on.
    seconds: float [stages], the time each stage took.
    outside_ball: adversarial examples found outside the ball (not counted).
  """

  robust: np.ndarray
  fooled_by: np.ndarray
  l2: np.ndarray
  size: np.ndarray
  attacked: np.ndarray
  seconds: np.ndarray
  outside_ball: int = 0

  @classmethod
  def start(cls, robust, stages):
    n = len(robust)
    return cls(
      robust=robust.copy(),
      fooled_by=np.full(n, -1, np.int32),
      l2=np.full(n, np.nan, np.float32),
      size=np.full(n, np.nan, np.float32),
      attacked=np.zeros((stages, n), bool),
      seconds=np.zeros(stages),
    )


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
      a randomized model, for attacks with EOT (`Attack.stochastic`).
    individual: run every attack on all clean-correct examples, not only on
      those the attacks of its threat model before it left robust.
    state_path: a file to write the progress to after every batch, and to
      resume from (refused if it belongs to another evaluation).
    log: optional `log(message)` for progress lines.
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
  source_apply_fn, source_variables = source or (None, None)
  state = _State(state_path, _fingerprint(variables, x, y, attack_fns, key, source, individual))
  log = log or (lambda message: None)

  clean = state.get("clean")
  if clean is None:
    clean = predictions(apply_fn, variables, x, batch_size=batch, mesh=mesh) == y
    state.put("clean", clean)
  if stochastic_apply_fn is None and any(a.stochastic for a in attack_fns.values()):
    log("warning: attacks with EOT on a deterministic model: every draw is the same")

  robust_of = {}
  outcomes = {}
  for index, (label, attack) in enumerate(attack_fns.items()):
    group = threat_model(attack)
    stages = attack.stages or (attack,)
    start = clean if individual else robust_of.get(group, clean)
    outcome = state.outcome(label, start, len(stages))
    attack_key = jax.random.fold_in(key, index)
    for j, stage in enumerate(stages):
      todo = np.flatnonzero((outcome.robust | (outcome.fooled_by == j)) & ~outcome.attacked[j])
      if len(todo) == 0:
        continue
      program = _attack_program(
        apply_fn,
        source_apply_fn,
        stochastic_apply_fn,
        _program_key(stage),
        mesh,
        bool(attack.stages),
      )
      eps = None if stage.eps is None else jnp.float32(stage.eps)
      began = time.perf_counter()
      begin = 0
      for count, compiled in _parts(len(todo), batch, devices):
        chosen, begin = todo[begin : begin + count], begin + count
        # A part smaller than its batch repeats examples, then drops them.
        padded = np.resize(chosen, compiled)
        arrays = data.to_devices((x[padded], y[padded], padded.astype(np.int32)), mesh)
        correct, l2, size = jax.device_get(
          program(variables, source_variables, *arrays, attack_key, jnp.int32(j), eps)
        )
        correct, l2, size = correct[: len(chosen)], l2[: len(chosen)], size[: len(chosen)]
        inside = size <= (np.inf if stage.eps is None else _ball_limit(stage, x))
        fooled = ~correct & inside
        outcome.outside_ball += int(np.sum(~correct & ~inside))
        if np.any(~correct & ~inside):
          log(
            f"warning: {label}{'' if len(stages) == 1 else ' ' + stage.label} found "
            f"{int(np.sum(~correct & ~inside))} adversarial examples outside its ball "
            f"({stage.norm} {stage.eps:g}; largest {np.max(size[~correct & ~inside]):.6g}): "
            "not counted (outside_ball)"
          )
        hit = chosen[fooled]
        outcome.robust[hit] = False
        outcome.fooled_by[hit] = j
        outcome.l2[hit], outcome.size[hit] = l2[fooled], size[fooled]
        outcome.attacked[j, chosen] = True
        outcome.seconds[j] += time.perf_counter() - began
        began = time.perf_counter()
        state.save(label, outcome)
      log(
        f"{label}{'' if len(stages) == 1 else ' ' + stage.label}: robust accuracy "
        f"{outcome.robust.mean():.2%} after {outcome.seconds[j]:.1f} s on {len(todo)} examples"
      )
    outcomes[label] = outcome
    if not individual:
      robust_of[group] = outcome.robust
  return clean, outcomes


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


def evaluate(apply_fn, variables, x, y, attacks, *, individual=False, **options):
  """Runs the attacks (`run`, which takes the same arguments) and returns the report.

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
  clean, outcomes = run(apply_fn, variables, x, y, attack_fns, individual=individual, **options)
  rep = report(clean, outcomes, attack_fns, individual=individual)
  rep["seconds"] = time.perf_counter() - began
  return rep


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
    _constant_apply(logits_fn), {}, x, y, {"attack": attack}, key=key, batch_size=batch_size
  )
  return rep["results"][0]["accuracy"]


_CONSTANT_APPLY = weakref.WeakKeyDictionary()


def _constant_apply(logits_fn):
  """`(variables, x) -> logits_fn(x)`, the same object for the same `logits_fn`."""
  if logits_fn not in _CONSTANT_APPLY:
    # A weak reference: the entry must not keep its own key alive.
    ref = weakref.ref(logits_fn)
    _CONSTANT_APPLY[logits_fn] = lambda variables, x: ref()(x)
  return _CONSTANT_APPLY[logits_fn]


def report(clean, outcomes, attack_fns, *, individual=False):
  """The JSON-ready summary of `run`'s results (see `evaluate`)."""
  rows, groups = [], {}
  for label, attack in attack_fns.items():
    o = outcomes[label]
    fooled = o.fooled_by >= 0
    stages = attack.stages or (attack,)
    robust_after = [(o.robust | (o.fooled_by > j)).mean() for j in range(len(stages))]
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
            "attacked": int(o.attacked[j].sum()),
            "seconds": float(o.seconds[j]),
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
    "threat_model": {"linf": "Linf", "l2": "L2"}.get(r["norm"], r["norm"]),
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
  narrower (at most a quarter of its machine epsilon a coordinate in [0, 1])."""
  limit = attack.eps * (1 + BALL_TOLERANCE) + 1e-6
  if np.issubdtype(x.dtype, np.floating) and np.finfo(x.dtype).bits < 32:
    rounding = float(np.finfo(x.dtype).eps) / 4
    dims = 1 if attack.norm == "linf" else math.prod(x.shape[1:])
    limit += rounding * math.sqrt(dims)
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
def _attack_program(apply_fn, source_apply_fn, stochastic_apply_fn, attack, mesh, staged):
  """Jitted, data-parallel `(variables, source_variables, x, y, index, key,
  stage, eps) -> (correct, l2, size)` for `attack` (a `_program_key`: its
  eps comes as an argument)."""

  def device_step(variables, source_variables, x, y, index, key, stage, eps):
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
      x_adv = attack.fn(logits_fn, x, y, keys, eps)
    d = (x_adv.astype(jnp.float32) - x.astype(jnp.float32)).reshape(len(x), -1)
    l2 = jnp.sqrt(jnp.sum(jnp.square(d), -1))
    size = jnp.max(jnp.abs(d), -1) if attack.norm == "linf" else l2
    return jnp.argmax(target(x_adv), -1) == y, l2, size

  batch = P(parallel.BATCH_AXIS)
  return jax.jit(
    parallel.data_parallel(
      device_step, mesh, in_specs=(P(), P(), batch, batch, batch, P(), P(), P()), out_specs=batch
    )
  )


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
  }


class _State:
  """The progress of an evaluation in a .npz file, rewritten atomically
  after every batch; None path: in memory only."""

  def __init__(self, path, fingerprint):
    self.path = None if path is None else Path(path)
    self.fingerprint = fingerprint
    self.arrays = {}
    if self.path is not None and self.path.exists():
      self.arrays = _read_state(self.path, fingerprint)

  def get(self, name):
    return self.arrays.get(name)

  def put(self, name, value):
    self.arrays[name] = value
    self._write()

  def outcome(self, label, robust, stages):
    saved = {f: self.arrays.get(f"{label}/{f}") for f in _OUTCOME_FIELDS}
    if saved["robust"] is None:
      return Outcome.start(robust, stages)
    return Outcome(
      **{f: v for f, v in saved.items() if f != "outside_ball"},
      outside_ball=int(saved["outside_ball"]),
    )

  def save(self, label, outcome):
    for f in _OUTCOME_FIELDS:
      self.arrays[f"{label}/{f}"] = np.asarray(getattr(outcome, f))
    self._write()

  def _write(self):
    if self.path is None:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    tmp = self.path.with_name(f".{self.path.name}.tmp")
    with open(tmp, "wb") as f:
      np.savez(f, __fingerprint__=json.dumps(self.fingerprint), **self.arrays)
    tmp.replace(self.path)


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
  for what in ("model", "data", "attacks", "key", "mode"):
    checks.require(
      saved.get(what) == fingerprint[what],
      f"the evaluation state {str(path)!r} belongs to another evaluation "
      f"(its {what} differs); use another --state file or delete this one",
    )
  return arrays
