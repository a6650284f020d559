"""One contract for every registered attack (optax's `alias_test`, for attacks).

Each attack of `jr.attacks.ATTACKS`, built from a tiny spec: it builds from
its own spec and round-trips, hashes, compiles under `jax.jit`, stays in its
ball and in [0, 1], returns the dtype it was given, is deterministic in its
key, treats each example on its own (per-example attacks), and runs through
the command line's evaluation with the sanity checks on."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrobust as jr
from jaxrobust.training import loop as experiment

BALL = dict(norm="linf", eps=0.1)
TINY = {
  "fgsm": dict(BALL),
  "pgd": dict(BALL, steps=2),
  "cw_l2": dict(steps=4, binary_search_steps=2),
  "mi_fgsm": dict(BALL, steps=2),
  "di_fgsm": dict(BALL, steps=2),
  "apgd": dict(BALL, steps=3),
  "apgd_t": dict(BALL, steps=2, num_targets=2),
  "fab": dict(BALL, steps=3),
  "fab_t": dict(BALL, steps=2, num_targets=2),
  "square": dict(BALL, queries=8),
  "autoattack": dict(BALL, steps=2, queries=8, num_targets=2),
  "worst_case": dict(attacks=[dict(name="fgsm", **BALL), dict(name="pgd", steps=2, **BALL)]),
  "max_loss": dict(attacks=[dict(name="fgsm", **BALL), dict(name="pgd", steps=2, **BALL)]),
  "random_choice": dict(attacks=[dict(name="fgsm", **BALL), dict(name="pgd", steps=2, **BALL)]),
  "mixture": dict(
    attacks=[dict(name="fgsm", **BALL), dict(name="pgd", steps=2, **BALL)], weights=[0.5, 0.5]
  ),
}
# Attacks that decide for the batch as a whole (by design): one draw per
# batch, or shares of the batch.
WHOLE_BATCH = ("random_choice", "mixture")


def test_every_registered_attack_has_a_tiny_spec():
  assert set(TINY) == set(jr.attacks.ATTACKS)


@pytest.fixture(scope="module")
def model():
  """A linear model of 10 classes on the 8x8 digits (quick to compile)."""
  w = jax.random.normal(jax.random.key(0), (64, 10))
  x, y = jr.data.load("digits", "test")
  return (lambda xb: xb.reshape(len(xb), -1) @ w), jnp.asarray(x[:6]), jnp.asarray(y[:6])


@pytest.fixture(scope="module", params=sorted(TINY))
def built(request):
  return request.param, jr.attacks.create(request.param, **TINY[request.param])


def test_builds_from_its_spec_and_hashes(built):
  name, attack = built
  assert attack.name == name
  again = jr.attacks.create(**attack.spec)
  assert again == attack and hash(again) == hash(attack)
  assert jr.attacks.create(attack.spec) == attack


def test_jits_stays_in_ball_and_box_and_is_deterministic(built, model):
  name, attack = built
  logits_fn, x, y = model
  keys = jax.random.split(jax.random.key(1), len(x))
  run = jax.jit(lambda x, y, k: attack(logits_fn, x, y, k))
  x_adv = run(x, y, keys)
  assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
  assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
  if attack.norm == "linf" and attack.eps is not None:
    assert float(jnp.max(jnp.abs(x_adv - x))) <= attack.eps + 1e-6
  np.testing.assert_array_equal(run(x, y, keys), x_adv)
  if name not in WHOLE_BATCH:
    # Example 2 alone, with its own key: the same as in the batch.
    np.testing.assert_allclose(run(x[2:3], y[2:3], keys[2:3])[0], x_adv[2], atol=1e-5)


def test_runs_through_the_evaluation_with_sanity_checks(built, trained):
  name, _ = built
  resolved, model, state = experiment.restore(trained)
  spec = {"name": name, **TINY[name]}
  rep = experiment.evaluate(resolved, model, state, specs={name: spec}, limit=8, sanity=True)
  (row,) = rep["results"]
  assert row["name"] == name and 0.0 <= row["accuracy"] <= rep["clean_accuracy"]
  assert rep["sanity"] and all(set(c) == {"check", "passed", "detail"} for c in rep["sanity"])
