"""One contract for every attack (optax's `alias_test`, for attacks).

Every registered attack of `jr.attacks.ATTACKS` (the combinators among them),
a per-example random choice and every AutoAttack version, built from a tiny
spec: it builds from its own spec and round-trips (equal, hash equal),
compiles under `jax.jit`, stays in its ball and in [0, 1], returns the dtype
it was given, is deterministic in its key, treats each example on its own
(example i's output does not change when the other examples change), says
what it needs (gradients, a stochastic model), and runs through
`jaxrobust.evaluation.evaluate` and the command line's evaluation with the
sanity checks on."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrobust as jr
from jaxrobust import evaluation
from jaxrobust.training import loop as experiment

A = jr.attacks
BALL = dict(norm="linf", eps=0.1)
PARTS = [dict(name="fgsm", **BALL), dict(name="pgd", steps=2, **BALL)]
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
  "worst_case": dict(attacks=PARTS),
  "max_loss": dict(attacks=PARTS),
  "random_choice": dict(attacks=PARTS),
  "mixture": dict(attacks=PARTS, weights=[0.5, 0.5]),
}
# Cases beyond one per registered attack: {case: spec}.
EXTRA = {
  "random_choice_per_example": dict(name="random_choice", attacks=PARTS, per_example=True),
  "worst_case_of_square": dict(name="worst_case", attacks=[PARTS[0], dict(name="square", **BALL)]),
  **{
    f"autoattack_{version}": dict(name="autoattack", **TINY["autoattack"], version=version)
    for version in A.AUTOATTACK_VERSIONS
    if version != "standard"  # the default: "autoattack"
  },
}
CASES = {**{name: dict(name=name, **spec) for name, spec in TINY.items()}, **EXTRA}
# Attacks that decide for the batch as a whole (by design): one draw per
# batch, or shares of the batch.
WHOLE_BATCH = ("random_choice", "mixture")
GRADIENT_FREE = ("square",)  # the attacks that read no gradient


def test_every_registered_attack_and_autoattack_version_is_in_the_contract():
  assert set(TINY) == set(A.ATTACKS)
  assert set(A.COMBINATORS) <= set(TINY)
  versions = {s.get("version", "standard") for s in CASES.values() if s["name"] == "autoattack"}
  assert versions == set(A.AUTOATTACK_VERSIONS)


W = jax.random.normal(jax.random.key(0), (64, 10))


def linear(xb):
  """A linear model of 10 classes on the 8x8 digits (quick to compile)."""
  return xb.reshape(len(xb), -1) @ W


def logits_fn_for(attack):
  """The model as the attack calls it: `logits_fn(x, key)` when stochastic."""
  return (lambda xb, key: linear(xb)) if attack.stochastic else linear


@pytest.fixture(scope="module")
def data():
  x, y = jr.data.load("digits", "test")
  return jnp.asarray(x[:6]), jnp.asarray(y[:6]), jnp.asarray(x[6:12]), jnp.asarray(y[6:12])


@pytest.fixture(scope="module", params=sorted(CASES))
def built(request):
  return request.param, A.create(CASES[request.param])


def test_builds_from_its_spec_and_round_trips(built):
  case, attack = built
  assert attack.name == CASES[case]["name"] and isinstance(attack, A.Attack)
  again = A.create(**attack.spec)
  assert again == attack and hash(again) == hash(attack)
  assert A.create(attack.spec) == attack and again.spec == attack.spec
  if attack.takes_eps and attack.eps is not None:
    # eps is the threat model's alone: another eps, the same settings (program).
    wider = A.create(**{**attack.spec, "eps": 2 * attack.eps})
    assert wider != attack and wider.eps == 2 * attack.eps and wider.settings == attack.settings
  # What it is, for the evaluation: typed, set at construction.
  assert isinstance(attack.uses_gradients, bool) and isinstance(attack.stochastic, bool)
  assert attack.label and (attack.eps is None or attack.norm in A.NORMS)
  leaves = attack.parts or (attack,)
  assert attack.uses_gradients == any(p.name not in GRADIENT_FREE for p in leaves)
  assert attack.stochastic == (case == "autoattack_rand")


def test_jits_stays_in_ball_and_box_is_deterministic_and_per_example(built, data):
  case, attack = built
  x, y, other_x, other_y = data
  logits_fn = logits_fn_for(attack)
  keys = jax.random.split(jax.random.key(1), len(x))
  run = jax.jit(lambda x, y, k: attack(logits_fn, x, y, k))
  x_adv = run(x, y, keys)
  assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
  assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
  if attack.eps is not None:
    order = {"linf": np.inf, "l2": 2, "l1": 1}[attack.norm]
    sizes = np.linalg.norm(np.asarray(x_adv - x).reshape(len(x), -1), ord=order, axis=1)
    assert sizes.max() <= attack.eps * (1 + 1e-5) + 1e-6
  np.testing.assert_array_equal(run(x, y, keys), x_adv)
  if attack.name not in WHOLE_BATCH or attack.options.get("per_example"):
    # Example 2 with every other example changed: the same output.
    changed_x, changed_y = other_x.at[2].set(x[2]), other_y.at[2].set(y[2])
    np.testing.assert_allclose(run(changed_x, changed_y, keys)[2], x_adv[2], atol=1e-5)


def test_runs_through_evaluate(built, data):
  _, attack = built
  x, y, _, _ = data
  variables = {"w": W}
  apply_fn = lambda v, xb: xb.reshape(len(xb), -1) @ v["w"]
  stochastic = (lambda v, xb, key: apply_fn(v, xb)) if attack.stochastic else None
  rep = evaluation.evaluate(
    apply_fn,
    variables,
    x,
    y,
    {"a": attack},
    key=jax.random.key(0),
    batch_size=6,
    stochastic_apply_fn=stochastic,
  )
  (row,) = rep["results"]
  assert row["name"] == attack.name and 0.0 <= row["accuracy"] <= rep["clean_accuracy"]
  assert [s["stage"] for s in row["stages"]] == [s.label for s in attack.stages or (attack,)]


@pytest.mark.parametrize(
  "name",
  [n if n == "pgd" else pytest.param(n, marks=pytest.mark.slow) for n in sorted(TINY)],
)  # one attack in the fast suite, every attack in the slow one (.ci/run runs both)
def test_runs_through_the_command_line_evaluation_with_sanity_checks(name, trained):
  resolved, model, state = experiment.restore(trained)
  spec = {"name": name, **TINY[name]}
  rep = experiment.evaluate(resolved, model, state, specs={name: spec}, limit=8, sanity=True)
  (row,) = rep["results"]
  assert row["name"] == name and 0.0 <= row["accuracy"] <= rep["clean_accuracy"]
  assert rep["sanity"] and all(set(c) == {"check", "passed", "detail"} for c in rep["sanity"])
