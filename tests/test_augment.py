"""Augmentation on device: crops are slices of the padded image, flips are exact
mirrors, and every draw depends only on the example's key."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrobust import checks
from jaxrobust.training import augment
from jaxrobust import keys as keys_lib

PAD = 2


def images(n, h=6, w=8, c=2, seed=0):
  """Distinct random pixels, so that one crop and flip explains each output."""
  return np.random.default_rng(seed).uniform(0.1, 1.0, (n, h, w, c)).astype(np.float32)


def candidates(x, padding, mode, flip):
  """Every (dy, dx, mirrored) output of one image [H, W, C], by numpy slicing."""
  h, w = x.shape[:2]
  padded = np.pad(
    x, ((padding,) * 2, (padding,) * 2, (0, 0)), mode="constant" if mode == "zero" else "reflect"
  )
  out = {}
  for dy in range(2 * padding + 1):
    for dx in range(2 * padding + 1):
      crop = padded[dy : dy + h, dx : dx + w]
      out[(dy, dx, False)] = crop
      if flip:
        out[(dy, dx, True)] = crop[:, ::-1]
  return out


def which(out, options):
  """The one candidate `out` equals exactly."""
  hits = [k for k, v in options.items() if np.array_equal(out, v)]
  assert len(hits) == 1, hits
  return hits[0]


@pytest.mark.parametrize("mode", ["zero", "reflect"])
def test_crop_and_flip_is_a_slice_of_the_padded_image(mode):
  x = images(64)
  fn = jax.jit(augment.create("crop_flip", padding=PAD, padding_mode=mode))
  out = np.asarray(fn(jnp.asarray(x), keys_lib.example_keys(jax.random.key(0), 64)))
  drawn = [which(o, candidates(xi, PAD, mode, flip=True)) for o, xi in zip(out, x)]
  dys, dxs, flips = zip(*drawn)
  # Every offset in {0, ..., 2p} occurs in both axes, and both flips.
  assert set(dys) == set(dxs) == set(range(2 * PAD + 1))
  assert 16 <= sum(flips) <= 48


@pytest.mark.parametrize("mode", ["zero", "reflect"])
def test_crop_at_equals_numpy_slicing(mode):
  x = images(1)[0]
  options = candidates(x, PAD, mode, flip=False)
  for dy, dx in [(0, 0), (PAD, PAD), (2 * PAD, 1), (3, 2 * PAD)]:
    np.testing.assert_array_equal(
      augment.crop_at(jnp.asarray(x), dy, dx, padding=PAD, padding_mode=mode),
      options[(dy, dx, False)],
    )
  np.testing.assert_array_equal(augment.crop_at(x, PAD, PAD, padding=PAD), x)


def test_flip_alone_is_an_exact_mirror_or_the_image():
  x = images(32)
  out = np.asarray(
    augment.create("flip")(jnp.asarray(x), keys_lib.example_keys(jax.random.key(1), 32))
  )
  mirrored = np.array([np.array_equal(o, xi[:, ::-1]) for o, xi in zip(out, x)])
  same = np.array([np.array_equal(o, xi) for o, xi in zip(out, x)])
  assert (mirrored ^ same).all() and mirrored.any() and same.any()


def test_draws_depend_on_the_example_index_only():
  x = images(16)
  fn = augment.create("crop_flip", padding=PAD, padding_mode="reflect")
  key = jax.random.key(3)
  whole = np.asarray(fn(jnp.asarray(x), keys_lib.example_keys(key, 16)))
  # The second half alone, keyed by its global indices 8..15 (another device's share).
  half = np.asarray(fn(jnp.asarray(x[8:]), keys_lib.example_keys(key, jnp.arange(8, 16))))
  np.testing.assert_array_equal(half, whole[8:])
  # One example alone, batch of one.
  one = np.asarray(fn(jnp.asarray(x[5:6]), keys_lib.example_keys(key, jnp.arange(5, 6))))
  np.testing.assert_array_equal(one, whole[5:6])
  # And the draws differ between examples (the same image at every index).
  same = np.repeat(x[:1], 16, 0)
  outs = np.asarray(fn(jnp.asarray(same), keys_lib.example_keys(key, 16)))
  assert len({o.tobytes() for o in outs}) > 4


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(name="cutout"), "data.augment 'cutout'"),
    (dict(name="crop_flip", padding_mode="wrap"), "data.padding_mode 'wrap'"),
    (dict(name="crop", padding=0), "data.crop_padding.*0"),
  ],
)
def test_bad_augmentation_settings(kwargs, match):
  with pytest.raises(checks.InputError, match=match):
    augment.create(**kwargs)


def test_reflection_wider_than_the_image_is_refused():
  fn = augment.create("crop", padding=6, padding_mode="reflect")
  with pytest.raises(checks.InputError, match="crop_padding 6 must be smaller"):
    fn(jnp.zeros((2, 6, 5, 1)), keys_lib.example_keys(jax.random.key(0), 2))
