"""The attack suite: C&W L2, MI-FGSM, M-DI2-FGSM, APGD and the combinators.

Closed forms on linear models, equivalences between attacks, exact shares of a
mixture, targets reached and strength on a small trained model, ball and box
invariants, loop forms, and bad input.
"""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxrobust as jr
from jaxrobust import checks
from jaxrobust.attacks import combinators, core, momentum
from jaxrobust.attacks.apgd import checkpoints

TOL = 1e-5  # float32 rounding of x + d - x
A = jr.attacks


KEY = jax.random.key(1)


def run(attack, logits_fn, x, y, key=KEY):
  return jax.jit(attack, static_argnums=0)(logits_fn, x, y, key)


def uniform(seed, shape, low=0.0, high=1.0):
  """Test data from numpy (compiling jax.random for each shape costs ~1 s)."""
  return jnp.asarray(np.random.default_rng(seed).uniform(low, high, shape), jnp.float32)


def normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def mlp(num_classes=4, inputs=64):
  """A random tanh network on flattened inputs: nonlinear, and quick to compile."""
  w1 = 4 * normal(0, (inputs, 16)) / np.sqrt(inputs)
  w2 = normal(1, (16, num_classes))
  return lambda x: jnp.tanh(x.reshape(x.shape[0], -1) @ w1 - 2) @ w2


def edge_batch(n=6):
  """8x8 images with about half the pixels at 0 or 1, where the box binds."""
  return jnp.round(uniform(0, (n, 8, 8, 1)) * 2) / 2


def correct(logits_fn, x, y):
  return np.asarray(jnp.argmax(logits_fn(x), -1) == y)


@pytest.fixture(scope="module")
def digits_mlp():
  """A 64-32-10 MLP trained on the digits for 200 full-batch Adam steps (~99 %
  test accuracy), and 100 test examples."""
  x, y = jr.data.load("digits", "train")
  x_test, y_test = jr.data.load("digits", "test")
  params = {
    "w1": 0.1 * normal(0, (64, 32)),
    "b1": jnp.zeros(32),
    "w2": 0.1 * normal(1, (32, 10)),
    "b2": jnp.zeros(10),
  }

  def apply(p, x):
    hidden = jax.nn.relu(x.reshape(x.shape[0], -1) @ p["w1"] + p["b1"])
    return hidden @ p["w2"] + p["b2"]

  opt = optax.adam(0.01)

  @jax.jit
  def train(p):
    def step(state, _):
      p, s = state
      g = jax.grad(
        lambda p: optax.softmax_cross_entropy_with_integer_labels(apply(p, x), y).mean()
      )(p)
      updates, s = opt.update(g, s)
      return (optax.apply_updates(p, updates), s), None

    return jax.lax.scan(step, (p, opt.init(p)), None, 200)[0][0]

  params = train(params)
  return (lambda x: apply(params, x)), jnp.asarray(x_test[:100]), jnp.asarray(y_test[:100])


# --- C&W L2 ---------------------------------------------------------------


def test_cw_finds_the_closest_point_of_a_linear_classifier(linear_model):
  # Points at known distances t from the boundary w.x + b = 0 (moving along
  # w / ||w||, away from the box's faces): the minimal L2 perturbation that
  # flips the class has norm |w.x + b| / ||w|| = |t|.
  w = normal(0, (6, 6, 1))
  b = -0.3
  u = w / jnp.linalg.norm(w)
  q = uniform(2, (6, 6, 6, 1), 0.4, 0.6)
  on_boundary = q - ((jnp.sum(q * w, (1, 2, 3)) + b) / jnp.sum(w * w))[:, None, None, None] * w
  t = jnp.array([0.08, -0.1, 0.15, -0.2, 0.25, -0.3])
  x = on_boundary + t[:, None, None, None] * u
  logits_fn = linear_model(w, b)
  y = jnp.argmax(logits_fn(x), -1)
  minimal = jnp.abs(jnp.sum(x * w, (1, 2, 3)) + b) / jnp.linalg.norm(w)
  np.testing.assert_allclose(minimal, jnp.abs(t), rtol=1e-4)

  x_adv = run(A.cw_l2(steps=100, binary_search_steps=9), logits_fn, x, y)
  distance = jnp.linalg.norm((x_adv - x).reshape(6, -1), axis=1)
  assert not correct(logits_fn, x_adv, y).any()
  assert np.all(distance >= minimal * (1 - 1e-4))  # nothing beats the optimum
  np.testing.assert_allclose(distance, minimal, rtol=0.01)

  # With eps, only the examples whose closest adversarial lies within eps move.
  bounded = run(A.cw_l2(steps=100, binary_search_steps=9, eps=0.18), logits_fn, x, y)
  inside = np.asarray(jnp.abs(t) < 0.18)
  np.testing.assert_array_equal(bounded[~inside], x[~inside])
  np.testing.assert_allclose(bounded[inside], x_adv[inside], atol=1e-6)


def test_cw_defaults_work_at_short_step_counts(digits_mlp, linear_model):
  # Issue 23: at lr = 0.01 whatever the steps, 20 steps fooled almost none of
  # the digits (Adam moves w by about lr a step: too little to reach the
  # boundary). lr = 10 / steps keeps the reach of the paper's 1000 steps; a
  # short momentum (beta1 = 0.5) and c judged by each run's last iterate let
  # 20 steps settle near the closest point.
  logits_fn, x, y = digits_mlp
  ok = correct(logits_fn, x, y)
  distances = {}
  for steps in (20, 100):
    x_adv = run(A.cw_l2(steps=steps), logits_fn, x, y)
    fooled = ~correct(logits_fn, x_adv, y) & ok
    assert fooled.sum() >= 0.95 * ok.sum(), (steps, fooled.sum(), ok.sum())
    distances[steps] = np.median(
      np.linalg.norm(np.asarray(x_adv - x).reshape(len(x), -1), axis=1)[fooled]
    )
  assert distances[20] <= 1.25 * distances[100], distances
  target = A.targets.random_other(jax.random.key(0), y, 10)
  x_adv = run(A.cw_l2(steps=20, targeted=True), logits_fn, x, target)
  assert np.mean(np.asarray(jnp.argmax(logits_fn(x_adv), -1) == target)[ok]) >= 0.9

  # Near the closest point of a linear classifier already at 20 steps.
  w, b = normal(0, (6, 6, 1)), -0.3
  q = uniform(2, (6, 6, 6, 1), 0.4, 0.6)
  on_boundary = q - ((jnp.sum(q * w, (1, 2, 3)) + b) / jnp.sum(w * w))[:, None, None, None] * w
  t = jnp.array([0.08, -0.1, 0.15, -0.2, 0.25, -0.3])
  x = on_boundary + t[:, None, None, None] * w / jnp.linalg.norm(w)
  linear = linear_model(w, b)
  y = jnp.argmax(linear(x), -1)
  x_adv = run(A.cw_l2(steps=20), linear, x, y)
  assert not correct(linear, x_adv, y).any()
  ratio = np.linalg.norm(np.asarray(x_adv - x).reshape(6, -1), axis=1) / np.abs(t)
  assert np.median(ratio) <= 1.01 and ratio.max() <= 1.1, ratio


def test_cw_default_learning_rate_is_10_over_steps():
  logits_fn, x, y = mlp(), edge_batch(), jnp.arange(6) % 4
  settings = dict(steps=40, binary_search_steps=2, c=1.0)
  np.testing.assert_array_equal(
    run(A.cw_l2(**settings), logits_fn, x, y), run(A.cw_l2(lr=0.25, **settings), logits_fn, x, y)
  )


def test_cw_returns_x_where_it_fails_and_reaches_targets():
  w = normal(0, (3, 16))
  logits_fn = lambda x: 10 * x.reshape(x.shape[0], -1) @ w.T
  x = uniform(1, (6, 4, 4, 1))
  label = jnp.argmax(logits_fn(x), -1)
  # One Adam step with a tiny c moves nothing across the boundary.
  failed = run(A.cw_l2(steps=1, binary_search_steps=1, c=1e-6), logits_fn, x, label)
  np.testing.assert_array_equal(failed, x)
  target = (label + 1 + jnp.arange(6) % 2) % 3
  for schedule in ({"steps": 100}, {"steps": 50, "schedule": "constant", "overshoot": 0.0}):
    x_adv = run(
      A.cw_l2(binary_search_steps=5, lr=0.05, kappa=1.0, targeted=True, **schedule),
      logits_fn,
      x,
      target,
    )
    np.testing.assert_array_equal(jnp.argmax(logits_fn(x_adv), -1), target)
    # kappa: the target wins by more than kappa.
    z = logits_fn(x_adv)
    assert np.all(z[jnp.arange(6), target] - jax.vmap(A.losses.other_max)(z, target) > 1.0)


# --- MI-FGSM and M-DI2-FGSM ------------------------------------------------


@pytest.mark.parametrize("norm, eps", [("linf", 0.1), ("l2", 0.5)])
def test_mi_fgsm_without_momentum_is_iterated_fgsm(norm, eps):
  logits_fn = mlp()
  x = uniform(0, (5, 8, 8, 1))
  y = jnp.arange(5) % 4
  mi = run(A.mi_fgsm(eps=eps, steps=4, decay=0.0, norm=norm), logits_fn, x, y)
  fgsm = run(
    A.pgd(eps=eps, steps=4, step_size=eps / 4, random_start=False, norm=norm), logits_fn, x, y
  )
  np.testing.assert_allclose(mi, fgsm, atol=1e-6)


def test_di_without_transformation_is_mi_fgsm():
  logits_fn = mlp()
  x = uniform(0, (5, 8, 8, 1))
  y = jnp.arange(5) % 4
  key = jax.random.key(7)
  mi = run(A.mi_fgsm(eps=0.1, steps=3), logits_fn, x, y, key)
  np.testing.assert_array_equal(
    run(A.di_fgsm(eps=0.1, steps=3, prob=0.0), logits_fn, x, y, key), mi
  )
  assert not np.array_equal(run(A.di_fgsm(eps=0.1, steps=3, prob=1.0), logits_fn, x, y, key), mi)


def test_di_transformation_shrinks_and_pads():
  image = uniform(0, (20, 20, 2), 0.5, 1.0)
  rate = 0.6
  for i in range(10):
    draws = uniform(i, (4,))
    out = momentum.random_resize_and_pad(draws, image, prob=1.0, resize_rate=rate)
    assert out.shape == image.shape
    shown = np.asarray(out[..., 0] > 0)
    rows, cols = np.flatnonzero(shown.any(1)), np.flatnonzero(shown.any(0))
    # One contiguous block of size in [rate * 20, 20], the rest zero ...
    assert np.all(shown[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]) and shown.sum() == (
      len(rows) * len(cols)
    )
    assert np.all(np.diff(rows) == 1) and 20 * rate - 1 <= len(rows) <= 20
    assert abs(len(rows) - len(cols)) <= 1
    # ... whose pixels are pixels of the image (nearest neighbour, no blending).
    block = np.asarray(out)[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    assert np.isin(block, np.asarray(image)).all()
  untouched = momentum.random_resize_and_pad(
    jnp.array([0.7, 0.2, 0.5, 0.5]), image, prob=0.5, resize_rate=rate
  )
  np.testing.assert_array_equal(untouched, image)


@pytest.mark.parametrize(
  "name, settings",
  [
    ("mi_fgsm", dict(eps=0.1, steps=3, norm="l2")),
    ("di_fgsm", dict(eps=0.1, steps=3, prob=0.7)),
  ],
)
def test_unrolled_and_fori_loop_forms_agree(name, settings):
  logits_fn = mlp()
  x = uniform(0, (4, 8, 8, 1))
  y = jnp.arange(4)
  looped = run(A.create(name, unroll=False, **settings), logits_fn, x, y)
  unrolled = run(A.create(name, unroll=True, **settings), logits_fn, x, y)
  np.testing.assert_allclose(looped, unrolled, atol=1e-6)


def test_canonical_convolutions():
  # XLA:CPU runs a convolution fast only in canonical form (kernel [..., in,
  # out]: "01io"), and only canonicalises convolutions outside loops itself.
  # The input gradient's convolution is not canonical ("01oi").
  x = normal(0, (2, 3, 9, 10))
  kernel = normal(1, (6, 3, 3, 2))
  conv = lambda x: jax.lax.conv_general_dilated(  # NCHW, OIHW, strides, dilations
    x,
    kernel,
    (2, 1),
    ((1, 2), (0, 1)),
    lhs_dilation=(1, 2),
    rhs_dilation=(2, 1),
    dimension_numbers=("NCHW", "OIHW", "NHWC"),
  )
  gradient = jax.grad(lambda x: jnp.sum(jnp.sin(conv(x))))
  for f in (conv, gradient):
    np.testing.assert_allclose(
      jax.jit(core.canonical_convolutions(f))(x), jax.jit(f)(x), rtol=1e-4, atol=1e-4
    )

  # The attacks' loop bodies hold only canonical convolutions (every attack
  # of the suite takes its gradients through the same helper).
  kernel = normal(1, (3, 3, 1, 2))
  logits_fn = lambda x: jax.lax.conv_general_dilated(
    x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  ).mean((1, 2))
  x, y = edge_batch(2), jnp.arange(2)
  hlo = (
    jax.jit(A.mi_fgsm(eps=0.1, steps=2), static_argnums=0)
    .lower(logits_fn, x, y, jax.random.key(0))
    .compile()
    .as_text()
  )
  assert re.search(r"while\(", hlo)
  assert set(re.findall(r"dim_labels=\w+_(\w+)->", hlo)) == {"01io"}


# --- APGD --------------------------------------------------------------------


def test_apgd_checkpoints():
  assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
  assert checkpoints(5) == [1, 2, 3, 4, 5]  # the reference's integer counting
  assert checkpoints(1) == [1]


@pytest.mark.parametrize("norm, eps", [("linf", 0.1), ("l2", 0.5)])
def test_apgd_at_least_as_strong_as_pgd(digits_mlp, norm, eps):
  logits_fn, x, y = digits_mlp
  pgd = correct(logits_fn, run(A.pgd(norm=norm, eps=eps, steps=10), logits_fn, x, y), y)
  apgd = correct(logits_fn, run(A.apgd(norm=norm, eps=eps, steps=10), logits_fn, x, y), y)
  assert 0.1 < pgd.mean() < 0.6  # a budget at which the attacks can differ
  assert apgd.mean() <= pgd.mean()


def test_apgd_linear_optimum(linear_model):
  # On a linear 2-class model the L-inf optimum is x + eps sign(w) for y = 0.
  w = normal(0, (6, 6, 1))
  x = uniform(2, (4, 6, 6, 1), 0.3, 0.7)
  y = jnp.zeros(4, jnp.int32)
  logits_fn = linear_model(w)
  x_adv = run(A.apgd(eps=0.1, steps=10), logits_fn, x, y)
  np.testing.assert_allclose(x_adv, x + 0.1 * jnp.sign(w), atol=TOL)


def test_apgd_dlr_reaches_targets():
  w = normal(0, (5, 16))
  logits_fn = lambda x: x.reshape(x.shape[0], -1) @ w.T
  x = uniform(1, (10, 4, 4, 1))
  target = (jnp.argmax(logits_fn(x), -1) + 1 + jnp.arange(10) % 4) % 5
  x_adv = run(A.apgd(norm="l2", eps=4.0, steps=20, loss="dlr", targeted=True), logits_fn, x, target)
  np.testing.assert_array_equal(jnp.argmax(logits_fn(x_adv), -1), target)


def test_dlr_loss():
  z = jnp.array([3.0, 1.0, 0.0, -1.0])
  np.testing.assert_allclose(A.losses.dlr(z, 0), -(3 - 1) / (3 - 0))
  np.testing.assert_allclose(A.losses.dlr(z, 2), -(0 - 3) / (3 - 0))
  np.testing.assert_allclose(A.losses.dlr(5 * z + 2, 2), A.losses.dlr(z, 2), rtol=1e-6)
  np.testing.assert_allclose(A.losses.dlr_targeted(z, 1), (3 - 1) / (3 - (0 - 1) / 2))


# --- combinators ---------------------------------------------------------------


def spy(value, seen):
  """An attack that records the batch sizes it is traced with and returns a
  constant image, so the output shows which attack handled each example."""

  def attack(logits_fn, x, y, key, eps):
    seen.append((x.shape[0], y.shape[0], key.shape[0]))
    return jnp.full_like(x, value)

  return A.Attack(attack, name="spy", settings=(("value", value),))


def test_share_sizes_round_by_largest_remainder():
  assert combinators.share_sizes((0.25, 0.25, 0.5), 10) == [3, 2, 5]
  assert combinators.share_sizes((0.5, 0.5), 7) == [4, 3]
  assert combinators.share_sizes((0.3, 0.7), 10) == [3, 7]
  assert combinators.share_sizes((0.0, 1.0), 5) == [0, 5]
  assert combinators.share_sizes((1 / 3,) * 3, 10) == [4, 3, 3]


def test_mixture_gives_each_attack_exactly_its_share():
  logits_fn = mlp()
  x, y = edge_batch(10), jnp.arange(10) % 4
  seen = [[], [], [], []]
  weights = [0.25, 0.25, 0.5, 0.0]
  mix = A.mixture(attacks=[spy(0.1 * (j + 1), seen[j]) for j in range(4)], weights=weights)
  outputs = [run(mix, logits_fn, x, y, jax.random.key(k)) for k in range(3)]
  assert seen == [[(3, 3, 3)], [(2, 2, 2)], [(5, 5, 5)], []]  # traced once, on its share
  for out in outputs:
    handled_by = np.round(np.asarray(out[:, 0, 0, 0]) * 10).astype(int) - 1
    np.testing.assert_array_equal(np.bincount(handled_by, minlength=4), [3, 2, 5, 0])
  assert len({tuple(np.asarray(o[:, 0, 0, 0])) for o in outputs}) > 1  # random shares
  np.testing.assert_array_equal(outputs[0], run(mix, logits_fn, x, y, jax.random.key(0)))


def test_mixture_runs_each_attack_on_its_share_only():
  # The real thing: each example's output is that of the attack it went to,
  # run on the share alone with the example's key folded with the attack's index.
  logits_fn = mlp()
  x, y = edge_batch(8), jnp.arange(8) % 4
  keys = jax.random.split(jax.random.key(3), 8)
  pgd = A.pgd(eps=0.1, steps=2)
  mi = A.mi_fgsm(eps=0.05, steps=2)
  out = run(A.mixture(attacks=[pgd, mi], weights=[0.5, 0.5]), logits_fn, x, y, keys)
  size = jnp.abs(out - x).reshape(8, -1).max(1)
  to_pgd = np.flatnonzero(size > 0.05 + TOL)
  assert len(to_pgd) == 4
  fold = lambda k, j: jax.vmap(jax.random.fold_in, (0, None))(k, j)
  np.testing.assert_allclose(
    out[to_pgd], run(pgd, logits_fn, x[to_pgd], y[to_pgd], fold(keys[to_pgd], 0)), atol=1e-6
  )


def test_worst_case_is_at_most_every_attack(digits_mlp):
  logits_fn, x, y = digits_mlp
  attacks = [
    A.fgsm(eps=0.05),
    A.pgd(eps=0.05, steps=3, random_start=False),
    A.mi_fgsm(eps=0.05, steps=3),
    A.fgsm(eps=0.5, norm="l2"),
  ]
  worst = run(A.worst_case(attacks=attacks), logits_fn, x, y)
  singles = [run(a, logits_fn, x, y) for a in attacks]
  robust = correct(logits_fn, worst, y)
  per_attack = np.stack([correct(logits_fn, s, y) for s in singles])
  assert 0 < per_attack.mean() < 1  # some fooled, some not
  np.testing.assert_array_equal(robust, per_attack.all(0))  # per example
  assert all(robust.mean() <= p.mean() for p in per_attack)
  # Where every attack fails, the worst case keeps the highest loss.
  loss = lambda xa: jax.vmap(A.losses.cross_entropy)(logits_fn(xa), y)
  highest = np.max([loss(s) for s in singles], 0)
  np.testing.assert_allclose(loss(worst)[robust], highest[robust], rtol=1e-6)


def test_max_loss_picks_the_larger_loss_where_worst_case_picks_the_first_fooled(linear_model):
  # Two fixed "attacks" on the linear model [0, w.x]: each adds its own
  # per-example shift along w. Logit z = w.x; true class 0, so an output
  # fools the model iff z > 0, and its loss is CE = log(1 + e^z).
  w = jnp.ones((2, 2, 1)) / 4  # z = mean pixel value
  logits_fn = linear_model(w)
  x = jnp.full((4, 2, 2, 1), 0.5)
  y = jnp.zeros(4, jnp.int32)
  shift_a = jnp.asarray([0.1, 0.3, -0.3, -0.2])  # example 0: both fool, b more
  shift_b = jnp.asarray([0.2, 0.1, -0.1, -0.4])  # 1: both fool, a more; 2, 3: none
  first = A.Attack(lambda f, x, y, key, eps: x + shift_a[:, None, None, None] - 0.5, name="a")
  second = A.Attack(lambda f, x, y, key, eps: x + shift_b[:, None, None, None] - 0.5, name="b")
  # Ground truth in numpy: z = shift, loss = log(1 + e^z), per example.
  z = np.stack([np.asarray(shift_a), np.asarray(shift_b)])
  loss = np.log1p(np.exp(z))
  fooled = z > 0
  expected_max = np.argmax(loss, 0)
  expected_worst = np.where(fooled.any(0), np.argmax(fooled, 0), np.argmax(loss, 0))
  assert list(expected_max) == [1, 0, 1, 0] and list(expected_worst) == [0, 0, 1, 0]
  outputs = np.stack([np.asarray(a.fn(None, x, y, None, None)) for a in (first, second)])
  for combinator, expected in ((A.max_loss, expected_max), (A.worst_case, expected_worst)):
    out = np.asarray(run(combinator(attacks=[first, second]), logits_fn, x, y))
    np.testing.assert_array_equal(out, outputs[expected, np.arange(4)])


def test_max_loss_is_an_attack_built_by_create():
  parts = [
    {"name": "pgd", "norm": "l2", "eps": 0.5, "steps": 2},
    {"name": "pgd", "norm": "linf", "eps": 0.1, "steps": 2},
  ]
  attack = A.create("max_loss", attacks=parts)
  assert isinstance(attack, A.Attack) and attack.name == "max_loss"
  assert attack.norm is None and attack.stages == ()  # no shared ball, no cascade
  assert A.create(**attack.spec) == attack
  assert A.max_loss(attacks=[A.create(p) for p in parts]) == attack


@pytest.mark.parametrize("per_example", [False, True])
def test_random_choice(per_example):
  logits_fn = mlp()
  x, y = edge_batch(16), jnp.arange(16) % 4
  seen = [[], []]
  attack = A.random_choice(
    attacks=[spy(0.25, seen[0]), spy(0.75, seen[1])], per_example=per_example
  )
  picks = np.stack(
    [np.asarray(run(attack, logits_fn, x, y, jax.random.key(k)))[:, 0, 0, 0] for k in range(8)]
  )
  assert set(np.unique(picks)) == {0.25, 0.75}
  if per_example:
    assert not all(len(set(p)) == 1 for p in picks)  # examples draw independently
  else:
    assert all(len(set(p)) == 1 for p in picks)  # one attack for the whole batch
  assert seen == [[(16, 16, 16)], [(16, 16, 16)]]


def test_create_builds_combinators_recursively():
  logits_fn = mlp()
  x, y = edge_batch(6), jnp.arange(6) % 4
  spec = {
    "name": "worst_case",
    "attacks": [
      {"name": "fgsm", "eps": 0.05},
      {
        "name": "mixture",
        "weights": [0.5, 0.5],
        "attacks": [
          {"name": "mi_fgsm", "eps": 0.05, "steps": 1},
          {"name": "fgsm", "eps": 0.05, "norm": "l2"},
        ],
      },
    ],
  }
  direct = A.worst_case(
    attacks=[
      A.fgsm(eps=0.05),
      A.mixture(
        attacks=[A.mi_fgsm(eps=0.05, steps=1), A.fgsm(eps=0.05, norm="l2")], weights=[0.5, 0.5]
      ),
    ]
  )
  expected = run(direct, logits_fn, x, y)
  np.testing.assert_array_equal(run(A.create(spec), logits_fn, x, y), expected)
  np.testing.assert_array_equal(run(A.create(**spec), logits_fn, x, y), expected)


# --- invariants for every new attack ---------------------------------------------

BALL_ATTACKS = [
  ("mi_fgsm", dict(eps=0.1, steps=3), "linf", 0.1),
  ("mi_fgsm", dict(eps=0.5, steps=3, norm="l2", decay=0.5, step_size=0.3), "l2", 0.5),
  ("di_fgsm", dict(eps=0.1, steps=3, prob=1.0, resize_rate=0.7), "linf", 0.1),
  ("di_fgsm", dict(eps=0.5, steps=3, norm="l2"), "l2", 0.5),
  ("apgd", dict(eps=0.1, steps=4), "linf", 0.1),
  ("apgd", dict(eps=0.5, steps=4, norm="l2", loss="dlr", restarts=2), "l2", 0.5),
  ("apgd", dict(eps=0.05, steps=4, targeted=True), "linf", 0.05),
  (
    "worst_case",
    dict(
      attacks=[{"name": "pgd", "eps": 0.1, "steps": 2}, {"name": "mi_fgsm", "eps": 0.1, "steps": 2}]
    ),
    "linf",
    0.1,
  ),
  (
    "random_choice",
    dict(
      per_example=True,
      attacks=[
        {"name": "pgd", "eps": 0.5, "norm": "l2", "steps": 2},
        {"name": "apgd", "eps": 0.5, "norm": "l2", "steps": 2},
      ],
    ),
    "l2",
    0.5,
  ),
  (
    "mixture",
    dict(
      weights=[0.5, 0.5],
      attacks=[{"name": "fgsm", "eps": 0.1}, {"name": "di_fgsm", "eps": 0.1, "steps": 2}],
    ),
    "linf",
    0.1,
  ),
]


@pytest.mark.parametrize("name, settings, norm, eps", BALL_ATTACKS)
def test_stays_in_ball_and_box(name, settings, norm, eps):
  logits_fn = mlp()
  x, y = edge_batch(), jnp.arange(6) % 4
  x_adv = run(A.create(name, **settings), logits_fn, x, y)
  assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
  assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
  d = (x_adv - x).reshape(6, -1)
  size = jnp.abs(d).max(1) if norm == "linf" else jnp.linalg.norm(d, axis=1)
  assert float(size.max()) <= eps * (1 + TOL)
  assert float(size.max()) > 0  # it moved


def test_cw_stays_in_box_and_moves():
  logits_fn = mlp()
  x, y = edge_batch(), jnp.arange(6) % 4
  x_adv = run(A.cw_l2(steps=10, binary_search_steps=2, c=10.0, lr=0.1), logits_fn, x, y)
  assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
  assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
  fooled = ~correct(logits_fn, x_adv, y)
  assert fooled.any()
  np.testing.assert_array_equal(x_adv[~fooled], x[~fooled])  # failures return x


# --- bad input ---------------------------------------------------------------------


@pytest.mark.parametrize(
  "factory, kwargs, message",
  [
    (A.cw_l2, dict(steps=-1), "steps must be an integer >= 1, got -1"),
    (A.cw_l2, dict(steps=0), "steps"),
    (A.cw_l2, dict(binary_search_steps=-2), "binary_search_steps.*-2"),
    (A.cw_l2, dict(binary_search_steps=0), "binary_search_steps"),
    (A.cw_l2, dict(kappa=-0.5), "kappa.*-0.5"),
    (A.cw_l2, dict(c=0.0), "c must"),
    (A.cw_l2, dict(lr=-0.01), "lr.*-0.01"),
    (A.cw_l2, dict(eps=0.0), "eps must"),
    (A.mi_fgsm, dict(eps=0.1, steps=-3), "steps.*-3"),
    (A.mi_fgsm, dict(eps=-0.1), "eps.*-0.1"),
    (A.mi_fgsm, dict(eps=0.1, decay=-1.0), "decay.*-1.0"),
    (A.mi_fgsm, dict(eps=0.1, step_size=0.0), "step_size"),
    (A.mi_fgsm, dict(eps=0.1, norm="l1"), "'l1'"),
    (A.di_fgsm, dict(eps=0.1, prob=1.5), r"prob must lie in \[0.0, 1.0\], got 1.5"),
    (A.di_fgsm, dict(eps=0.1, prob=-0.1), "prob.*-0.1"),
    (A.di_fgsm, dict(eps=0.1, resize_rate=0.0), r"resize_rate must lie in \(0.0, 1.0\]"),
    (A.di_fgsm, dict(eps=0.1, resize_rate=1.2), "resize_rate.*1.2"),
    (A.di_fgsm, dict(eps=0.1, steps=0), "steps"),
    (A.apgd, dict(eps=0.1, steps=-1), "steps.*-1"),
    (A.apgd, dict(eps=0.0), "eps"),
    (A.apgd, dict(eps=0.1, loss="cw"), "'cw'"),
    (A.apgd, dict(eps=0.1, rho=1.5), "rho.*1.5"),
    (A.apgd, dict(eps=0.1, restarts=0), "restarts"),
    (A.apgd, dict(eps=0.1, norm="l3"), "'l3'"),
  ],
)
def test_bad_settings(factory, kwargs, message):
  with pytest.raises(checks.InputError, match=message):
    factory(**kwargs)


PGD = A.pgd(eps=0.1, steps=1)


@pytest.mark.parametrize(
  "build, message",
  [
    (lambda: A.worst_case(attacks=[]), "non-empty list"),
    (lambda: A.random_choice(attacks=[]), "non-empty list"),
    (lambda: A.mixture(attacks=[], weights=[]), "non-empty list"),
    (lambda: A.worst_case(attacks=[PGD, "pgd"]), "must be Attacks.*'pgd'"),
    (lambda: A.worst_case(attacks=[PGD, lambda f, x, y, k: x]), "must be Attacks"),
    (lambda: A.create("worst_case", attacks=[{"name": "pgd", "eps": 0.1}], eps=0.1), "eps"),
    (lambda: A.mixture(attacks=[PGD, PGD], weights=[0.5, 0.6]), r"sum to 1.*1.1"),
    (lambda: A.mixture(attacks=[PGD, PGD], weights=[1.0]), "list of 2 numbers"),
    (lambda: A.mixture(attacks=[PGD, PGD], weights=[1.5, -0.5]), ">= 0"),
    (lambda: A.mixture(attacks=[PGD, PGD], weights=0.5), "list of 2"),
    (lambda: A.create("worst_case", attacks=[{"name": "nope"}]), "unknown attack 'nope'"),
    (lambda: A.create({"eps": 0.1}), "needs a 'name'"),
    (lambda: A.create("mixture", attacks=[{"name": "pgd", "eps": 0.1}]), "weights"),
    (lambda: A.create("apgd", eps=0.1, step_size=0.1), "step_size"),
  ],
)
def test_bad_combinations(build, message):
  with pytest.raises(checks.InputError, match=message):
    build()


def test_bad_inputs_at_call_time(linear_model):
  x, y = jnp.full((2, 16), 0.5), jnp.array([0, 1])
  two_classes = linear_model(jnp.ones(16))
  with pytest.raises(checks.InputError, match="needs >= 3 classes, the model has 2"):
    A.apgd(eps=0.1, loss="dlr")(two_classes, x, y, jax.random.key(0))
  with pytest.raises(checks.InputError, match=r"height, width, channels\], got shape \(2, 16\)"):
    A.di_fgsm(eps=0.1)(two_classes, x, y, jax.random.key(0))
  with pytest.raises(checks.InputError, match=r"\[0, 1\]"):
    A.cw_l2(steps=1)(two_classes, x + 1, y, jax.random.key(0))
  with pytest.raises(checks.InputError, match="labels"):
    A.mixture(attacks=[PGD, PGD], weights=[0.5, 0.5])(
      two_classes, x, jnp.array([0, 5]), jax.random.key(0)
    )


# --- compilation ---------------------------------------------------------------


@pytest.mark.parametrize(
  "factory, kwargs",
  [
    (A.pgd, dict(eps=0.1, steps=3)),
    (A.pgd, dict(norm="l2", eps=0.5, steps=3, restarts=2)),
    (A.cw_l2, dict(steps=5, binary_search_steps=2)),
    (A.mi_fgsm, dict(eps=0.1, steps=3)),
    (A.di_fgsm, dict(eps=0.1, steps=3)),
    (A.apgd, dict(eps=0.1, steps=5, loss="dlr")),
  ],
)
def test_one_compilation_per_configuration_and_shape(factory, kwargs):
  chex.clear_trace_counter()  # chex counts per function across parameterised runs
  logits_fn = mlp()
  attack = factory(**kwargs)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def attacked(x, y, key):
    return attack(logits_fn, x, y, key)

  for seed in range(3):  # new images, labels and keys: no new trace
    x = uniform(seed, (4, 8, 8, 1))
    attacked(x, jnp.asarray(np.arange(4) + seed) % 4, jax.random.key(seed)).block_until_ready()


def test_cw_program_size_does_not_grow_with_its_steps():
  # Both C&W loops are `fori_loop`s: 9 x 1000 steps compile like 1 x 10.
  logits_fn, x, y = mlp(), uniform(0, (2, 8, 8, 1)), jnp.array([0, 1])
  size = lambda **kw: str(
    jax.make_jaxpr(  # lines of the program: one per operation
      lambda x, y: A.cw_l2(**kw)(logits_fn, x, y, jax.random.key(0))
    )(x, y)
  ).count("\n")
  assert size(steps=1000, binary_search_steps=9) == size(steps=10, binary_search_steps=1)


@pytest.mark.parametrize(
  "factory, kwargs",
  [(A.pgd, dict(eps=0.1)), (A.apgd, dict(eps=0.1)), (A.mi_fgsm, dict(eps=0.1))],
)
def test_memory_does_not_grow_with_the_steps(factory, kwargs):
  # XLA's own count of the compiled program's buffers: an attack that kept a
  # history of its steps (a scan collecting iterates or losses) would need
  # about 10x more temporaries at 100 steps than at 10.
  logits_fn, x, y = mlp(), uniform(0, (16, 8, 8, 1)), jnp.asarray(np.arange(16) % 4)

  def temporaries(steps):
    attack = factory(steps=steps, **kwargs)
    program = jax.jit(lambda x, y: attack(logits_fn, x, y, jax.random.key(0)))
    return program.lower(x, y).compile().memory_analysis().temp_size_in_bytes

  assert temporaries(100) == temporaries(10)
