"""`jaxrobust.models.layers` computes what Flax and lax compute: values and gradients."""

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
