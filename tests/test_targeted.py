"""Targeted attacks: the target helpers, the targeted rule of the combinators,
targeted MI-FGSM, M-DI2-FGSM and Square, and settings that round-trip."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrobust as jr
from jaxrobust import checks
from jaxrobust import keys as keys_lib
from tests import test_attack_suite

A = jr.attacks
T = jr.attacks.targets
KEY = jax.random.key(1)
# The attack suite's fixture: a 64-32-10 MLP trained on the digits (~99 % test
# accuracy) and 100 test examples.
digits_mlp = test_attack_suite.digits_mlp


def run(attack, logits_fn, x, y, key=KEY):
  return jax.jit(attack, static_argnums=0)(logits_fn, x, y, key)


# --- target helpers --------------------------------------------------------------


def test_random_other_is_never_y_and_uniform_over_the_others():
  num_classes, n = 5, 20_000
  y = jnp.asarray(np.arange(n) % num_classes)
  t = np.asarray(T.random_other(jax.random.key(0), y, num_classes))
  assert t.dtype == np.int32 and t.shape == (n,)
  assert np.all(t != np.asarray(y)) and t.min() >= 0 and t.max() < num_classes
  for c in range(num_classes):
    counts = np.bincount(t[np.asarray(y) == c], minlength=num_classes)
    others = np.delete(counts, c)
    # 4,000 draws over 4 classes: 1,000 each, binomial sd ~27; 5 sd apart.
    assert counts[c] == 0 and np.all(np.abs(others - 1000) < 140), counts
  # Per example from fold_in(key, i): independent of the batch around it.
  keys = jax.random.split(jax.random.key(3), 4)
  batch = T.random_other(keys, y[:4], num_classes)
  np.testing.assert_array_equal(T.random_other(keys[2:3], y[2:3], num_classes), batch[2:3])
  one = T.random_other(jax.random.key(0), y[:8], num_classes)
  np.testing.assert_array_equal(one, t[:8])


def test_least_likely_is_the_argmin():
  logits = np.random.default_rng(0).standard_normal((50, 7)).astype(np.float32)
  t = T.least_likely(jnp.asarray(logits))
  np.testing.assert_array_equal(t, np.argmin(logits, -1))
  assert t.dtype == jnp.int32


def test_mapped_applies_the_map():
  y = jnp.array([0, 1, 2, 2, 1])
  expected = [1, 2, 0, 0, 2]
  np.testing.assert_array_equal(T.mapped(y, {0: 1, 1: 2, 2: 0}), expected)
  np.testing.assert_array_equal(T.mapped(y, [1, 2, 0]), expected)
  np.testing.assert_array_equal(T.mapped(y, np.array([1, 2, 0]), num_classes=3), expected)
  # Not a permutation: several classes to one target.
  np.testing.assert_array_equal(T.mapped(y, [1, 0, 0]), [1, 0, 0, 0, 0])
  # Under jit, y traced (the map is static).
  np.testing.assert_array_equal(jax.jit(lambda y: T.mapped(y, [1, 2, 0]))(y), expected)


@pytest.mark.parametrize(
  "build, message",
  [
    (lambda: T.random_other(jax.random.key(0), jnp.array([0, 3]), 3), r"\[0, 3\).*3"),
    (lambda: T.random_other(jax.random.key(0), jnp.array([0, 1]), 1), "num_classes.*>= 2"),
    (lambda: T.random_other(jax.random.key(0), jnp.array([0.0, 1.0]), 3), "integers"),
    (lambda: T.random_other(jax.random.key(0), jnp.zeros((2, 2), int), 3), "shape"),
    (lambda: T.least_likely(jnp.zeros(4)), r"\[batch, classes\]"),
    (lambda: T.least_likely(jnp.array([[0.0, jnp.nan]])), "NaN"),
    (lambda: T.mapped(jnp.array([0, 1]), {0: 1, 1: 2, 3: 0}), r"missing classes \[2\]"),
    (lambda: T.mapped(jnp.array([0, 1]), {0: 1, 1: 0}, num_classes=3), r"missing classes \[2\]"),
    (lambda: T.mapped(jnp.array([0, 1]), [1, 0], num_classes=3), "every class 0..2"),
    (lambda: T.mapped(jnp.array([0, 1]), {0: 1, 1: 1}), r"to themselves: \[1\]"),
    (lambda: T.mapped(jnp.array([0, 1]), [0, 2, 1]), r"to themselves: \[0\]"),
    (lambda: T.mapped(jnp.array([0, 1]), [1, 5, 0]), r"outside \[0, 3\).*5"),
    (lambda: T.mapped(jnp.array([0, 1]), [1.0, 0.0]), "integers"),
    (lambda: T.mapped(jnp.array([0, 4]), [1, 2, 0]), r"\[0, 3\).*4"),
    (lambda: T.mapped(jnp.array([0, 1]), 3), "dict"),
  ],
)
def test_bad_target_inputs(build, message):
  with pytest.raises(checks.InputError, match=message):
    build()


# --- combinators over targeted parts -----------------------------------------------


def reached(logits_fn, x_adv, target):
  return np.asarray(jnp.argmax(logits_fn(x_adv), -1) == target)


def test_combinators_of_targeted_parts_reach_the_target(digits_mlp):
  # Issue 23: a weak and a strong targeted PGD. Judged untargeted (argmax != y,
  # y the target), the weak part's output "succeeds" wherever it stays on the
  # true class, so the combination kept it and reached the target on none.
  logits_fn, x, y = digits_mlp
  target = T.random_other(jax.random.key(0), y, 10)
  weak = A.pgd(eps=0.02, steps=1, targeted=True)
  strong = A.pgd(eps=0.3, steps=20, targeted=True)
  # Each part alone, with the keys the combinators give it (part j: fold_in(k_i, j)).
  keys = keys_lib.example_keys(KEY, len(x))
  outputs = [
    run(a, logits_fn, x, target, keys_lib.fold(keys, j)) for j, a in enumerate([weak, strong])
  ]
  parts = [reached(logits_fn, o, target) for o in outputs]
  assert parts[0].mean() < 0.1 and parts[1].mean() > 0.9  # the setting
  worst = run(A.worst_case(attacks=[weak, strong]), logits_fn, x, target)
  # Per example: the target is reached iff a part reached it.
  np.testing.assert_array_equal(reached(logits_fn, worst, target), parts[0] | parts[1])
  best = run(A.max_loss(attacks=[weak, strong]), logits_fn, x, target)
  assert reached(logits_fn, best, target).mean() >= parts[1].mean()
  # Where no part reaches it, worst_case keeps the lowest cross-entropy to the target.
  ce = lambda xa: np.asarray(jax.vmap(A.losses.cross_entropy)(logits_fn(xa), target))
  neither = ~(parts[0] | parts[1])
  np.testing.assert_allclose(
    ce(worst)[neither], np.minimum(*[ce(o) for o in outputs])[neither], rtol=1e-6
  )


def shifting(shift, targeted):
  """A fixed "attack": example i's output is the constant image 0.5 + shift[i].
  (Its settings name the shifts: equal attacks share compiled programs.)"""
  values = jnp.asarray(shift, jnp.float32)
  return A.Attack(
    lambda f, x, y, key, eps: jnp.zeros_like(x) + (0.5 + values)[:, None, None, None],
    name="shift",
    targeted=targeted,
    settings=(("shift", tuple(float(v) for v in shift)),),
  )


def test_targeted_rule_picks_the_closed_form(linear_model):
  # Logits [0, z], z = sum of the 4 pixels - 2, target 1: a candidate reaches
  # the target iff z > 0, and its targeted loss -CE(z, 1) = -log(1 + e^-z)
  # increases with z. So worst_case keeps the first candidate with z > 0,
  # else the larger z; max_loss the larger z. Judged untargeted (the rule
  # before), worst_case kept the first with z <= 0, else the smaller z.
  logits_fn = linear_model(jnp.ones((2, 2, 1)), -2.0)
  x = jnp.full((4, 2, 2, 1), 0.5)
  target = jnp.ones(4, jnp.int32)
  z = np.array([[0.1, 0.3, -0.3, -0.2], [0.2, 0.1, -0.1, -0.4]])  # [part, example]
  loss = -np.log1p(np.exp(-z))
  success = z > 0
  expected_worst = np.where(success.any(0), np.argmax(success, 0), np.argmax(loss, 0))
  expected_max = np.argmax(loss, 0)
  assert list(expected_worst) == [0, 0, 1, 0] and list(expected_max) == [1, 0, 1, 0]
  parts = [shifting(s / 4, True) for s in z]
  candidates = np.stack([np.asarray(run(p, logits_fn, x, target)) for p in parts])
  for combinator, expected in ((A.worst_case, expected_worst), (A.max_loss, expected_max)):
    out = np.asarray(run(combinator(attacks=parts), logits_fn, x, target))
    np.testing.assert_array_equal(out, candidates[expected, np.arange(4)])
  # The same parts untargeted: the untargeted rule, which picked other candidates.
  untargeted = [shifting(s / 4, False) for s in z]
  out = np.asarray(run(A.worst_case(attacks=untargeted), logits_fn, x, target))
  np.testing.assert_array_equal(out, candidates[[0, 1, 0, 0], np.arange(4)])


TARGETED = A.pgd(eps=0.1, steps=1, targeted=True)
UNTARGETED = A.pgd(eps=0.1, steps=1)


@pytest.mark.parametrize(
  "build",
  [
    lambda: A.worst_case(attacks=[UNTARGETED, TARGETED]),
    lambda: A.max_loss(attacks=[TARGETED, UNTARGETED]),
    lambda: A.random_choice(attacks=[TARGETED, UNTARGETED], per_example=True),
    lambda: A.mixture(attacks=[TARGETED, UNTARGETED], weights=[0.5, 0.5]),
    lambda: A.create(
      "worst_case",
      attacks=[{"name": "pgd", "eps": 0.1, "targeted": True}, {"name": "mi_fgsm", "eps": 0.1}],
    ),
  ],
)
def test_mixing_targeted_and_untargeted_parts_is_refused(build):
  with pytest.raises(checks.InputError, match="cannot mix targeted and untargeted attacks"):
    build()


def test_a_combinator_of_targeted_parts_is_targeted():
  for combined in (
    A.worst_case(attacks=[TARGETED, TARGETED]),
    A.max_loss(attacks=[TARGETED]),
    A.random_choice(attacks=[TARGETED, TARGETED]),
    A.mixture(attacks=[TARGETED, TARGETED], weights=[0.5, 0.5]),
  ):
    assert combined.targeted and A.create(**combined.spec) == combined
  assert not A.worst_case(attacks=[UNTARGETED, UNTARGETED]).targeted


def test_a_combinator_records_the_threat_model_its_parts_share():
  assert A.max_loss(attacks=[UNTARGETED]).norm == "linf"
  assert A.mixture(attacks=[UNTARGETED], weights=[1.0]).eps == 0.1
  mixed = A.random_choice(attacks=[UNTARGETED, A.pgd(norm="l2", eps=0.5)])
  assert mixed.norm is None and mixed.eps is None
  # The threat model is read from the parts, never given: no such setting.
  with pytest.raises(checks.InputError, match="unexpected keyword argument 'norm'"):
    A.create("max_loss", attacks=[UNTARGETED], norm="linf")


# --- targeted MI-FGSM, M-DI2-FGSM and Square ------------------------------------------


@pytest.mark.parametrize(
  "name, settings",
  [
    ("mi_fgsm", dict(eps=0.3, steps=10)),
    ("di_fgsm", dict(eps=0.3, steps=10)),
    ("square", dict(eps=0.3, queries=1000)),
  ],
)
def test_targeted_attacks_reach_the_target(digits_mlp, name, settings):
  # The same targets: the targeted attack drives towards them; the untargeted
  # one (on the true labels) lands on them only by chance.
  logits_fn, x, y = digits_mlp
  target = T.random_other(jax.random.key(0), y, 10)
  targeted = reached(
    logits_fn, run(A.create(name, targeted=True, **settings), logits_fn, x, target), target
  )
  untargeted = reached(logits_fn, run(A.create(name, **settings), logits_fn, x, y), target)
  assert targeted.mean() >= 0.85, targeted.mean()
  assert untargeted.mean() <= 0.25, untargeted.mean()


def interior(seed, shape):
  """Images in [0.3, 0.7], so that eps <= 0.3 never touches the box."""
  return jnp.asarray(np.random.default_rng(seed).uniform(0.3, 0.7, shape), jnp.float32)


@pytest.mark.parametrize("name", ["mi_fgsm", "di_fgsm"])
def test_targeted_momentum_step_is_the_closed_form(name):
  # A 3-class linear model z = W x: the gradient of -CE(z, t) is
  # W^T (e_t - softmax(z)), so one step (g = grad / ||grad||_1) moves x by
  # eps sign(W^T (e_t - softmax(z))); untargeted on t it moves the other way.
  w = jnp.asarray(np.random.default_rng(0).standard_normal((3, 16)), jnp.float32)
  logits_fn = lambda x: x.reshape(x.shape[0], -1) @ w.T
  x = interior(1, (6, 4, 4, 1))
  target = jnp.array([0, 1, 2, 0, 1, 2])
  extra = dict(prob=0.0) if name == "di_fgsm" else {}
  attack = A.create(name, eps=0.1, steps=1, targeted=True, **extra)
  x_adv = run(attack, logits_fn, x, target)
  p = jax.nn.softmax(logits_fn(x))
  grad = (jax.nn.one_hot(target, 3) - p) @ w
  np.testing.assert_allclose(x_adv, x + 0.1 * jnp.sign(grad).reshape(x.shape), atol=1e-6)
  away = run(A.create(name, eps=0.1, steps=1, **extra), logits_fn, x, target)
  np.testing.assert_allclose(away - x, -(x_adv - x), atol=1e-6)


@pytest.mark.parametrize("norm, eps", [("linf", 0.1), ("l2", 0.5)])
def test_targeted_mi_fgsm_reaches_the_linear_optimum(linear_model, norm, eps):
  # On [0, w.x] the cross-entropy to target 1 falls along w and to target 0
  # along -w, at every step: the optimum x + eps s sign(w) (L-inf) or
  # x + eps s w / ||w|| (L2), s = +1 for target 1 and -1 for target 0.
  w = jnp.asarray(np.random.default_rng(0).standard_normal((6, 6, 1)), jnp.float32)
  x = interior(2, (4, 6, 6, 1))
  target = jnp.array([0, 1, 1, 0])
  x_adv = run(A.mi_fgsm(eps=eps, steps=5, norm=norm, targeted=True), linear_model(w), x, target)
  s = jnp.where(target == 1, 1.0, -1.0)[:, None, None, None]
  unit = jnp.sign(w) if norm == "linf" else w / jnp.linalg.norm(w)
  np.testing.assert_allclose(x_adv, x + eps * s * unit, atol=1e-5)


@pytest.mark.parametrize(
  "norm, eps", [("linf", 0.05), pytest.param("l2", 0.3, marks=pytest.mark.slow)]
)
def test_targeted_square_minimises_the_margin_to_the_target(linear_model, norm, eps):
  # Two classes: the targeted margin max_{i != t} z_i - z_t is the untargeted
  # margin z_y - max_{i != y} z_i of y = 1 - t, so the same search (same
  # key) gives the same points.
  w = jnp.asarray(np.random.default_rng(0).standard_normal((6, 6, 1)), jnp.float32)
  logits_fn = linear_model(w)
  x = interior(3, (6, 6, 6, 1))
  target = jnp.array([0, 1, 1, 0, 1, 0])
  square = dict(norm=norm, eps=eps, queries=30)
  np.testing.assert_array_equal(
    run(A.square(targeted=True, **square), logits_fn, x, target),
    run(A.square(**square), logits_fn, x, 1 - target),
  )


@pytest.mark.slow  # 300 queries of a compiled Square
def test_targeted_square_reaches_every_target_the_ball_allows():
  # Five classes. The model reads only the pixels Square's squares reach (the
  # authors' corners leave the last row and column to squares that fill the
  # image).
  x = interior(3, (6, 6, 6, 1))
  reach = np.ones((6, 6), np.float32)
  reach[-1, :] = reach[:, -1] = 0
  w5 = np.random.default_rng(1).standard_normal((5, 36)) * reach.ravel()
  w5 = jnp.asarray(w5, jnp.float32)
  five = lambda x: 4 * x.reshape(x.shape[0], -1) @ w5.T
  target = (jnp.argmax(five(x), -1) + 1 + jnp.arange(6) % 4) % 5
  x_adv = run(A.square(eps=0.3, queries=300, targeted=True), five, x, target)
  np.testing.assert_array_equal(reached(five, x_adv, target), True)


# --- settings ------------------------------------------------------------------------

TOUCHED = [
  A.mi_fgsm(eps=0.1),
  A.mi_fgsm(eps=0.5, norm="l2", steps=3, decay=0.5, targeted=True),
  A.di_fgsm(eps=0.1, prob=0.7, targeted=True),
  A.square(eps=0.1),
  A.square(norm="l2", eps=0.5, queries=100, targeted=True, rescale_schedule=True),
  A.cw_l2(),
  A.cw_l2(steps=20, lr=0.1, targeted=True, eps=0.5, schedule="constant"),
  A.worst_case(attacks=[A.pgd(eps=0.1, targeted=True), A.mi_fgsm(eps=0.1, targeted=True)]),
  A.max_loss(attacks=[A.pgd(eps=0.1), A.pgd(norm="l2", eps=0.5)]),
  A.random_choice(attacks=[A.square(eps=0.1, targeted=True)], per_example=True),
  A.mixture(attacks=[A.cw_l2(steps=5), A.pgd(norm="l2", eps=0.5)], weights=[0.5, 0.5]),
]


@pytest.mark.parametrize("attack", TOUCHED, ids=lambda a: a.name)
def test_settings_round_trip(attack):
  rebuilt = A.create(**attack.spec)
  assert rebuilt == attack and rebuilt.targeted == attack.targeted
  assert rebuilt.spec == attack.spec


@pytest.mark.parametrize(
  "factory",
  [A.mi_fgsm, A.di_fgsm, A.square, A.cw_l2, A.worst_case, A.max_loss, A.random_choice, A.mixture],
)
def test_hyper_parameters_are_keyword_only(factory):
  parameters = inspect.signature(factory).parameters.values()
  positional = [p.name for p in parameters if p.kind is not inspect.Parameter.KEYWORD_ONLY]
  assert positional == []
  with pytest.raises(TypeError, match="keyword arguments only"):
    factory(UNTARGETED)


@pytest.mark.parametrize("factory", [A.mi_fgsm, A.di_fgsm, A.square, A.cw_l2])
def test_targeted_must_be_a_bool(factory):
  settings = {} if factory is A.cw_l2 else dict(eps=0.1)
  with pytest.raises(checks.InputError, match="targeted must be True or False, got 'yes'"):
    factory(targeted="yes", **settings)


def test_cw_norm_is_l2_only():
  with pytest.raises(checks.InputError, match="L2 norm only"):
    A.cw_l2(norm="linf")
