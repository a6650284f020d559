"""Square as its authors run it (AutoAttack's square.py, pyautoattack 0.2.0).

Ground truth: the reference's rules written out here (p_selection, the side
of a square, random_int's corner range, the query count, the transposed
eta), its L2 and L1 window move in closed form and, where pyautoattack is
installed, the reference itself: one window move on the same draws, and the
success rate on the same linear model.
"""

import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrobust as jr

sq = importlib.import_module("jaxrobust.attacks.square")
A = jr.attacks
KEY = jax.random.key(0)
BOUNDARIES = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def run(attack, logits_fn, x, y, key=KEY):
  return jax.jit(attack, static_argnums=0)(logits_fn, x, y, key)


def uniform(seed, shape, low=0.0, high=1.0):
  return np.random.default_rng(seed).uniform(low, high, shape).astype(np.float32)


def never_fooled(w):
  """Logits [0, w . x - 100] of class 0: the margin 100 - w . x stays > 0."""
  w = jnp.asarray(w, jnp.float32).reshape(-1)
  return lambda x: jnp.stack([jnp.zeros(len(x)), x.reshape(len(x), -1) @ w - 100.0], -1)


# --- the reference's rules -----------------------------------------------------------


def reference_p(it, queries, rescale, p_init=0.8):
  """p_selection (square.py 192-219): `it` rescaled to int(it / n * 10000),
  then p_init / 2 for 10 < it <= 50, / 4 for 50 < it <= 200, ..., / 512 for
  8000 < it."""
  if rescale:
    it = int(it / queries * 10000)
  bands = list(zip((0,) + BOUNDARIES, BOUNDARIES + (math.inf,)))
  for k, (low, high) in enumerate(bands):
    if low < it <= high:
      return p_init / 2**k
  return p_init


def reference_side(p, shape, norm):
  """square.py 255-256 (L-inf), 341-344 (L2), 460-464 (L1)."""
  h, w, c = shape
  s = max(int(round(math.sqrt(p * (c * h * w) / c))), 1 if norm == "linf" else 3)
  if norm != "linf" and s % 2 == 0:
    s += 1
  return min(s, min(h, w))


def ours_p(i, queries, rescale, p_init=0.8):
  """p at each iteration i (an array or a number)."""
  level = jax.vmap(lambda t: sq._level(t, sq._halvings(queries, rescale)))
  return p_init / 2.0 ** np.asarray(level(jnp.atleast_1d(jnp.asarray(i)))).reshape(np.shape(i))


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("queries", [5000, 10000, 1000, 333, 37, 12345])
def test_p_is_the_references_at_every_iteration(queries, rescale):
  i = np.arange(queries)
  expected = [reference_p(t, queries, rescale) for t in i]
  np.testing.assert_array_equal(ours_p(jnp.asarray(i), queries, rescale), expected)


def test_p_halves_after_iteration_10_not_at_it():
  assert ours_p(10, 5000, False) == 0.8 and ours_p(11, 5000, False) == 0.4
  assert ours_p(8000, 10000, False) == 0.8 / 256 and ours_p(8001, 10000, False) == 0.8 / 512


@pytest.mark.parametrize("rescale", [False, True])
def test_p_is_pyautoattacks_p_selection(rescale):
  square_module = pytest.importorskip("pyautoattack.square")
  for queries in (5000, 777):
    reference = square_module.SquareAttack(None, n_queries=queries, resc_schedule=rescale)
    i = np.arange(queries)
    expected = [reference.p_selection(int(t)) for t in i]
    np.testing.assert_array_equal(ours_p(jnp.asarray(i), queries, rescale), expected)


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
@pytest.mark.parametrize("shape", [(32, 32, 3), (28, 28, 1), (4, 4, 3), (7, 5, 2), (64, 64, 3)])
def test_side_is_the_references(norm, shape):
  # (4, 4, 3) in L2: round(sqrt(0.8 * 16)) = 4, odd 5, then at most 4.
  for p_init in (0.8, 0.05, 1.0):
    expected = [reference_side(p_init / 2**k, shape, norm) for k in range(10)]
    np.testing.assert_array_equal(sq._sides(p_init, shape, norm), expected)


@pytest.mark.parametrize(
  "extent, size",
  [
    (
      32,
      5,
    ),
    (8, 7),
    (8, 8),
    (6, 1),
  ],
)
def test_corner_range_is_random_ints(extent, size):
  # random_int(0, h - s) = floor((h - s) U), U uniform in [0, 1): corners
  # 0..h-s-1, and 0 for a square that fills the axis.
  keys = jax.random.split(KEY, 2000)
  corners = np.asarray(jax.vmap(lambda k: sq._corner(k, extent, size))(keys))
  assert set(corners.tolist()) == set(range(max(extent - size, 1)))


def test_linf_squares_never_reach_the_last_row_and_column():
  # The model reads only the last row and column, which no square of side
  # < 6 reaches: no candidate changes the margin, none is taken, and the
  # result is the start, vertical stripes x + eps s.
  w = np.zeros((6, 6, 3), np.float32)
  last_row, last_column = np.random.default_rng(0).standard_normal((2, 6, 3))
  w[-1, :], w[:, -1] = last_row, last_column
  x = uniform(1, (8, 6, 6, 3), 0.3, 0.7)
  d = np.asarray(run(A.square(eps=0.1, queries=300), never_fooled(w), x, np.zeros(8, int))) - x
  np.testing.assert_allclose(np.abs(d), 0.1, rtol=1e-5)
  np.testing.assert_array_equal(np.sign(d), np.sign(d[:, :1]) * np.ones((1, 6, 1, 1)))


def counted(logits_fn, calls):
  def counting(x):
    jax.debug.callback(lambda v: calls.append(1), jnp.sum(x))
    return logits_fn(x)

  return counting


@pytest.mark.parametrize(
  "norm, queries, restarts",
  # Every count in L-inf, the restarts in every norm; each case compiles a
  # Square, so the other cases run with the slow tests.
  [
    pytest.param(norm, queries, restarts, marks=[pytest.mark.slow] * slow)
    for norm in ("linf", "l2", "l1")
    for (queries, restarts) in ((0, 1), (1, 1), (7, 2))
    for slow in [norm != "linf" and restarts == 1]
  ],
)
def test_queries_are_candidates_after_the_start(norm, queries, restarts):
  # attack_single_run: the start (1 query), then n_queries iterations of one
  # candidate each (square.py 236-243): 1 + n_queries forward passes.
  x = uniform(2, (1, 10, 10, 3), 0.3, 0.7)
  calls = []
  attack = A.square(norm=norm, eps=0.5, queries=queries, restarts=restarts)
  run(attack, counted(never_fooled(np.full(300, 0.01)), calls), x, np.zeros(1, int))
  jax.effects_barrier()
  assert len(calls) == restarts * (1 + queries)


def test_reference_queries_once_per_iteration_after_its_start():
  torch = pytest.importorskip("torch")
  square_module = pytest.importorskip("pyautoattack.square")
  calls = []

  def predict(z):
    calls.append(len(z))
    return torch.stack([torch.zeros(len(z)), z.flatten(1).sum(1) - 1e4], 1)

  reference = square_module.SquareAttack(predict, n_queries=7, eps=0.1, device="cpu")
  x = torch.full((1, 3, 10, 10), 0.5)
  reference.init_hyperparam(x)
  reference.attack_single_run(x, torch.zeros(1, dtype=torch.long))
  assert len(calls) == 1 + 7


@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_start_windows_are_eta_or_its_transpose(norm):
  # square.py 306-320 (L2), 423-439 (L1): each window eta(s) (transposed when
  # torch.rand > 0.5, line 187) times +-1 per channel; L2 scales the grid to
  # eps, L1's eps is large enough that its projection keeps it.
  x = jnp.full((20, 20, 3), 0.5)
  eps = {"l2": 0.5, "l1": 200.0}[norm]
  eta = sq._eta(4, norm)
  transposed = []
  for k in range(8):
    d = np.asarray(sq._grid_start(jax.random.key(k), x, eps, norm=norm) - x)
    d = d / np.abs(d).max()
    for top in range(0, 20, 4):
      for left in range(0, 20, 4):
        window = d[top : top + 4, left : left + 4]
        plain = np.abs(window - window[:1, :1] / eta[0, 0] * eta[:, :, None]).max()
        flipped = np.abs(window - window[:1, :1] / eta[0, 0] * eta.T[:, :, None]).max()
        assert min(plain, flipped) < 1e-5
        transposed.append(flipped < plain)
  assert 0.35 < np.mean(transposed) < 0.65  # 200 windows, each with probability 1/2


# --- the L2 and L1 window move -------------------------------------------------------


def square_mask(top, left, size, shape=(10, 10)):
  mask = np.zeros(shape + (1,), bool)
  mask[top : top + size, left : left + size] = True
  return jnp.asarray(mask)


def moved(norm, eps, delta, transpose=False):
  first, second = square_mask(1, 4, 5), square_mask(3, 0, 5)
  fresh = sq._eta_on_grid(10, 10, 1, 4, 5, transpose, norm)[:, :, None] * jnp.array([1, -1, 1.0])
  return first, second, np.asarray(sq._moved_window(delta, first, second, fresh, eps, norm))


def test_l2_move_keeps_the_budget_per_channel():
  # square.py 360-376: per channel c, ||d'_c[W1]||^2 = (eps^2 - ||d||^2) / C +
  # ||d_c[W1 u W2]||^2, the rest of d untouched, so ||d'|| = eps and the
  # renormalisation to eps shrinks nothing.
  delta = uniform(3, (10, 10, 3), -1, 1) * np.array([1.0, 0.3, 2.0], np.float32)
  delta = 0.8 * delta / np.linalg.norm(delta)
  first, second, new = moved("l2", 1.0, jnp.asarray(delta))
  first, both = np.asarray(first), np.asarray(first | second)
  mass = (1.0 - 0.8**2) / 3 + np.sum(np.square(delta * both), (0, 1))
  np.testing.assert_allclose(np.sum(np.square(new * first), (0, 1)), mass, rtol=1e-5)
  np.testing.assert_array_equal(new[~both[:, :, 0]], delta[~both[:, :, 0]])
  np.testing.assert_array_equal(new[both[:, :, 0] & ~first[:, :, 0]], 0.0)
  np.testing.assert_allclose(np.linalg.norm(new), 1.0, rtol=1e-5)


def test_l1_move_gives_each_channel_c_times_its_share():
  # square.py 480-496: ||d'_c[W1]||_1 = C ((eps - ||d||_1)_+ / C + ||d_c[W1 u W2]||_1).
  delta = uniform(4, (10, 10, 3), -1, 1)
  delta = 5.0 * delta / np.abs(delta).sum()
  first, second, new = moved("l1", 8.0, jnp.asarray(delta), transpose=True)
  first, both = np.asarray(first), np.asarray(first | second)
  mass = 3 * ((8.0 - 5.0) / 3 + np.sum(np.abs(delta * both), (0, 1)))
  np.testing.assert_allclose(np.sum(np.abs(new * first), (0, 1)), mass, rtol=1e-5)
  np.testing.assert_array_equal(new[~both[:, :, 0]], delta[~both[:, :, 0]])


def test_l2_candidate_keeps_the_rest_of_the_perturbation():
  # Away from the box, a candidate differs from the best point only on its
  # two squares and keeps the norm eps.
  x = jnp.asarray(uniform(5, (12, 12, 3), 0.3, 0.7))
  best = sq._grid_start(KEY, x, 0.5, norm="l2")
  for k in range(10):
    candidate = sq._window_propose(jax.random.key(k), x, best, 0.5, 3, norm="l2")
    changed = np.any(np.abs(np.asarray(candidate - best)) > 1e-6, -1)
    assert changed.sum() <= 2 * 3 * 3
    np.testing.assert_allclose(np.linalg.norm(candidate - x), 0.5, rtol=1e-5)


@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_one_window_move_is_the_references(norm, monkeypatch):
  # The reference's start and one iteration on chosen draws (corners, signs,
  # transposes); our move from its start on the same draws gives its candidate.
  torch = pytest.importorskip("torch")
  square_module = pytest.importorskip("pyautoattack.square")
  eps = {"l2": 0.5, "l1": 3.0}[norm]
  seen = []

  def predict(z):
    seen.append(z.clone())
    return torch.stack([torch.full((len(z),), 100.0), torch.zeros(len(z))], 1)

  reference = square_module.SquareAttack(
    predict, norm=norm.upper(), n_queries=1, eps=eps, p_init=0.3, device="cpu"
  )
  untransposed = lambda s: torch.tensor(sq._eta(s, norm))
  for s in (2, 5):  # the reference's eta, in one of its two orientations
    eta = reference.eta(s)
    assert min((eta - untransposed(s)).abs().max(), (eta - untransposed(s).T).abs().max()) < 1e-6
  rng = np.random.default_rng(0)
  flips, signs, corners = [], [], [1, 4, 3, 0]  # W1 at (1, 4), W2 at (3, 0), side 5

  def eta(s):
    flips.append(bool(rng.integers(2)))
    return untransposed(s).T if flips[-1] else untransposed(s)

  def random_choice(shape):
    signs.append(torch.tensor(rng.choice([-1.0, 1.0], shape), dtype=torch.float32))
    return signs[-1]

  monkeypatch.setattr(reference, "eta", eta)
  monkeypatch.setattr(reference, "random_choice", random_choice)
  monkeypatch.setattr(reference, "random_int", lambda low=0, high=1, shape=(1,): corners.pop(0))
  x = torch.tensor(uniform(6, (2, 3, 10, 10), 0.1, 0.9))
  reference.init_hyperparam(x)
  reference.attack_single_run(x, torch.zeros(2, dtype=torch.long))
  start, expected = (np.asarray(s.permute(0, 2, 3, 1)) for s in seen)
  x = np.asarray(x.permute(0, 2, 3, 1))
  fresh = sq._eta_on_grid(10, 10, 1, 4, 5, flips[-1], norm)
  for b in range(2):
    sign = jnp.asarray(signs[-1][b, :, 0, 0].numpy())
    delta = sq._moved_window(
      jnp.asarray(start[b] - x[b]),
      square_mask(1, 4, 5),
      square_mask(3, 0, 5),
      fresh[:, :, None] * sign,
      eps,
      norm,
    )
    got = sq._into_ball(jnp.asarray(x[b]), delta, eps, norm)
    np.testing.assert_allclose(got, expected[b], atol=2e-6)


# --- L1 Square -----------------------------------------------------------------------


def test_l1_square_keeps_the_ball_and_the_box():
  rng = np.random.default_rng(7)
  w = jnp.asarray(rng.standard_normal((10 * 10 * 3, 5)), jnp.float32)
  logits_fn = lambda x: x.reshape(len(x), -1) @ w
  x = np.round(uniform(8, (6, 10, 10, 3)) * 2) / 2  # on the box's faces and inside
  y = np.asarray(jnp.argmax(logits_fn(x), -1))
  x_adv = np.asarray(run(A.square(norm="l1", eps=2.0, queries=60, restarts=2), logits_fn, x, y))
  assert x_adv.min() >= 0 and x_adv.max() <= 1
  l1 = np.abs(x_adv - x).reshape(6, -1).sum(1)
  assert np.all(l1 <= 2.0 * (1 + 1e-5)) and l1.min() > 1.0


@pytest.mark.slow  # 160 examples in each library, to compare two rates
def test_l1_square_succeeds_as_often_as_the_reference():
  # The same linear model and images in both; 160 examples, so each rate has
  # a standard deviation of about 0.04.
  torch = pytest.importorskip("torch")
  square_module = pytest.importorskip("pyautoattack.square")
  n, eps, queries = 160, 1.5, 100
  rng = np.random.default_rng(0)
  w = (4 * rng.standard_normal((300, 10)) / np.sqrt(300)).astype(np.float32)
  x = uniform(9, (n, 10, 10, 3))
  y = (x.reshape(n, -1) @ w).argmax(1)
  w_torch = torch.tensor(w)
  predict = lambda z: z.permute(0, 2, 3, 1).reshape(len(z), -1) @ w_torch
  reference = square_module.SquareAttack(
    predict, norm="L1", n_queries=queries, eps=eps, resc_schedule=False, device="cpu"
  )
  adv = reference.perturb(torch.tensor(x).permute(0, 3, 1, 2).contiguous(), torch.tensor(y))
  reference_rate = np.mean(predict(adv).argmax(1).numpy() != y)
  logits_fn = lambda z: z.reshape(len(z), -1) @ jnp.asarray(w)
  x_adv = run(A.square(norm="l1", eps=eps, queries=queries), logits_fn, x, y)
  rate = np.mean(np.asarray(jnp.argmax(logits_fn(x_adv), -1)) != y)
  assert 0.15 < reference_rate < 0.85
  assert abs(rate - reference_rate) < 0.15


# --- cost ----------------------------------------------------------------------------


@pytest.mark.parametrize(
  "norm, eps",
  [
    ("linf", 0.1),
    pytest.param("l2", 0.5, marks=pytest.mark.slow),
    pytest.param("l1", 2.0, marks=pytest.mark.slow),
  ],
)
def test_a_fooled_example_keeps_its_point_while_the_batch_searches_on(norm, eps):
  # The loop runs until the whole batch is done; an example fooled early
  # gets the same point alone as next to one never fooled (a bright image
  # turns on a bonus for its class 0 that no perturbation turns off).
  w = jnp.asarray(np.random.default_rng(10).standard_normal((8 * 8 * 3, 3)), jnp.float32)

  def logits_fn(x):
    bright = jnp.mean(x, (1, 2, 3)) > 0.6
    return (x.reshape(len(x), -1) @ w).at[:, 0].add(1e3 * bright)

  dark = uniform(11, (16, 8, 8, 3), 0.0, 0.4)
  z = np.sort(np.asarray(logits_fn(dark)), -1)
  easy = dark[np.argmin(z[:, -1] - z[:, -2])]
  x = np.stack([easy, uniform(12, (8, 8, 3), 0.9, 1.0)])
  y = np.asarray(jnp.argmax(logits_fn(x), -1))
  keys = jax.random.split(KEY, 2)
  attack = A.square(norm=norm, eps=eps, queries=200)
  together = np.asarray(run(attack, logits_fn, x, y, keys))
  alone = np.asarray(run(attack, logits_fn, x[:1], y[:1], keys[:1]))
  np.testing.assert_array_equal(together[0], alone[0])
  assert np.argmax(logits_fn(together[:1])) != y[0] and np.argmax(logits_fn(together[1:])) == 0
