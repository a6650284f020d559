"""`jaxrobust.models.layers` computes what Flax and lax compute: values and gradients;
a model's apply functions (`models.inference_fn`, `models.stochastic_fn`) are
values: equal for equal models, sharing compiled programs."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxrobust import models
from jaxrobust.models import layers


def normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (1, 7, 9, 2)])  # odd sizes: VALID drops
def test_max_pool_equals_flax(shape):
  x = normal(0, shape)  # continuous values: no ties
  np.testing.assert_array_equal(layers.max_pool(x), nn.max_pool(x, (2, 2), strides=(2, 2)))
  weights = normal(1, layers.max_pool(x).shape)
  grad = lambda pool: jax.grad(lambda x: jnp.sum(weights * pool(x)))(x)
  np.testing.assert_array_equal(
    grad(layers.max_pool), grad(lambda x: nn.max_pool(x, (2, 2), strides=(2, 2)))
  )


@pytest.mark.parametrize(
  "kernel_shape, strides, padding",
  [
    ((3, 3, 3, 8), (1, 1), "SAME"),
    ((3, 3, 4, 5), (2, 2), "SAME"),
    ((5, 5, 3, 6), (1, 1), "VALID"),
    ((1, 1, 4, 8), (2, 2), "VALID"),
    ((3, 2, 2, 3), (1, 2), ((2, 0), (1, 1))),
  ],
)
def test_conv_values_and_gradients_equal_lax(kernel_shape, strides, padding):
  x, kernel = normal(0, (3, 11, 10, kernel_shape[2])), normal(1, kernel_shape)
  conv = lambda f: (
    lambda x, k: f(x, k, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
  )
  ours, theirs = conv(layers.conv_general_dilated), conv(lax.conv_general_dilated)
  np.testing.assert_allclose(ours(x, kernel), theirs(x, kernel), rtol=1e-5, atol=1e-5)
  weights = normal(2, theirs(x, kernel).shape)
  grads = lambda f: jax.jit(jax.grad(lambda x, k: jnp.sum(weights * f(x, k)), (0, 1)))(x, kernel)
  for a, b in zip(grads(ours), grads(theirs)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.abs(b).max()))
  # Forward mode too (spectral normalisation's power iteration uses it).
  tangents = (normal(3, x.shape), normal(4, kernel.shape))
  jvp = lambda f: jax.jvp(f, (x, kernel), tangents)[1]
  np.testing.assert_allclose(jvp(ours), jvp(theirs), rtol=1e-4, atol=1e-4)


def test_conv_falls_back_to_lax_for_dilation_and_groups():
  x = normal(0, (2, 9, 9, 4))
  for kwargs, kernel in (
    (dict(rhs_dilation=(2, 2)), normal(1, (3, 3, 4, 2))),
    (dict(feature_group_count=2), normal(1, (3, 3, 2, 4))),
  ):
    args = (x, kernel, (1, 1), "SAME")
    kwargs = dict(dimension_numbers=("NHWC", "HWIO", "NHWC"), **kwargs)
    np.testing.assert_array_equal(
      layers.conv_general_dilated(*args, **kwargs), lax.conv_general_dilated(*args, **kwargs)
    )


def test_models_conv_has_nn_conv_gradients():
  x = normal(0, (4, 8, 8, 3))
  variables = nn.Conv(5, (3, 3), strides=2).init(jax.random.key(0), x)
  grad = lambda layer: jax.grad(lambda v: jnp.sum(jnp.sin(layer.apply(v, x))))(variables)
  for a, b in zip(
    jax.tree.leaves(grad(models.Conv(5, (3, 3), strides=2))),
    jax.tree.leaves(grad(nn.Conv(5, (3, 3), strides=2))),
  ):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


# A model's apply functions.


def small_cnn(**settings):
  return models.create("small_cnn", num_classes=3, mean=(0.5,), std=(0.25,), width=2, **settings)


def test_apply_functions_are_equal_for_equal_models():
  a, b = models.inference_fn(small_cnn()), models.inference_fn(small_cnn())
  assert a is not b and a == b and hash(a) == hash(b)
  assert models.inference_fn(small_cnn(), base=True) == a  # no base classifier: the same function
  assert models.inference_fn(small_cnn(noise=dict(sigma=0.5))) != a
  noisy = lambda: small_cnn(noise=dict(sigma=0.5, samples=2))
  assert models.inference_fn(noisy()) == models.inference_fn(noisy())
  assert models.inference_fn(noisy(), base=True) == models.inference_fn(noisy(), base=True)
  assert models.inference_fn(noisy(), base=True) != models.inference_fn(noisy())
  s, t = models.stochastic_fn(noisy()), models.stochastic_fn(noisy())
  assert s is not t and s == t and hash(s) == hash(t)
  assert s != models.stochastic_fn(small_cnn(noise=dict(sigma=0.25, samples=2)))
  assert models.stochastic_fn(small_cnn()) is None


def test_apply_functions_compute_the_models_logits():
  x = normal(0, (2, 8, 8, 1))
  model = small_cnn(noise=dict(sigma=0.5, samples=3, seed=4))
  variables = model.init(jax.random.key(0), x)
  base = lambda v, x: model.classifier.apply({"params": v["params"]["classifier"]}, x)
  np.testing.assert_array_equal(
    models.inference_fn(model, base=True)(variables, x), base(variables, x)
  )
  # f~: the log of the mean softmax over the draws fixed by the seed.
  draws = 0.5 * jax.random.normal(jax.random.key(4), (3, 1, 8, 8, 1))
  mean_softmax = jnp.mean(jnp.stack([jax.nn.softmax(base(variables, x + d)) for d in draws]), 0)
  np.testing.assert_allclose(
    models.inference_fn(model)(variables, x), jnp.log(mean_softmax), rtol=1e-5, atol=1e-5
  )
  # One fresh draw from the key, the log-softmax of f on it.
  key = jax.random.key(7)
  noise = 0.5 * jax.random.normal(key, (1, *x.shape))[0]
  np.testing.assert_allclose(
    models.stochastic_fn(model)(variables, x, key),
    jax.nn.log_softmax(base(variables, x + noise)),
    rtol=1e-5,
    atol=1e-5,
  )


TRACES = []


class Traced(nn.Module):
  """A linear classifier that counts how often it is traced (in `TRACES`)."""

  @nn.compact
  def __call__(self, x, train=False):
    TRACES.append(1)
    return nn.Dense(3)(x.reshape(len(x), -1))


def test_equal_apply_functions_share_compiled_programs():
  x = normal(0, (2, 4, 4, 1))
  variables = Traced().init(jax.random.key(0), x)
  TRACES.clear()
  # jax.jit's caches hold their function weakly: the first one kept alive.
  first, second = models.inference_fn(Traced()), models.inference_fn(Traced())
  np.testing.assert_array_equal(jax.jit(first)(variables, x), jax.jit(second)(variables, x))
  assert len(TRACES) == 1

  @functools.partial(jax.jit, static_argnums=0)
  def logits(apply_fn, variables, x):
    return apply_fn(variables, x)

  logits(models.inference_fn(Traced()), variables, x)
  logits(models.inference_fn(Traced()), variables, x)
  assert len(TRACES) == 2
