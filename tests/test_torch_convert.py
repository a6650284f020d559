"""The PyTorch twins of the Flax models compute the same logits (skipped without PyTorch)."""
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jaxrobust as jr  # pylint: disable=g-import-not-at-top
from benchmarks import torch_models  # pylint: disable=g-import-not-at-top

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
ATOL = 1e-4

MODELS = {
    "small_cnn": dict(width=4),
    "seed_cnn": {},
    "preact_resnet18": {},
    "wide_resnet": dict(depth=10, width=1),
}


def randomized_batch_stats(variables, key):
  """Running statistics away from init (mean 0, var 1), so a mix-up would show."""
  if "batch_stats" not in variables:
    return variables
  leaves, treedef = jax.tree.flatten(variables["batch_stats"])
  keys = jax.random.split(key, len(leaves))
  stats = jax.tree.unflatten(treedef, [
      0.2 * jax.random.normal(k, l.shape) if i % 2 == 0
      else jax.random.uniform(k, l.shape, minval=0.5, maxval=2.0)
      for i, (k, l) in enumerate(zip(keys, leaves))])
  # flatten orders each BatchNorm's leaves as (mean, var).
  return {**variables, "batch_stats": stats}


def randomized_scales(variables, key):
  """BatchNorm scale and bias away from init (1 and 0)."""
  def perturb(path, leaf):
    names = [getattr(p, "key", "") for p in path]
    if any(n.startswith("BatchNorm") for n in names):
      return leaf + 0.1 * jax.random.normal(jax.random.fold_in(key, zlib.crc32(str(path).encode())),
                                            leaf.shape)
    return leaf
  return {**variables, "params": jax.tree_util.tree_map_with_path(perturb, variables["params"])}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("hw", [(32, 32), (28, 28)])
def test_converted_model_gives_the_same_logits(name, hw):
  model = jr.models.create(name, num_classes=10, mean=MEAN, std=STD, **MODELS[name])
  x = jax.random.uniform(jax.random.key(1), (3, *hw, 3))
  variables = model.init(jax.random.key(0), x[:1])
  variables = randomized_scales(randomized_batch_stats(variables, jax.random.key(2)),
                                jax.random.key(3))
  expected = np.asarray(model.apply(variables, x, train=False))

  net = torch_models.to_torch(model, variables, input_hw=hw)
  assert not net.training
  with torch.no_grad():
    got = net(torch_models.nhwc_to_nchw(np.asarray(x))).numpy()
  assert got.shape == expected.shape
  np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)


def test_input_gradients_agree():
  # Attacks use input gradients: they must agree too.
  model = jr.models.create("small_cnn", num_classes=10, mean=MEAN, std=STD, width=4)
  x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3))
  y = jnp.array([3, 7])
  variables = model.init(jax.random.key(0), x[:1])
  loss = lambda x: -jnp.sum(jax.nn.log_softmax(model.apply(variables, x))[jnp.arange(2), y])
  expected = np.asarray(jax.grad(loss)(x))

  net = torch_models.to_torch(model, variables)
  xt = torch_models.nhwc_to_nchw(np.asarray(x)).requires_grad_(True)
  torch.nn.functional.cross_entropy(net(xt), torch.tensor([3, 7]), reduction="sum").backward()
  np.testing.assert_allclose(torch_models.nchw_to_nhwc(xt.grad), expected, atol=1e-5, rtol=1e-4)


def test_batch_norm_settings_match_flax():
  model = jr.models.create("preact_resnet18", num_classes=10, mean=MEAN, std=STD)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  net = torch_models.to_torch(model, variables)
  bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  assert len(bns) == 17
  assert all(bn.eps == 1e-5 and abs(bn.momentum - 0.1) < 1e-9 for bn in bns)


def test_unsupported_model_is_refused():
  class Other(torch.nn.Module):
    pass
  with pytest.raises(ValueError, match="no PyTorch converter"):
    torch_models.to_torch(Other(), {})
