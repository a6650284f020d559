"""FAB and FAB-T in the L1 norm (Croce & Hein 2020), as AutoAttack runs them.

Ground truth: scipy's LP for the L1 step onto a hyperplane within the box,
the fractional-knapsack greedy over |w_i| (by hand, with a sort) for a linear
classifier's minimal L1 adversarial, and the authors' own code
(pyautoattack's FAB, where installed) on identical weights.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

import jaxrobust as jr
from jaxrobust import checks
from jaxrobust.attacks.fab import _random_start, project_onto_hyperplane

A = jr.attacks
KEY = jax.random.key(1)


def run(attack, logits_fn, x, y, key=KEY):
  return np.asarray(jax.jit(attack, static_argnums=0)(logits_fn, x, y, key))


def l1(x_adv, x):
  return np.abs(np.asarray(x_adv, np.float64) - x).reshape(len(x), -1).sum(1)


def predicted(logits_fn, x):
  return np.asarray(jnp.argmax(logits_fn(jnp.asarray(x)), -1))


def mlp_weights(num_classes=5, inputs=48, seed=0):
  rng = np.random.default_rng(seed)
  w1 = (4 * rng.standard_normal((inputs, 16)) / np.sqrt(inputs)).astype(np.float32)
  return w1, rng.standard_normal((16, num_classes)).astype(np.float32)


def mlp(num_classes=5, inputs=48, seed=0):
  w1, w2 = mlp_weights(num_classes, inputs, seed)
  return lambda x: jnp.tanh(x.reshape(x.shape[0], -1) @ w1 - 1) @ w2


def lp_step(t, w, b):
  """The smallest ||d||_1 with w . (t + d) = b and t + d in [0, 1] (d = p - q,
  p, q >= 0), or inf when the hyperplane misses the box."""
  n = len(t)
  res = scipy.optimize.linprog(
    np.ones(2 * n),
    A_eq=np.r_[w, -w][None],
    b_eq=[b - w @ t],
    bounds=[(0, 1 - ti) for ti in t] + [(0, ti) for ti in t],
  )
  return res.fun if res.status == 0 else np.inf


def greedy_l1(w, x, c):
  """The smallest ||d||_1 with w . d >= c > 0 and x + d in [0, 1]: the
  coordinates by decreasing |w_i|, each up to its room in the direction of w_i."""
  cap = np.where(w > 0, 1 - x, x)
  total = 0.0
  for i in np.argsort(-np.abs(w)):
    take = min(cap[i], c / abs(w[i])) if w[i] != 0 else 0.0
    total, c = total + take, c - take * abs(w[i])
    if c <= 0:
      return total
  return np.inf


# --- the projection ------------------------------------------------------------


def test_l1_projection_is_the_lp_optimum():
  rng = np.random.default_rng(0)
  for trial in range(60):
    t = rng.uniform(0, 1, 8)
    w = rng.standard_normal(8)
    if trial % 3 == 0:  # a coordinate the hyperplane ignores
      w[trial % 8] = 0.0
    if trial % 4 == 1:  # ties in |w_i|: any split among them is as short
      w[:3] = np.sign(w[:3]) * abs(w[0])
    b = w @ t + rng.standard_normal() * (0.5 if trial % 2 else 3.0)
    f32 = lambda v: jnp.asarray(v, jnp.float32)
    d = np.asarray(project_onto_hyperplane(f32(t), f32(w), f32(b), "l1"), np.float64)
    assert np.all(t + d >= -1e-6) and np.all(t + d <= 1 + 1e-6)
    assert np.all(d[w == 0] == 0)
    exact = lp_step(t, w, b)
    if np.isfinite(exact):  # on the hyperplane, at the minimal L1 distance
      np.testing.assert_allclose(w @ (t + d), b, atol=1e-4)
      np.testing.assert_allclose(np.abs(d).sum(), exact, rtol=1e-5, atol=1e-6)
    else:  # the box's point on the hyperplane's side that is closest to it
      side = np.sign(b - w @ t)
      np.testing.assert_allclose(
        d, np.where(w * side > 0, 1 - t, np.where(w != 0, -t, 0.0)), atol=1e-6
      )


def test_l1_projection_when_already_on_the_hyperplane_or_all_caps_needed():
  t = jnp.array([0.2, 0.5, 0.9])
  w = jnp.array([1.0, -2.0, 0.5])
  on = float(jnp.vdot(w, t))
  np.testing.assert_array_equal(project_onto_hyperplane(t, w, on, "l1"), 0.0)
  # Every coordinate at its cap lands exactly on the hyperplane.
  corner = float(jnp.vdot(w, jnp.array([1.0, 0.0, 1.0])))
  np.testing.assert_allclose(
    project_onto_hyperplane(t, w, corner, "l1"), [0.8, -0.5, 0.1], atol=1e-6
  )


def test_l1_projection_matches_the_reference():
  torch = pytest.importorskip("torch")
  fab_projections = pytest.importorskip("pyautoattack.fab_projections")
  rng = np.random.default_rng(1)
  t = rng.uniform(0, 1, (64, 50)).astype(np.float32)
  w = rng.standard_normal((64, 50)).astype(np.float32)
  w[::5, :10] = 0.0
  b = (np.sum(w * t, 1) + rng.standard_normal(64) * np.r_[0.3, 1.0, 10.0, 30.0].repeat(16)).astype(
    np.float32
  )
  reference = fab_projections.projection_l1(torch.tensor(t), torch.tensor(w), torch.tensor(b))
  d = jax.vmap(project_onto_hyperplane, (0, 0, 0, None))(t, w, b, "l1")
  np.testing.assert_allclose(d, reference.numpy(), atol=1e-5)


def test_l1_restarts_start_at_half_the_radius():
  # As the authors' code: a Gaussian vector over its L1 norm, times the radius.
  x = jnp.full((4, 4, 3), 0.5)
  start = np.asarray(_random_start(jax.random.key(0), x, 0.3, "l1"))
  assert np.count_nonzero(start - 0.5) == x.size  # dense, not a vertex of the ball
  np.testing.assert_allclose(np.abs(start - 0.5).sum(), 0.3, rtol=1e-5)
  np.testing.assert_array_equal(_random_start(jax.random.key(0), x, 0.0, "l1"), x)


# --- the attacks ---------------------------------------------------------------


@pytest.fixture(scope="module")
def near_boundary_2class():
  """48 pixels, logits [0, w . x + b], 24 images of class 0 near the boundary
  and their exact minimal L1 distances (the greedy)."""
  rng = np.random.default_rng(0)
  w = rng.standard_normal(48).astype(np.float32)
  x = rng.uniform(0.2, 0.8, (200, 48)).astype(np.float32)
  b = -float(np.median(x @ w))
  z = x @ w + b
  x = x[np.flatnonzero((z < 0) & (z > -1.5))[:24]]
  minimal = np.array([greedy_l1(w.astype(np.float64), xi, -(xi @ w + b)) for xi in x])
  return w, b, x.reshape(-1, 4, 4, 3), minimal


@pytest.mark.parametrize("name", ["fab", "fab_t"])
def test_fab_l1_reaches_the_minimal_l1_adversarial(linear_model, near_boundary_2class, name):
  w, b, x, minimal = near_boundary_2class
  logits_fn = linear_model(jnp.asarray(w), b)
  y = np.zeros(len(x), np.int32)
  x_adv = run(A.create(name, norm="l1", steps=100), logits_fn, x, y)
  assert np.all(predicted(logits_fn, x_adv) == 1)
  assert x_adv.min() >= 0 and x_adv.max() <= 1
  ratio = l1(x_adv, x) / minimal
  assert ratio.min() >= 1 - 1e-4  # nothing beats the optimum
  assert ratio.max() <= 1.01, ratio.max()  # the overshoot eta keeps it just beyond


def test_fab_l1_with_eps_keeps_ball_and_box():
  logits_fn = mlp()
  x = np.round(np.random.default_rng(2).uniform(0, 1, (6, 4, 4, 3)).astype(np.float32) * 2) / 2
  y = predicted(logits_fn, x)
  eps = 1.0
  for attack in (
    A.fab(norm="l1", eps=eps, steps=20, restarts=2),
    A.fab_t(norm="l1", eps=eps, steps=20, num_targets=2, restarts=2),
  ):
    x_adv = run(attack, logits_fn, x, y)
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert np.all(l1(x_adv, x) <= eps * (1 + 1e-5))
    moved = l1(x_adv, x) > 0
    assert moved.any()
    assert np.all(predicted(logits_fn, x_adv)[moved] != y[moved])


@pytest.mark.slow  # a minute's equivalence run: .ci/run runs it after the fast suite
def test_fab_t_l1_targets_and_rounds():
  # FAB-T over 3 targets is the closest of FAB-T on the 1st, 2nd and 3rd
  # target alone (`first_target`: what its rounds run), kept within eps.
  logits_fn = mlp()
  x = np.random.default_rng(3).uniform(0, 1, (16, 4, 4, 3)).astype(np.float32)
  y = predicted(logits_fn, x)
  eps = 0.8
  settings = dict(norm="l1", steps=30)
  x_adv = run(A.fab_t(eps=eps, num_targets=3, **settings), logits_fn, x, y)
  free = run(A.fab_t(num_targets=3, **settings), logits_fn, x, y)
  within = l1(free, x) <= eps
  assert 0 < within.sum() < len(x)
  np.testing.assert_array_equal(x_adv[within], free[within])
  np.testing.assert_array_equal(x_adv[~within], x[~within])
  alone = [
    run(A.fab_t(eps=eps, num_targets=1, first_target=m, **settings), logits_fn, x, y)
    for m in range(3)
  ]
  per_target = np.stack([l1(a, x) for a in alone])
  np.testing.assert_array_equal((per_target > 0).any(0), within)
  best = np.where(per_target > 0, per_target, np.inf).min(0)
  np.testing.assert_allclose(l1(x_adv, x)[within], best[within], rtol=1e-5)
  # Each target alone reached a class other than y, or left x as it was.
  for a, distance in zip(alone, per_target):
    assert np.all(predicted(logits_fn, a)[distance > 0] != y[distance > 0])
  # The attack's rounds (one program, the round traced) are those targets.
  attack = A.fab_t(eps=eps, num_targets=3, **settings)
  assert attack.rounds == 3
  keys = jax.random.split(KEY, len(x))
  round_fn = jax.jit(lambda m: attack.round_fn(logits_fn, x, y, keys, jnp.float32(eps), m))
  for m in range(3):
    np.testing.assert_allclose(l1(round_fn(m), x), per_target[m], rtol=1e-5, atol=1e-6)


def test_l1_attacks_round_trip_through_their_spec():
  for attack in (
    A.fab(norm="l1"),
    A.fab(norm="L1", eps=2.0, restarts=3),
    A.fab_t(norm=1, eps=5.0, num_targets=9, first_target=1),
    A.fab_t(norm="l1", num_targets=2),
  ):
    assert attack.norm == "l1"
    again = A.create(**attack.spec)
    assert again == attack and hash(again) == hash(attack)


def test_unknown_norm_names_l1():
  with pytest.raises(checks.InputError, match="'l1'"):
    A.fab(norm="l0")


# --- the authors' code ---------------------------------------------------------


@pytest.mark.parametrize("targeted", [False, True])
def test_fab_l1_agrees_with_the_reference(targeted):
  torch = pytest.importorskip("torch")
  fab_pt = pytest.importorskip("pyautoattack.fab_pt")
  w1, w2 = mlp_weights()
  tw1, tw2 = torch.tensor(w1), torch.tensor(w2)
  torch_logits = lambda x: torch.tanh(x.reshape(x.shape[0], -1) @ tw1 - 1) @ tw2
  logits_fn = mlp()
  x = np.random.default_rng(0).uniform(0, 1, (16, 3, 4, 4)).astype(np.float32)
  y = predicted(logits_fn, x)
  # The first run starts at x in both (no random start); eps only filters.
  reference = fab_pt.FABAttack_PT(
    torch_logits, norm="L1", n_iter=50, eps=1e6, targeted=targeted, n_target_classes=1
  )
  x_ref = reference.perturb(torch.tensor(x), torch.tensor(y)).numpy()
  attack = A.fab_t(norm="l1", steps=50, num_targets=1) if targeted else A.fab(norm="l1", steps=50)
  x_adv = run(attack, logits_fn, x, y)
  assert np.all(predicted(logits_fn, x_adv) != y)
  np.testing.assert_allclose(x_adv, x_ref, atol=1e-4)  # float32, 50 steps
  np.testing.assert_allclose(l1(x_adv, x), l1(x_ref, x), rtol=1e-4)


def test_fab_t_l1_with_eps_fools_what_the_reference_fools():
  # AutoAttack's FAB-T: target after target on the examples still robust,
  # keeping the first success within eps; the closest over the targets
  # succeeds on the same examples, never farther.
  torch = pytest.importorskip("torch")
  fab_pt = pytest.importorskip("pyautoattack.fab_pt")
  w1, w2 = mlp_weights()
  tw1, tw2 = torch.tensor(w1), torch.tensor(w2)
  torch_logits = lambda x: torch.tanh(x.reshape(x.shape[0], -1) @ tw1 - 1) @ tw2
  logits_fn = mlp()
  x = np.random.default_rng(0).uniform(0, 1, (16, 3, 4, 4)).astype(np.float32)
  y = predicted(logits_fn, x)
  eps = 1.0
  reference = fab_pt.FABAttack_PT(
    torch_logits, norm="L1", n_iter=50, eps=eps, targeted=True, n_target_classes=3
  )
  x_ref = reference.perturb(torch.tensor(x), torch.tensor(y)).numpy()
  x_adv = run(A.fab_t(norm="l1", eps=eps, steps=50, num_targets=3), logits_fn, x, y)
  fooled = predicted(logits_fn, x_adv) != y
  assert 0 < fooled.sum() < len(x)
  np.testing.assert_array_equal(fooled, predicted(logits_fn, x_ref) != y)
  assert np.all(l1(x_adv, x) <= l1(x_ref, x) * (1 + 1e-4))
