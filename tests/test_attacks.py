"""The attack engine: closed-form optima on linear models, ball and box
invariants, loop-form equivalence and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrobust as jr
from jaxrobust import checks

TOL = 1e-5  # float32 rounding of x + d - x


def interior_batch(key, shape=(4, 6, 6, 1)):
  """Images in [0.3, 0.7], so that eps <= 0.3 never touches the box."""
  return jax.random.uniform(key, shape, minval=0.3, maxval=0.7)


KEY = jax.random.key(1)


def run(attack, logits_fn, x, y, key=KEY, **kw):
  return jax.jit(attack, static_argnums=0)(logits_fn, x, y, key, **kw)


def test_linf_pgd_reaches_the_linear_optimum(linear_model):
  # Cross-entropy of a linear 2-class model is increasing in w.x for y = 0, so
  # the L-inf optimum is x + eps sign(w) (x - eps sign(w) for y = 1).
  w = jax.random.normal(jax.random.key(0), (6, 6, 1))
  x = interior_batch(jax.random.key(2))
  y = jnp.array([0, 1, 0, 1])
  attack = jr.attacks.pgd(norm="linf", eps=0.1, step_size=0.025, steps=10)
  x_adv = run(attack, linear_model(w), x, y)
  direction = jnp.where(y == 0, 1.0, -1.0)[:, None, None, None]
  np.testing.assert_allclose(x_adv, x + 0.1 * direction * jnp.sign(w), atol=TOL)


@pytest.mark.parametrize("random_start", [False, True])
def test_l2_pgd_reaches_the_linear_optimum(linear_model, random_start):
  # The L2 optimum is x + eps w / ||w|| for y = 0.
  w = jax.random.normal(jax.random.key(0), (6, 6, 1))
  x = interior_batch(jax.random.key(2))
  y = jnp.zeros(4, jnp.int32)
  attack = jr.attacks.pgd(norm="l2", eps=0.5, step_size=0.25, steps=60, random_start=random_start)
  x_adv = run(attack, linear_model(w), x, y)
  np.testing.assert_allclose(x_adv, x + 0.5 * w / jnp.linalg.norm(w), atol=1e-4)


def test_fgsm_is_one_signed_gradient_step(tiny_cnn):
  logits_fn = tiny_cnn()
  x = jax.random.uniform(jax.random.key(0), (5, 8, 8, 1))
  y = jnp.array([0, 1, 2, 0, 1])
  loss = lambda x: jnp.sum(jax.vmap(jr.attacks.losses.cross_entropy)(logits_fn(x), y))
  expected = jnp.clip(x + 0.05 * jnp.sign(jax.grad(loss)(x)), 0, 1)
  x_adv = run(jr.attacks.fgsm(eps=0.05), logits_fn, x, y)
  np.testing.assert_allclose(x_adv, expected, atol=1e-6)


OPTIONS = [
  dict(norm="linf", eps=0.1),
  dict(norm="linf", eps=0.3, random_start=False, loss="cw"),
  dict(norm="linf", eps=0.05, restarts=3, targeted=True),
  dict(norm="l2", eps=0.5),
  dict(norm="l2", eps=2.0, restarts=2, loss="cw", targeted=True),
  dict(norm="l2", eps=1.0, step_size=0.5, random_start=False, loss=lambda z, y: -z[y]),
]


@pytest.mark.parametrize("options", OPTIONS)
def test_stays_in_ball_and_box(tiny_cnn, options):
  logits_fn = tiny_cnn()
  # Half the pixels at the edges of the box, where clipping binds.
  x = jnp.round(jax.random.uniform(jax.random.key(0), (6, 8, 8, 1)) * 2) / 2
  y = jnp.array([0, 1, 2, 0, 1, 2])
  x_adv = run(jr.attacks.pgd(steps=5, **options), logits_fn, x, y)
  assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
  assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
  d = (x_adv - x).reshape(6, -1)
  size = jnp.abs(d).max(1) if options["norm"] == "linf" else jnp.linalg.norm(d, axis=1)
  assert float(size.max()) <= options["eps"] * (1 + TOL)
  assert float(size.max()) > 0  # it moved


def test_per_example_eps(tiny_cnn):
  logits_fn = tiny_cnn()
  x = jax.random.uniform(jax.random.key(0), (4, 8, 8, 1))
  y = jnp.array([0, 1, 2, 0])
  eps = jnp.array([0.01, 0.05, 0.1, 0.2])
  attack = jr.attacks.pgd(norm="linf", eps=0.1, steps=3)
  x_adv = run(attack, logits_fn, x, y, eps=eps)
  size = jnp.abs(x_adv - x).reshape(4, -1).max(1)
  assert np.all(size <= eps * (1 + TOL)) and np.all(size > 0.5 * eps)
  same = run(attack, logits_fn, x, y, eps=jnp.full(4, 0.1))
  np.testing.assert_array_equal(same, run(attack, logits_fn, x, y))


def test_restarts_never_worse_than_one_run(tiny_cnn):
  logits_fn = tiny_cnn()
  x = jax.random.uniform(jax.random.key(0), (16, 8, 8, 1))
  y = jnp.arange(16) % 3
  one = run(jr.attacks.pgd(eps=0.02, steps=2), logits_fn, x, y)
  many = run(jr.attacks.pgd(eps=0.02, steps=2, restarts=4), logits_fn, x, y)
  loss = jax.vmap(jr.attacks.losses.cross_entropy)
  fooled = lambda xa: jnp.argmax(logits_fn(xa), -1) != y
  assert np.all(fooled(many) >= fooled(one))
  neither = ~fooled(one) & ~fooled(many)
  assert np.all(loss(logits_fn(many), y)[neither] >= loss(logits_fn(one), y)[neither] - 1e-6)


def test_targeted_reaches_targets():
  w = jax.random.normal(jax.random.key(0), (3, 16))
  logits_fn = lambda x: x.reshape(x.shape[0], -1) @ w.T
  x = jax.random.uniform(jax.random.key(1), (9, 4, 4, 1))
  target = (jnp.argmax(logits_fn(x), -1) + 1 + jnp.arange(9) % 2) % 3
  attack = jr.attacks.pgd(norm="l2", eps=4.0, steps=30, targeted=True)
  x_adv = run(attack, logits_fn, x, target)
  np.testing.assert_array_equal(jnp.argmax(logits_fn(x_adv), -1), target)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_unrolled_and_fori_loop_forms_agree(tiny_cnn, norm):
  logits_fn = tiny_cnn()
  x = jax.random.uniform(jax.random.key(0), (4, 8, 8, 1))
  y = jnp.array([0, 1, 2, 0])
  kw = dict(norm=norm, eps=0.1, steps=4, restarts=2)
  unrolled = run(jr.attacks.pgd(unroll=True, **kw), logits_fn, x, y)
  looped = run(jr.attacks.pgd(unroll=False, **kw), logits_fn, x, y)
  np.testing.assert_allclose(unrolled, looped, atol=1e-6)


def test_any_input_shape_and_key_batches(linear_model):
  logits_fn = linear_model(jnp.linspace(-1, 1, 10))
  x = jax.random.uniform(jax.random.key(0), (3, 10))
  y = jnp.array([0, 1, 0])
  attack = jr.attacks.pgd(eps=0.1, steps=2)
  keys = jax.random.split(jax.random.key(5), 3)
  per_example = run(attack, logits_fn, x, y, keys)
  assert per_example.shape == (3, 10)
  # Example i's result depends only on its key, not on the rest of the batch.
  first = run(attack, logits_fn, x[:1], y[:1], keys[:1])
  np.testing.assert_array_equal(first, per_example[:1])


def test_eager_and_jit_agree(tiny_cnn):
  logits_fn = tiny_cnn()
  x = jax.random.uniform(jax.random.key(0), (2, 8, 8, 1))
  y = jnp.array([0, 1])
  attack = jr.attacks.pgd(eps=0.1, steps=1)
  key = jax.random.key(3)
  np.testing.assert_allclose(
    attack(logits_fn, x, y, key), run(attack, logits_fn, x, y, key), atol=1e-6
  )


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(eps=-0.1), "eps"),
    (dict(eps=0.0), "eps"),
    (dict(eps=float("nan")), "nan"),
    (dict(eps=0.1, steps=0), "steps"),
    (dict(eps=0.1, step_size=0.0), "step_size"),
    (dict(eps=0.1, step_size=-1.0), "step_size"),
    (dict(eps=0.1, norm="l1"), "'l1'"),
    (dict(eps=0.1, loss="hinge"), "'hinge'"),
    (dict(eps=0.1, restarts=0), "restarts"),
  ],
)
def test_bad_settings(kwargs, message):
  with pytest.raises(checks.InputError, match=message):
    jr.attacks.pgd(**kwargs)


@pytest.mark.parametrize(
  "x, y, message",
  [
    (np.full((2, 4, 4, 1), 1.5, np.float32), [0, 1], r"\[0, 1\].*1.5"),
    (np.full((2, 4, 4, 1), -0.5, np.float32), [0, 1], r"-0.5"),
    (np.full((2, 4, 4, 1), np.nan, np.float32), [0, 1], "NaN"),
    (np.full((2, 4, 4, 1), 0.5, np.float32), [0, 7], r"\[0, 2\).*7"),
    (np.full((2, 4, 4, 1), 0.5, np.float32), [0, -1], r"-1"),
    (np.full((2, 4, 4, 1), 0.5, np.float32), [0, 1, 1], r"shape \(2,\)"),
    (np.full((16,), 0.5, np.float32), [0], r"rank"),
  ],
)
def test_bad_inputs(linear_model, x, y, message):
  attack = jr.attacks.pgd(eps=0.1, steps=1)
  logits_fn = linear_model(jnp.ones(16))
  with pytest.raises(checks.InputError, match=message):
    attack(logits_fn, x, np.array(y), jax.random.key(0))


def test_bad_per_example_eps(linear_model):
  attack = jr.attacks.pgd(eps=0.1, steps=1)
  x = np.full((2, 4, 4, 1), 0.5, np.float32)
  with pytest.raises(checks.InputError, match="-0.2"):
    attack(
      linear_model(jnp.ones(16)), x, np.array([0, 1]), jax.random.key(0), eps=np.array([0.1, -0.2])
    )
