"""A guard against catastrophic overfitting (Wong et al. 2020, Section 5.2).

FGSM adversarial training can overfit catastrophically: within an epoch,
accuracy under PGD collapses towards 0 while accuracy under FGSM soars.
Wong et al. check PGD accuracy on a training minibatch after every epoch and
stop when it falls by more than 0.2 from the previous epoch, keeping the
model of the previous epoch. The run's `overfit_guard` config does the same:

  robust accuracy a_e: PGD-`steps` L-infinity (eps of `train_attack`, step
    eps / 4, one random start) on the first `examples` training images, in
    inference mode, after epoch e;
  collapse: a_e < a_{e-1} - `max_drop` (0.2 in the paper).

While the guard holds, the end of every epoch is checkpointed (the last good
model). When it fires, training stops: the checkpoints written after the last
good epoch are moved aside to `checkpoints/overfit-<step>`, so the newest
checkpoint (what eval.py evaluates) is the last good one; `overfit_guard.json`
in the workdir records every check and the stop, a rerun of the same command
does not train further, and the log says so.
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxrobust import attacks, checks, models
from jaxrobust.training import checkpoints

GUARD_FILE = "overfit_guard.json"
PREFIX = "overfit-"
DEFAULTS = {"examples": 256, "steps": 5, "max_drop": 0.2, "eps": None}


def settings(cfg, attack_cfg):
  """The checked guard settings of config entry `cfg` (None: no guard)."""
  if cfg is None:
    return None
  cfg = dict(cfg)
  checks.known_keys("overfit_guard", cfg, DEFAULTS)
  cfg = {**DEFAULTS, **cfg}
  checks.integer_at_least("overfit_guard.examples", cfg["examples"], 1)
  checks.integer_at_least("overfit_guard.steps", cfg["steps"], 1)
  checks.in_interval("overfit_guard.max_drop", cfg["max_drop"], 0.0, 1.0)
  if cfg["eps"] is None:
    checks.require(
      attack_cfg is not None and "eps" in attack_cfg,
      "overfit_guard needs an eps: set overfit_guard.eps or train_attack.eps",
    )
    cfg["eps"] = attack_cfg["eps"]
  checks.positive("overfit_guard.eps", cfg["eps"])
  return cfg


def make_check(model, x, y, cfg, seed):
  """`check(variables) -> accuracy` (a device scalar): PGD accuracy of `model`
  on the fixed batch (x, y) under the guard's attack."""
  attack = attacks.pgd(norm="linf", eps=cfg["eps"], step_size=cfg["eps"] / 4, steps=cfg["steps"])
  apply_fn = models.inference_fn(model)
  x, y = jnp.asarray(x[: cfg["examples"]]), jnp.asarray(y[: cfg["examples"]])
  key = jax.random.fold_in(jax.random.key(seed), 2)

  @jax.jit
  def check(variables):
    logits_fn = lambda xb: apply_fn(variables, xb)
    x_adv = attack(logits_fn, x, y, key)
    return jnp.mean(jnp.argmax(logits_fn(x_adv), -1) == y)

  return check


def collapsed(previous, current, max_drop):
  """Whether robust accuracy fell by more than `max_drop` since the last check."""
  return previous is not None and current < previous - max_drop


def read(workdir, upto_step):
  """The guard's record for a run resumed at `upto_step`: its checks up to
  that step, and the stop if the guard stopped the run there."""
  path = Path(workdir) / GUARD_FILE
  record = json.loads(path.read_text()) if path.exists() else {"checks": []}
  record["checks"] = [c for c in record["checks"] if c["step"] <= upto_step]
  if record.get("stopped", {}).get("last_good_step") != upto_step:
    record.pop("stopped", None)
  return record


def write(workdir, record):
  checkpoints.write_atomic(Path(workdir) / GUARD_FILE, json.dumps(record, indent=1))


def stop(mgr, record, step, accuracy):
  """Records the stop at `step` and moves aside the checkpoints after the last
  good check. Returns the message to log."""
  good = record["checks"][-1]
  for saved in sorted(mgr.all_steps()):
    if saved > good["step"]:
      checkpoints.move_aside(mgr, saved, PREFIX)
  record["stopped"] = {"step": step, "robust_accuracy": accuracy, "last_good_step": good["step"]}
  return (
    f"catastrophic overfitting: PGD accuracy on the guard's training batch fell "
    f"from {good['robust_accuracy']:.3f} (step {good['step']}) to {accuracy:.3f} at "
    f"step {step}; training stopped, keeping the last good checkpoint (step "
    f"{good['step']}); later checkpoints moved to checkpoints/{PREFIX}<step>"
  )
