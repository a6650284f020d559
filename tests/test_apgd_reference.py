"""APGD and APGD-T as the authors' code (pyautoattack 0.2.0) runs them.

Ground truth: the reference's checkpoint counts computed from its own rule,
step-size decisions on scripted losses derived by hand and, where
pyautoattack is installed, the reference code itself run on the same
scripted losses (every decision shows in the final point), the L1
projection against a generic convex solver, the L1 optimum of a linear
model, and success rates beside the reference's on identical weights.
"""

import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

import jaxrobust as jr
from jaxrobust import checks
from jaxrobust.attacks import core, losses

from test_autoattack import KEY, TOL, run, uniform  # noqa: F401  (shared helpers)

apgd_lib = importlib.import_module("jaxrobust.attacks.apgd")
iteration = importlib.import_module("jaxrobust.attacks.apgd_iteration")

A = jr.attacks


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


# --- the step-size rule: checkpoints, condition 1, the first window -------------


def reference_checkpoints(n_iter):
  """The iterations after which the reference checks its step size, by its
  own rule (autopgd_base.py lines 153-155, 298, 403-405, 424, 438)."""
  k = max(int(0.22 * n_iter), 1)
  n_iter_min = max(int(0.06 * n_iter), 1)
  size_decr = max(int(0.03 * n_iter), 1)
  points, counter3 = [], 0
  for i in range(n_iter):
    counter3 += 1
    if counter3 == k:
      points.append(i + 1)
      k = max(k - size_decr, n_iter_min)
      counter3 = 0
  return points


@pytest.mark.parametrize("steps", [1, 2, 3, 5, 10, 20, 50, 100, 1000])
def test_checkpoints_are_the_reference_counts(steps):
  assert apgd_lib.checkpoints(steps) == reference_checkpoints(steps)
  # L1 (lines 301, 405, 438): every max(floor(0.04 N), 1) iterations.
  every = max(int(0.04 * steps), 1)
  assert apgd_lib.checkpoints(steps, "l1") == list(range(every, steps + 1, every))


def test_checkpoints_known_values():
  assert apgd_lib.checkpoints(50) == [11, 21, 30, 38, 45]
  assert apgd_lib.checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
  assert apgd_lib.checkpoints(10) == [2, 3, 4, 5, 6, 7, 8, 9, 10]


def scripted(values):
  """`value_and_grad(delta, step)` whose loss at iterate `step` is
  values[step] and whose gradient is 0 (the point stays; only the step-size
  rule acts)."""
  values = jnp.asarray(values, jnp.float32)
  return lambda delta, step: ((values[step], jnp.array(False)), jnp.zeros_like(delta))


def final_eta(values, steps=100, norm="linf", eps=0.1):
  x = jnp.full((4,), 0.5)
  s = iteration.iterate(scripted(values), x, jnp.zeros(4), eps, norm, steps, 0.75)
  return float(s["eta"])


@pytest.mark.parametrize("rises, halves", [(11, True), (12, True), (13, False)])
def test_step_halves_when_at_most_rho_of_the_window_rose(rises, halves):
  # 100 steps: checkpoints 22, 41, 57, ... The third window (iterates 42 to
  # 57) has 16 steps; the reference halves when t <= 0.75 * 16 (line 171):
  # at exactly 12 rises too. Everywhere else the loss rises to new maxima, so
  # no other checkpoint halves.
  values = list(range(42))  # iterates 0..41: rising
  for j in range(16):  # iterates 42..57: `rises` rises, then falls
    values.append(values[-1] + (1.0 if j < rises else -0.5))
  values += [100.0 + k for k in range(58, 101)]
  assert final_eta(values) == pytest.approx(0.1 if halves else 0.2)


@pytest.mark.parametrize("first, halves", [(1.0, False), (-1.0, True)])
def test_first_window_compares_the_first_loss_with_zero(first, halves):
  # The reference's loss_steps[-1] is its zero-filled last row (lines 169,
  # 233): the first window's first comparison is f(x^(1)) > 0, whatever
  # f(x^(0)). Here f(x^(0)) = 50 > f(x^(1)); 16 of the next 21 steps rise,
  # so the first window (22 steps, threshold 16.5) halves iff f(x^(1)) <= 0.
  values = [50.0, first]
  for j in range(21):
    values.append(values[-1] + (1.0 if j < 16 else -0.5))
  values += [60.0 + k for k in range(23, 101)]
  assert final_eta(values) == pytest.approx(0.1 if halves else 0.2)


class Scripted:
  """A torch model whose cross-entropy for class 0 at its n-th call is
  values[n] and whose input gradient points along signs[n] (the reference
  calls it once per iterate, `eot_iter` times with EOT)."""

  def __init__(self, values, signs):
    import torch

    self.torch = torch
    self.values, self.signs, self.calls = torch.tensor(values), torch.tensor(signs), 0

  def __call__(self, x):
    torch = self.torch
    value, sign = self.values[self.calls], self.signs[self.calls]
    self.calls += 1
    logit = torch.log(torch.expm1(value))  # CE of class 0 with logits [0, t]
    linear = (x.reshape(x.shape[0], -1) * sign).sum(1)
    return torch.stack([torch.zeros_like(logit), logit + linear - linear.detach()], 1)


def script(seed, calls, batch, dims):
  """Random losses (rising with probability 0.75, positive, distinct) and
  gradients (random signs and magnitudes) for `calls` calls."""
  rng = np.random.default_rng(seed)
  moves = rng.uniform(0.01, 1.0, (calls, batch)) * np.where(
    rng.uniform(size=(calls, batch)) < 0.75, 1.0, -1.0
  )
  values = np.maximum(5.0 + np.cumsum(moves, 0), 0.05).astype(np.float32)
  signs = rng.choice([-1.0, 1.0], (calls, batch, dims)) * rng.uniform(
    0.5, 2.0, (calls, batch, dims)
  )
  return values, signs.astype(np.float32)


def scripted_jax(values, signs):
  """The JAX side of `Scripted` for one example (values [calls], signs [calls, d])."""
  return lambda delta, step: ((values[step], values[step] > jnp.log(2.0)), signs[step])


@pytest.mark.parametrize("norm, steps", [("Linf", 10), ("Linf", 50), ("L2", 20), ("L2", 100)])
def test_step_size_decisions_equal_the_reference_code(norm, steps):
  ref = reference()
  batch, dims = 48, 8
  values, signs = script(steps, steps + 1, batch, dims)
  x = np.full((batch, dims), 0.5, np.float32)
  eps = 0.5 if norm == "Linf" else 1.0
  attack = ref.APGDAttack(Scripted(values, signs), n_iter=steps, norm=norm, eps=eps, device="cpu")
  tx = attack.model.torch.tensor(x)
  attack.init_hyperparam(tx)
  x_best, _, loss_best, _ = attack.attack_single_run(
    tx, attack.model.torch.zeros(batch).long(), x_init=tx.clone()
  )

  def one(xi, v, g):
    s = iteration.iterate(
      scripted_jax(v, g), xi, jnp.zeros_like(xi), eps, norm.lower(), steps, 0.75
    )
    return xi + s["best"], s["best_value"]

  ours, value = jax.jit(jax.vmap(one, (0, 1, 1)))(x, values, signs)
  # The best point is where the last halvings and restarts left the iterate:
  # one decision unlike the reference's moves it far.
  np.testing.assert_allclose(ours, x_best.numpy(), atol=TOL)
  np.testing.assert_allclose(value, loss_best.numpy(), rtol=1e-5)


# --- EOT: the gradient is the mean over draws, the loss the last draw's -----------


def test_eot_value_is_the_last_draws_and_the_gradient_the_mean():
  w = jnp.asarray(uniform(0, (6, 3), -1, 1))

  def logits_one(v, key):  # the weights and the logits vary per draw
    noise = jax.random.normal(key, (6, 3))
    return v @ (w + noise) + 3 * jax.random.normal(jax.random.fold_in(key, 1), (3,))

  objective = lambda z: (losses.cross_entropy(z, 0), jnp.argmax(z) != 0)
  x = jnp.asarray(uniform(1, (6,)))
  key, draws, step = jax.random.key(3), 5, 7
  value_and_grad = iteration.value_and_grad(logits_one, objective, x, key, draws)
  delta = jnp.full((6,), 0.01)
  (value, success), grad = value_and_grad(delta, step)
  keys = jax.random.split(jax.random.fold_in(key, step), draws)
  per_draw = [objective(logits_one(x + delta, k)) for k in keys]
  grads = [jax.grad(lambda d, k=k: objective(logits_one(x + d, k))[0])(delta) for k in keys]
  np.testing.assert_allclose(value, per_draw[-1][0], rtol=1e-6)
  assert bool(success) == bool(per_draw[-1][1])
  np.testing.assert_allclose(grad, np.mean(grads, 0), rtol=1e-5, atol=1e-6)
  assert abs(float(value) - np.mean([v for v, _ in per_draw])) > 0.1  # the rules differ here


@pytest.mark.parametrize(
  "norm, steps", [("Linf", 20), pytest.param("L2", 50, marks=pytest.mark.slow)]
)
def test_eot_equals_the_reference_code(norm, steps):
  # eot_iter = 4 draws per iterate: the reference's scripted model at call
  # 4 k + j, ours at the j-th key of iterate k (looked up by its key data).
  ref = reference()
  batch, dims, draws = 32, 8, 4
  calls = (steps + 1) * draws
  values, signs = script(steps + 1, calls, batch, dims)
  x = np.full((batch, dims), 0.5, np.float32)
  eps = 0.5 if norm == "Linf" else 1.0
  attack = ref.APGDAttack(
    Scripted(values, signs), n_iter=steps, norm=norm, eps=eps, eot_iter=draws, device="cpu"
  )
  tx = attack.model.torch.tensor(x)
  attack.init_hyperparam(tx)
  x_best = attack.attack_single_run(tx, attack.model.torch.zeros(batch).long(), x_init=tx.clone())[
    0
  ]

  def one(xi, v, g, key):
    keys = jax.vmap(lambda k: jax.random.split(jax.random.fold_in(key, k), draws))(
      jnp.arange(steps + 1)
    )
    table = jax.random.key_data(keys).reshape(calls, -1)

    def logits_one(z, draw_key):
      call = jnp.argmax(jnp.all(table == jax.random.key_data(draw_key), -1))
      linear = jnp.sum(z * g[call])
      logit = jnp.log(jnp.expm1(v[call])) + linear - jax.lax.stop_gradient(linear)
      return jnp.stack([0.0, logit])

    objective = lambda z: (losses.cross_entropy(z, 0), jnp.argmax(z) != 0)
    value_and_grad = iteration.value_and_grad(logits_one, objective, xi, key, draws)
    s = iteration.iterate(value_and_grad, xi, jnp.zeros_like(xi), eps, norm.lower(), steps, 0.75)
    return xi + s["best"]

  keys = jax.random.split(jax.random.key(0), batch)
  ours = jax.jit(jax.vmap(one, (0, 1, 1, 0)))(x, values, signs, keys)
  np.testing.assert_allclose(ours, x_best.numpy(), atol=TOL)


# --- L1: the projection, the step, the schedule -------------------------------------


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


@pytest.mark.parametrize("largereps", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_apgd_l1_keeps_ball_and_box(largereps):
  logits_fn = mlp()[0]
  x = np.round(uniform(2, (6, 4, 4, 3)) * 2) / 2  # pixels on the box's faces
  y = np.asarray(jnp.argmax(logits_fn(x), -1))
  for attack in (
    A.apgd(norm="l1", eps=1.5, steps=12, use_largereps=largereps, restarts=2),
    A.apgd_t(norm="L1", eps=1.5, steps=12, num_targets=2, use_largereps=largereps),
  ):
    x_adv = np.asarray(run(attack, logits_fn, x, y))
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert np.all(np.abs(x_adv - x).reshape(6, -1).sum(1) <= 1.5 * (1 + TOL))
    assert np.all((x_adv != x).reshape(6, -1).sum(1) > 0)


def test_apgd_l1_reaches_the_optimum_of_a_linear_model():
  # Logits [0, w.x + b], never fooled within the ball, so APGD maximises
  # w.d over ||d||_1 <= eps and the box: the optimum fills the coordinates of
  # largest |w_i| up to the box, in that order (a fractional knapsack).
  rng = np.random.default_rng(0)
  w = rng.standard_normal(48).astype(np.float32)
  x = uniform(0, (16, 4, 4, 3))
  eps = 3.0
  optimum = []
  for xi in x.reshape(16, -1):
    room, total, left = np.where(w > 0, 1 - xi, xi), 0.0, eps
    for i in np.argsort(-np.abs(w)):
      take = min(room[i], left)
      total, left = total + abs(w[i]) * take, left - take
    optimum.append(total)
  optimum = np.array(optimum)
  b = -float((x.reshape(16, -1) @ w + optimum).max()) - 2
  logits_fn = lambda z: jnp.stack([jnp.zeros(z.shape[0]), z.reshape(z.shape[0], -1) @ w + b], -1)
  x_adv = run(A.apgd(norm="l1", eps=eps, steps=100), logits_fn, x, np.zeros(16, np.int32))
  ratio = np.asarray(x_adv - x).reshape(16, -1) @ w / optimum
  assert ratio.max() <= 1 + 1e-4  # nothing beats the optimum
  assert np.median(ratio) >= 0.999 and ratio.min() >= 0.95


@pytest.mark.parametrize("largereps", [False, True])
@pytest.mark.parametrize("steps", [20, pytest.param(100, marks=pytest.mark.slow)])
def test_l1_schedule_equals_the_reference_code(monkeypatch, largereps, steps):
  # The reference counts ||x_best - x||_0 on x + d_u + d_p, whose rounding
  # leaves ~1e-8 in coordinates the projection zeroed; counted without
  # that noise (|.| > 1e-6), its sparsity schedule is ours. A few examples
  # still part where rounding decides whether a coordinate ends at 0.
  ref = reference()
  torch = pytest.importorskip("torch")
  monkeypatch.setattr(ref, "L0_norm", lambda v: (v.abs() > 1e-6).reshape(v.shape[0], -1).sum(-1))
  batch, dims, eps = 64, 8, 1.0
  values, signs = script(steps, steps + 3, batch, dims)
  x = uniform(steps, (batch, dims))
  gaussian = np.random.default_rng(steps + 1).standard_normal((batch, dims)).astype(np.float32)
  attack = ref.APGDAttack(
    Scripted(values, signs), n_iter=steps, norm="L1", eps=eps, device="cpu", use_largereps=largereps
  )
  tx, ty = torch.tensor(x), torch.zeros(batch).long()
  attack.init_hyperparam(tx)
  monkeypatch.setattr(torch, "randn", lambda *a, **k: torch.tensor(gaussian))
  monkeypatch.setattr(torch, "randn_like", lambda *a, **k: torch.tensor(gaussian))
  if largereps:
    iters = [math.ceil(0.3 * steps)] * 2
    stages = ([3 * eps, 2 * eps, eps], iters + [steps - sum(iters)])
    x_best = attack.decr_eps_pgd(tx, ty, *stages)[0].numpy()
  else:
    x_best = attack.attack_single_run(tx, ty)[0].numpy()
  # Our start from the same Gaussian: the key stands in for it.
  monkeypatch.setattr(
    iteration, "start", lambda g, xi, e, norm: iteration.projection(xi, e, norm)(g)
  )

  def one(xi, v, g, start):
    s = iteration.final_state(
      scripted_jax(v, g), xi, start, eps, norm="l1", steps=steps, rho=0.75, use_largereps=largereps
    )
    return xi + s["best"]

  ours = jax.jit(jax.vmap(one, (0, 1, 1, 0)))(x, values, signs, gaussian)
  agree = np.abs(np.asarray(ours) - x_best).max(1) <= TOL
  assert agree.mean() >= 0.9, agree.mean()


@pytest.mark.slow  # two success rates, each library on the same many examples
def test_apgd_l1_success_rate_equals_the_reference_code():
  ref = reference()
  torch = pytest.importorskip("torch")
  logits_fn, torch_fn = mlp(seed=1, classes=10)
  x = uniform(4, (400, 4, 4, 3))
  y = np.asarray(jnp.argmax(logits_fn(x), -1))
  robust = lambda x_adv: np.mean(np.asarray(jnp.argmax(logits_fn(jnp.asarray(x_adv)), -1)) == y)
  ours = robust(run(A.apgd(norm="l1", eps=0.5, steps=50, use_largereps=True), logits_fn, x, y))
  attack = ref.APGDAttack(torch_fn, n_iter=50, norm="L1", eps=0.5, use_largereps=True, device="cpu")
  theirs = robust(attack.perturb(torch.tensor(x), torch.tensor(y).long()).detach().numpy())
  assert 0.2 < theirs < 0.8  # a radius at which the attacks can differ
  # Two standard errors of a difference of two independent runs' rates.
  assert abs(ours - theirs) <= 2 * np.sqrt(2 * theirs * (1 - theirs) / len(x))


def test_l1_settings():
  a = A.apgd(norm="L1", eps=12.0, steps=10, use_largereps=True, restarts=5)
  assert a.norm == "l1" and a.options["use_largereps"] is True
  assert A.create(**a.spec) == a
  t = A.apgd_t(norm=1, eps=12.0, num_targets=5, use_largereps=True)
  assert A.create(**t.spec) == t and t.norm == "l1"
  assert A.apgd(eps=0.1).options["use_largereps"] is False
  assert apgd_lib.largereps_stages(100) == ((3.0, 30), (2.0, 30), (1.0, 40))
  assert apgd_lib.largereps_stages(5) == ((3.0, 2), (2.0, 2), (1.0, 1))


@pytest.mark.parametrize(
  "build, message",
  [
    (lambda: A.apgd(eps=0.1, use_largereps=True), "use_largereps.*norm='l1'"),
    (lambda: A.apgd_t(eps=0.1, norm="l2", use_largereps=True), "use_largereps"),
    (lambda: A.apgd(eps=0.1, norm="l1", use_largereps=1), "use_largereps must be True or False"),
    (lambda: A.apgd(eps=0.1, norm="l1", steps=1, use_largereps=True), "steps.*>= 2"),
    (lambda: A.pgd(eps=0.1, norm="l1"), "unknown norm 'l1' for this attack"),
    (lambda: A.apgd(eps=0.1, norm="l3"), "unknown norm 'l3'.*'l1'"),
  ],
)
def test_bad_settings(build, message):
  with pytest.raises(checks.InputError, match=message):
    build()


# --- the zero-gradient check ----------------------------------------------------------


def test_zero_gradient_fraction():
  w = jnp.asarray(np.random.default_rng(0).standard_normal((48, 4)), jnp.float32)
  x = uniform(0, (8, 4, 4, 3))
  # Half the batch pushed where every ReLU is off: constant logits there.
  x[4:] = 0.0
  shift = jnp.where(jnp.arange(8) < 4, 0.0, -100.0)[:, None]
  relu_model = lambda z: jax.nn.relu(z.reshape(z.shape[0], -1) @ w + 3.0 + shift[: z.shape[0]])
  y = np.asarray(jnp.argmax(relu_model(x), -1))
  fraction = apgd_lib.zero_gradient_fraction
  assert float(fraction(relu_model, x, y)) == 0.5
  assert float(fraction(relu_model, x, y, loss="dlr_t")) == 0.5
  assert float(fraction(relu_model, x, y, loss="ce")) == 0.5
  rounded = lambda z: jnp.round(z.reshape(z.shape[0], -1) * 255) / 255 @ w
  assert float(fraction(rounded, x, y)) == 1.0
  # At APGD's starts (random points of the ball), as the reference checks it.
  assert float(fraction(rounded, x, y, key=jax.random.key(0), eps=0.03)) == 1.0
  smooth = mlp(classes=4)[0]
  assert float(fraction(smooth, x[:4], y[:4], key=jax.random.key(0), eps=0.03)) == 0.0
