"""APGD and APGD-T as the authors' code (pyautoattack 0.2.0) runs them.

Ground truth: the reference's checkpoint counts computed from its own rule,
step-size decisions on scripted losses derived by hand and, where
pyautoattack is installed, the reference code itself run on the same
scripted losses (every decision shows in the final point), the L1
projection against a generic convex solver, the L1 optimum of a linear
model, and success rates beside the reference's on identical weights.
"""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

import jaxrobust as jr
from jaxrobust.attacks import core

apgd_lib = importlib.import_module("jaxrobust.attacks.apgd")
A = jr.attacks
TOL = 1e-5


KEY = jax.random.key(1)


def run(attack, logits_fn, x, y, key=KEY):
  return jax.jit(attack, static_argnums=0)(logits_fn, x, y, key)


def uniform(seed, shape, low=0.0, high=1.0):
  return np.random.default_rng(seed).uniform(low, high, shape).astype(np.float32)


def mlp(seed=0, inputs=48, hidden=16, classes=5):
  """A random tanh network as a JAX and (for the reference) a torch function."""
  rng = np.random.default_rng(seed)
  w1 = (4 * rng.standard_normal((inputs, hidden)) / np.sqrt(inputs)).astype(np.float32)
  w2 = rng.standard_normal((hidden, classes)).astype(np.float32)

  def logits_fn(x):
    return jnp.tanh(x.reshape(x.shape[0], -1) @ w1 - 1) @ w2

  def torch_fn(x):
    import torch

    return torch.tanh(x.reshape(x.shape[0], -1) @ torch.tensor(w1) - 1) @ torch.tensor(w2)

  return logits_fn, torch_fn


def reference():
  return pytest.importorskip("pyautoattack.autopgd_base")


# --- L1 in core: the projections, the direction, the start ---------------------------


def nearest_in_l1_box(x, v, eps):
  """argmin ||d - v||_2 over ||d||_1 <= eps, 0 <= x + d <= 1, by scipy's
  SLSQP on d = p - q with p, q >= 0 (a generic solver, float64)."""
  n = len(v)
  objective = lambda z: np.sum((z[:n] - z[n:] - v) ** 2)
  gradient = lambda z: np.r_[2 * (z[:n] - z[n:] - v), -2 * (z[:n] - z[n:] - v)]
  res = scipy.optimize.minimize(
    objective,
    np.zeros(2 * n),
    jac=gradient,
    bounds=[(0, 1 - t) for t in x] + [(0, t) for t in x],
    constraints=[
      {"type": "ineq", "fun": lambda z: eps - z.sum(), "jac": lambda z: -np.ones(2 * n)}
    ],
    method="SLSQP",
    options={"ftol": 1e-15, "maxiter": 1000},
  )
  return res.x[:n] - res.x[n:]


def test_l1_box_projection_is_the_nearest_point():
  rng = np.random.default_rng(0)
  project = jax.jit(core.project_l1_box)
  for trial in range(40):
    n = 4 + trial % 7
    x = rng.uniform(0, 1, n)
    x[: trial % 3] = trial % 2  # some coordinates on the box's faces
    v = rng.standard_normal(n) * rng.choice([0.1, 1.0, 3.0])
    eps = rng.uniform(0.05, 2.0)
    d = np.asarray(project(jnp.asarray(x, jnp.float32), jnp.asarray(v, jnp.float32), eps))
    assert np.abs(d).sum() <= eps * (1 + TOL)
    assert np.all(x + d >= -TOL) and np.all(x + d <= 1 + TOL)
    np.testing.assert_allclose(d, nearest_in_l1_box(x, v, eps), atol=2e-5)


def test_l1_ball_projection_is_the_nearest_point():
  rng = np.random.default_rng(1)
  for _ in range(20):
    v = rng.standard_normal(9)
    eps = rng.uniform(0.1, 3.0)
    d = np.asarray(core.project(jnp.asarray(v, jnp.float32), eps, "l1"))
    # Duchi et al. 2008: soft-thresholding at the theta that spends eps.
    u = np.sort(np.abs(v))[::-1]
    k = np.nonzero(u - (np.cumsum(u) - eps) / np.arange(1, 10) > 0)[0][-1]
    theta = max((np.cumsum(u)[k] - eps) / (k + 1), 0.0)
    np.testing.assert_allclose(d, np.sign(v) * np.maximum(np.abs(v) - theta, 0), atol=2e-6)


def test_l1_box_projection_equals_the_reference_code():
  ref = reference()
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(2)
  x = np.round(rng.uniform(0, 1, (8, 3, 16, 16)) * 255).astype(np.float32) / 255
  v = rng.standard_normal(x.shape).astype(np.float32)
  v[4:] *= 0.01  # inside the ball: only the box acts
  eps = 12.0
  theirs = v + ref.L1_projection(torch.tensor(x), torch.tensor(v), eps).numpy()
  ours = jax.vmap(core.project_l1_box, (0, 0, None))(jnp.asarray(x), jnp.asarray(v), eps)
  np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_core_l1_direction_and_start():
  g = jnp.array([[0.5, -3.0], [2.0, 3.0]])
  np.testing.assert_array_equal(core.steepest_ascent(g, "l1"), [[0, -1.0], [0, 0]])
  x = jnp.asarray(np.round(uniform(3, (4, 4, 3)) * 2) / 2)
  for seed in range(5):
    d = np.asarray(core.random_start(jax.random.key(seed), x, 2.0, "l1"))
    assert np.abs(d).sum() <= 2.0 * (1 + TOL)
    assert np.all(x + d >= 0) and np.all(x + d <= 1)
