"""The compiled programs of an evaluation: the model's classes, and one round of an attack.

Each builder returns a new jitted, data-parallel function; an `Evaluator`
holds the ones it builds, so that what it compiles is compiled once.
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxrobust import attacks as attacks_lib
from jaxrobust import checks, fastpath, parallel
from jaxrobust import keys as keys_lib
from jaxrobust.types import ApplyFn, Variables

# `(variables, x, key) -> logits`: one random draw of a randomized model.
StochasticApplyFn = Callable[[Variables, jax.Array, jax.Array], jax.Array]

# The folds of an example's keys that draw the randomized model judging it.
CLEAN_DRAW, ATTACKED_DRAW = 2**31 - 1, 2**31 - 2


def program_key(attack: attacks_lib.Attack) -> attacks_lib.Attack:
  """What a compiled attack program depends on.

  Args:
    attack: an attack (a stage of one).

  Returns:
    The attack with its eps left out (eps is an argument of the program),
    but whether it has one kept.
  """
  return dataclasses.replace(attack, eps=None if attack.eps is None else 0.0)


def predict_program(apply_fn: ApplyFn, mesh: Mesh) -> Callable:
  """The model's classes, batches split over `mesh`.

  Args:
    apply_fn: `apply_fn(variables, x) -> logits`.
    mesh: the devices.

  Returns:
    Jitted `(variables, x [B, ...]) -> classes [B]`.
  """
  batch = P(parallel.BATCH_AXIS)
  return jax.jit(
    parallel.data_parallel(
      lambda variables, x: jnp.argmax(fastpath.fast(apply_fn)(variables, x), -1),
      mesh,
      in_specs=(P(), batch),
      out_specs=batch,
    )
  )


def attack_program(
  apply_fn: ApplyFn,
  source_apply_fn: ApplyFn | None,
  stochastic_apply_fn: StochasticApplyFn | None,
  attack: attacks_lib.Attack,
  mesh: Mesh,
  staged: bool,
  keep: bool,
) -> Callable:
  """One round of a stage of an attack, on a batch split over `mesh`.

  The examples are crafted on `source_apply_fn` (transfer) or else on
  `apply_fn`, through `stochastic_apply_fn`'s draws for an attack with EOT,
  and judged by `apply_fn`; a stochastic attack on a randomized model is
  judged as AutoAttack's "rand" judges it, by draws of the model: one clean
  (the same for every stage) and one attacked. Example i's key is
  `fold_in(key, i)`, then folded with the stage (when `staged`) and the
  round.

  Args:
    apply_fn: `(variables, x) -> logits`, the model judged.
    source_apply_fn: `(source_variables, x) -> logits`, the model the
      examples are crafted on; None: `apply_fn`.
    stochastic_apply_fn: `(variables, x, key) -> logits`, one draw of a
      randomized model; None for a deterministic one.
    attack: a `program_key` (its eps comes as an argument).
    mesh: the devices.
    staged: whether the attack is a stage of a staged attack.
    keep: whether to return the adversarial examples too.

  Returns:
    Jitted `(variables, source_variables, x, y, index, key, stage, round,
    eps) -> (correct, l2, size[, x_adv if keep])`, each [B].
  """

  def device_step(variables, source_variables, x, y, index, key, stage, round_, eps):
    crafted_on = variables if source_apply_fn is None else source_variables
    model = apply_fn if source_apply_fn is None else source_apply_fn
    logits_fn = _crafting_logits(model, crafted_on, stochastic_apply_fn, attack.stochastic)
    keys = keys_lib.example_keys(key, index)
    if staged:
      keys = keys_lib.fold(keys, stage)
    with checks.trusted():  # the evaluation checked the inputs on the host
      if attack.rounds:
        assert attack.round_fn is not None
        x_adv = attack.round_fn(logits_fn, x, y, keys_lib.fold(keys, round_), eps, round_)
      else:
        x_adv = attack.fn(logits_fn, x, y, keys, eps)
    d = (x_adv.astype(jnp.float32) - x.astype(jnp.float32)).reshape(len(x), -1)
    l2 = jnp.sqrt(jnp.sum(jnp.square(d), -1))
    size = {"linf": jnp.max(jnp.abs(d), -1), "l1": jnp.sum(jnp.abs(d), -1)}.get(attack.norm, l2)
    if attack.stochastic and stochastic_apply_fn is not None:
      judge = _draw_judge(stochastic_apply_fn, variables)
      clean_keys = keys_lib.fold(keys_lib.example_keys(key, index), CLEAN_DRAW)
      correct = judge(x, clean_keys, y) & judge(x_adv, keys_lib.fold(keys, ATTACKED_DRAW), y)
    else:
      correct = jnp.argmax(fastpath.fast(apply_fn)(variables, x_adv), -1) == y
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


def _crafting_logits(model, variables, stochastic_apply_fn, stochastic):
  """The `logits_fn` an attack crafts its examples on: `(x) -> logits`, or
  `(x, key) -> logits` for an attack with EOT (`stochastic`), whose draws
  are the randomized model's (the same logits every draw without one)."""
  if not stochastic:
    return lambda xb: model(variables, xb)
  if stochastic_apply_fn is None:
    return lambda xb, k: model(variables, xb)
  return lambda xb, k: stochastic_apply_fn(variables, xb, k)


def _draw_judge(stochastic_apply_fn, variables):
  """`(x [B, ...], keys [B], y) -> correct [B]`: each example classified by
  its own draw of the randomized model."""

  def correct(x, keys, y):
    one = lambda xi, k: stochastic_apply_fn(variables, xi[None], k)[0]
    return jnp.argmax(jax.vmap(one)(x, keys), -1) == y

  return correct
