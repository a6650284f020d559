"""Training objectives, spectral normalisation and randomized models in training."""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrobust import attacks, checks, data, models, parallel
from jaxrobust.training import loop as experiment
from jaxrobust.training import objectives
from jaxrobust import spectral
from jaxrobust.training import step as training
from jaxrobust.certification import lipschitz


def shorten(spec):
  """The attack spec with one or two steps per attack (fast tests)."""
  spec = dict(spec)
  if "attacks" in spec:
    spec["attacks"] = [shorten(a) for a in spec["attacks"]]
  elif spec["name"] == "cw_l2":
    spec["steps"] = 2
  elif spec["name"] == "fgsm":
    pass  # one step already
  else:
    spec.update(steps=2, step_size=None)
  return spec


def tiny(name, **overrides):
  """Config `<name>` on digits with a width-4 CNN and short attacks."""
  c = importlib.import_module(f"jaxrobust.configs.{name}").get_config()
  c.model.width = 4
  c.batch_size = 16
  c.epochs = 1
  c.log_every_steps = 1
  if "train_attack" in c:
    c.train_attack = shorten(c.train_attack.to_dict())
  if "noise" in c.model:
    c.model.noise.samples = 2
  c.update(overrides)
  return c


@functools.cache
def digits():
  return data.load("digits", "train")


def loss_of(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def small_model(**settings):
  ds = digits()
  mean, std = data.channel_stats(ds.x)
  return models.create("small_cnn", num_classes=10, mean=mean, std=std, width=4, **settings)


def nearest_mean_classifier():
  """A linear classifier of digits, x . mu_c - ||mu_c||^2 / 2 (no training)."""
  x, y = digits()
  flat = x.reshape(len(x), -1)
  means = jnp.asarray(np.stack([flat[y == c].mean(0) for c in range(10)]))
  return lambda xb: xb.reshape(len(xb), -1) @ means.T - 0.5 * jnp.sum(means**2, 1)


def test_mat_max_examples_are_the_larger_loss_of_the_two_norms():
  x, y = (jnp.asarray(a[:64]) for a in digits())
  logits_fn = nearest_mean_classifier()
  specs = [
    dict(name="pgd", norm="l2", eps=0.5, steps=3, random_start=False),
    dict(name="pgd", norm="linf", eps=0.05, steps=3, random_start=False),
  ]
  objective = training.make_input_fn("mat_max", dict(name="max_loss", attacks=specs))
  keys = jax.random.split(jax.random.key(1), len(x))
  chosen = logits_fn(objective(logits_fn, x, y, keys))
  single = [logits_fn(attacks.create(**s)(logits_fn, x, y, keys)) for s in specs]
  fooled = [np.asarray(jnp.argmax(z, -1) != y) for z in single]
  assert (fooled[0] & fooled[1]).any() and (~(fooled[0] | fooled[1])).any()
  # Per example the larger loss, fooled or not.
  best = np.maximum(*(np.asarray(loss_of(z, y)) for z in single))
  np.testing.assert_allclose(np.asarray(loss_of(chosen, y)), best, rtol=1e-5)


@pytest.mark.slow  # trains end to end: .ci/run runs it after the fast suite
@pytest.mark.parametrize("weights", [(0.5, 0.5), (0.25, 0.75)])
def test_cw_pgd_mix_splits_each_batch_in_the_requested_proportions(weights):
  model = small_model()
  x, y = (jnp.asarray(a[:16]) for a in digits())
  variables = model.init(jax.random.key(0), x[:1])
  logits_fn = lambda xb: model.apply(variables, xb)
  # PGD moves every pixel it does not clip by exactly eps; this short C&W
  # barely moves any (or returns x itself).
  spec = dict(
    name="mixture",
    weights=list(weights),
    attacks=[
      dict(name="cw_l2", steps=2, binary_search_steps=1, c=1.0, lr=0.01),
      dict(name="pgd", norm="linf", eps=0.3, step_size=0.3, steps=1, random_start=False),
    ],
  )
  objective = training.make_input_fn("cw_pgd_mix", spec)
  for seed in range(2):
    keys = jax.random.split(jax.random.key(seed), len(x))
    largest = np.abs(np.asarray(objective(logits_fn, x, y, keys) - x)).reshape(16, -1).max(1)
    assert ((largest < 0.1) | (np.abs(largest - 0.3) < 1e-5)).all()
    assert int((largest > 0.1).sum()) == 16 * weights[1]


def spectral_model(target):
  return small_model(spectral=dict(mode="operator", target=target, n_steps=1))


@pytest.mark.slow  # trains end to end: .ci/run runs it after the fast suite
def test_spectral_state_advances_in_training_only_and_bounds_the_layers(tmp_path):
  config = tiny("natural", epochs=2)
  config.model.spectral = dict(mode="operator", target=0.5, n_steps=1, rescale="clip")
  config.optimizer.learning_rate = 0.1
  model = spectral_model(0.5)
  x = jnp.asarray(digits().x[:8])
  initial = model.init(jax.random.fold_in(jax.random.key(config.seed), 0), x[:1])
  state = experiment.train(config, tmp_path, max_steps=30, progress=False)
  variables = jax.device_get(state.variables)
  moved = jax.tree.map(
    lambda a, b: not np.allclose(a, b), initial["spectral"], variables["spectral"]
  )
  assert all(jax.tree.leaves(moved))  # every v and sigma advanced in training
  # Evaluation (train=False) reads the state and never changes it.
  _, after = model.apply(variables, x, train=False, mutable=["spectral"])
  jax.tree.map(np.testing.assert_array_equal, after["spectral"], variables["spectral"])
  # The layers' operator norms, exactly (SVD of each layer's matrix), with the
  # effective kernels: <= target (+5 % for the iteration's lag) ...
  factors = lipschitz.lipschitz_factors(
    functools.partial(model.apply, train=False), variables, x.shape[1:]
  )
  linear = [f for f in factors if f.kind == "linear"]
  assert len(linear) == 6 and all(f.value <= 0.5 * 1.05 for f in linear)
  # ... while the raw kernels are larger: the normalisation does the work.
  first = variables["params"]["Conv_0"]["kernel"]
  assert spectral.conv_operator_norm(first, (8, 8, 1)) > 0.5
  effective = linear[0].value
  assert spectral.conv_operator_norm(
    first / max(1.0, float(variables["spectral"]["SpectralNorm_0"]["sigma"]) / 0.5), (8, 8, 1)
  ) == pytest.approx(effective, rel=1e-3)


@pytest.mark.slow  # a minute's equivalence run: .ci/run runs it after the fast suite
@pytest.mark.parametrize("name, noise", [("pgd_at", None), ("rat", dict(sigma=0.2, samples=2))])
def test_two_devices_equal_one_device_for_a_spectral_step(two_steps, name, noise):
  assert jax.device_count() >= 2, "tests/conftest.py asks XLA for 2 host devices"
  model = small_model(spectral=dict(mode="operator", target=1.0), noise=noise)
  spec = dict(name="pgd", norm="linf", eps=0.1, steps=2)
  if noise:
    spec["eot_samples"] = 2
  objective = training.make_input_fn(name, spec)
  x, y = (jnp.asarray(a[:8]) for a in digits())
  one, m1 = two_steps(parallel.mesh(jax.devices()[:1]), model, objective, x, y)
  two, m2 = two_steps(parallel.mesh(jax.devices()[:2]), model, objective, x, y)
  assert "spectral" in one.model_state
  for u, v in zip(jax.tree.leaves((one, m1)), jax.tree.leaves((two, m2))):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # trains end to end: .ci/run runs it after the fast suite
def test_randomized_model_is_the_mean_softmax_over_fixed_draws():
  model = small_model(noise=dict(sigma=0.3, samples=3, seed=7))
  x = jnp.asarray(digits().x[:5])
  variables = model.init(jax.random.key(0), x[:1])
  out = model.apply(variables, x)
  np.testing.assert_array_equal(out, model.apply(variables, x))  # a pure function of x
  draws = 0.3 * jax.random.normal(jax.random.key(7), (3, 1, *x.shape[1:]))
  base = lambda z: model.apply(variables, z, method="base")
  mean = jnp.mean(jnp.stack([jax.nn.softmax(base(x + d)) for d in draws]), 0)
  np.testing.assert_allclose(jnp.exp(out), mean, rtol=1e-5, atol=1e-6)
  # Its input gradient goes through the noise (EOT over the same draws).
  loss = lambda z: -model.apply(variables, z)[:, 0].sum()
  reference = lambda z: (
    -jnp.log(jnp.mean(jnp.stack([jax.nn.softmax(base(z + d))[:, 0] for d in draws]), 0)).sum()
  )
  np.testing.assert_allclose(jax.grad(loss)(x), jax.grad(reference)(x), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
  "settings, match",
  [
    (dict(spectral=dict(target=0.0)), "model.spectral.target.*0.0"),
    (dict(spectral=dict(target=-1.0)), "model.spectral.target.*-1.0"),
    (dict(spectral=dict(n_steps=0)), "model.spectral.n_steps.*0"),
    (dict(spectral=dict(mode="frobenius")), "'frobenius'"),
    (dict(spectral=dict(steps=2)), "no setting 'steps'"),
    (dict(noise=dict(sigma=0.0)), "model.noise.sigma.*0.0"),
    (dict(noise=dict(sigma=-0.5)), "model.noise.sigma.*-0.5"),
    (dict(noise=dict(samples=4)), "needs sigma"),
    (dict(noise=dict(sigma=0.5, samples=0)), "model.noise.samples.*0"),
  ],
)
def test_bad_model_settings(settings, match):
  with pytest.raises(checks.InputError, match=match):
    small_model(**settings)


def test_spectral_normalisation_of_a_resnet_is_refused():
  with pytest.raises(checks.InputError, match="'preact_resnet18' has no spectral"):
    models.create(
      "preact_resnet18", num_classes=10, mean=(0.5,), std=(0.2,), spectral=dict(target=1.0)
    )


@pytest.mark.parametrize(
  "name, spec, match",
  [
    ("rat", dict(name="pgd", eps=0.1, eot_samples=0), "eot_samples.*0"),
    ("rat", dict(name="pgd", eps=0.1, eot_samples=-2), "eot_samples.*-2"),
    ("pgd_at", dict(name="pgd", eps=0.1, eot_samples=2), "eot_samples.*'rat'"),
    ("mat_max", dict(name="pgd", eps=0.1), "'max_loss'.*'pgd'"),
    (
      "mat_max",
      dict(name="worst_case", attacks=[dict(name="pgd", eps=0.1)]),
      "'max_loss'.*'worst_case'",
    ),
    ("cw_pgd_mix", dict(name="worst_case", attacks=[dict(name="pgd", eps=0.1)]), "'mixture'"),
    ("pgd_at", None, "needs train_attack"),
    ("free_at", None, "unknown objective 'free_at'"),
    ("trades", None, "'trades' needs train_attack"),
  ],
)
def test_bad_objective_settings(name, spec, match):
  with pytest.raises(checks.InputError, match=match):
    training.make_input_fn(name, spec)


def test_randomized_objectives_need_a_noisy_model():
  objective = training.make_input_fn("gaussian")
  with pytest.raises(checks.InputError, match="'gaussian' trains a randomized model"):
    training.make_input_fn("gaussian", model_cfg=dict(name="small_cnn"))
  tx = optax.sgd(0.1)
  with pytest.raises(checks.InputError, match="model.noise"):
    training.make_train_step(small_model(), tx, objective, parallel.mesh())
  assert objectives.create("gaussian").randomized
