"""Tests of randomized smoothing against closed forms (Cohen et al. 2019)."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from jaxrobust import parallel
from jaxrobust.certification import smoothing
from jaxrobust.checks import InputError

SIGMA = 0.5
ALPHA = 0.001
IMAGE_SHAPE = (8, 8, 1)
DIM = math.prod(IMAGE_SHAPE)
# Probability that a binomial count falls outside the range the tests allow.
OUTSIDE_PROBABILITY = 1e-6

_rng = np.random.RandomState(0)
W = _rng.normal(size=DIM).astype(np.float32)
W_UNIT = W / np.linalg.norm(W)
CENTRE = np.full(DIM, 0.5, np.float32)
B = -float(W @ CENTRE)  # the boundary w.x + b = 0 passes through the grey image
W_10 = 3.0 * _rng.normal(size=(DIM, 10)).astype(np.float32)


def flat(x):
  return x.reshape(x.shape[0], -1)


# Module-level classifiers: the same function objects reuse the compiled chunk.
def linear_two_class(x):
  """Logits [0, w.x + b]: class 1 exactly when w.x + b > 0."""
  score = flat(x) @ W + B
  return jnp.stack([jnp.zeros_like(score), score], axis=-1)


def constant_class_4(x):
  """Predicts class 4 of 5 whatever the input."""
  return jnp.broadcast_to(jnp.arange(5.0), (x.shape[0], 5))


def sign_of_first_pixel(x):
  """Class 1 when the first pixel exceeds 1/2: a fair coin at the grey image."""
  score = flat(x)[:, 0] - 0.5
  return jnp.stack([jnp.zeros_like(score), score], axis=-1)


def linear_ten_class(x):
  return (flat(x) - 0.5) @ W_10


def images_at_signed_distances(distances):
  """Images at signed L2 distance t from the boundary of `linear_two_class`."""
  x = CENTRE + np.asarray(distances, np.float32)[:, None] * W_UNIT
  assert x.min() >= 0 and x.max() <= 1
  return x.reshape((-1,) + IMAGE_SHAPE)


def grey_images(count):
  return np.full((count,) + IMAGE_SHAPE, 0.5, np.float32)


def cohen_radius(successes, n, alpha):
  """sigma Phi^-1 of the exact one-sided Clopper-Pearson bound, from scipy's binomtest."""
  if successes == 0:
    return -np.inf
  interval = scipy.stats.binomtest(int(successes), n).proportion_ci(
    confidence_level=1 - 2 * alpha, method="exact"
  )
  return SIGMA * scipy.stats.norm.ppf(interval.low)


def test_linear_classifier_radius_matches_closed_form():
  distances = np.array([0.15, -0.25, 0.4, -0.6])
  x = images_at_signed_distances(distances)
  n = 100_000
  pred, radius = smoothing.certify(
    linear_two_class, x, jax.random.key(0), sigma=SIGMA, n0=1000, n=n, alpha=ALPHA
  )
  assert pred.dtype == np.int32 and radius.dtype == np.float32
  np.testing.assert_array_equal(pred, (distances > 0).astype(np.int32))
  true_distance = np.abs(distances)
  # w.(x + d) + b = w.x + b + ||w|| N(0, sigma^2): P(top class) = Phi(dist / sigma).
  p_top = scipy.stats.norm.cdf(true_distance / SIGMA)
  for r, p, dist in zip(radius, p_top, true_distance):
    assert r <= dist
    low_count = scipy.stats.binom.ppf(OUTSIDE_PROBABILITY, n, p)
    high_count = scipy.stats.binom.isf(OUTSIDE_PROBABILITY, n, p)
    low, high = cohen_radius(low_count, n, ALPHA), cohen_radius(high_count, n, ALPHA)
    assert low - 1e-6 <= r <= high + 1e-6, (r, low, high, dist)


def test_counts_match_closed_form_probability():
  distances = np.array([0.15, -0.4])
  n = 20_000
  counts = smoothing.noise_counts(
    linear_two_class, images_at_signed_distances(distances), jax.random.key(1), sigma=SIGMA, n=n
  )
  assert counts.dtype == np.int32
  np.testing.assert_array_equal(counts.sum(axis=1), n)
  p_class_1 = scipy.stats.norm.cdf(distances / SIGMA)
  low = scipy.stats.binom.ppf(OUTSIDE_PROBABILITY, n, p_class_1)
  high = scipy.stats.binom.isf(OUTSIDE_PROBABILITY, n, p_class_1)
  assert np.all((low <= counts[:, 1]) & (counts[:, 1] <= high)), (counts, low, high)


@pytest.mark.parametrize("n", [10, 1000, 100_000])
def test_unanimous_draws_give_the_largest_radius(n):
  pred, radius = smoothing.certify(
    constant_class_4, grey_images(2), jax.random.key(0), sigma=SIGMA, n0=10, n=n, alpha=ALPHA
  )
  np.testing.assert_array_equal(pred, [4, 4])
  expected = SIGMA * scipy.stats.norm.ppf(ALPHA ** (1 / n))
  np.testing.assert_allclose(radius, [expected, expected], rtol=1e-6)


def test_certify_abstains_when_n_cannot_show_p_above_half():
  # All n draws agree, yet alpha^(1/n) <= 1/2 for n <= 9 at alpha = 0.001.
  pred, radius = smoothing.certify(
    constant_class_4, grey_images(1), jax.random.key(0), sigma=SIGMA, n0=10, n=9, alpha=ALPHA
  )
  np.testing.assert_array_equal(pred, [-1])
  np.testing.assert_array_equal(radius, [0.0])


def test_tie_abstains():
  x = grey_images(3)
  pred = smoothing.predict(
    sign_of_first_pixel, x, jax.random.key(0), sigma=SIGMA, n=2000, alpha=ALPHA
  )
  np.testing.assert_array_equal(pred, [-1, -1, -1])
  pred, radius = smoothing.certify(
    sign_of_first_pixel, x, jax.random.key(0), sigma=SIGMA, n0=100, n=10_000, alpha=ALPHA
  )
  np.testing.assert_array_equal(pred, [-1, -1, -1])
  np.testing.assert_array_equal(radius, [0.0, 0.0, 0.0])


def test_predict_returns_the_clear_class():
  distances = np.array([0.5, -0.5])
  pred = smoothing.predict(
    linear_two_class,
    images_at_signed_distances(distances),
    jax.random.key(0),
    sigma=SIGMA,
    n=1000,
    alpha=ALPHA,
  )
  assert pred.dtype == np.int32
  np.testing.assert_array_equal(pred, [1, 0])


def test_same_key_same_result_and_different_key_different_counts():
  x = grey_images(2)
  first = smoothing.noise_counts(sign_of_first_pixel, x, jax.random.key(3), sigma=SIGMA, n=500)
  again = smoothing.noise_counts(sign_of_first_pixel, x, jax.random.key(3), sigma=SIGMA, n=500)
  other = smoothing.noise_counts(sign_of_first_pixel, x, jax.random.key(4), sigma=SIGMA, n=500)
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, other)
  # Each example has its own noise, even for identical images.
  assert first[0, 0] != first[1, 0]


def test_raw_uint32_keys_work_like_typed_keys():
  x = grey_images(1)
  raw = smoothing.noise_counts(sign_of_first_pixel, x, jax.random.PRNGKey(3), sigma=SIGMA, n=300)
  typed = smoothing.noise_counts(sign_of_first_pixel, x, jax.random.key(3), sigma=SIGMA, n=300)
  np.testing.assert_array_equal(raw, typed)


def ten_class_images():
  return np.random.RandomState(1).rand(3, *IMAGE_SHAPE).astype(np.float32)


def test_counts_do_not_depend_on_chunk_size():
  x, n, key = ten_class_images(), 300, jax.random.key(5)
  whole = smoothing.noise_counts(
    linear_ten_class, x, key, sigma=SIGMA, n=n, batch_size=x.shape[0] * n
  )
  assert (whole > 0).sum() > 10  # the noise spreads draws over many classes
  for batch_size in (7, 64, 301):
    chunked = smoothing.noise_counts(
      linear_ten_class, x, key, sigma=SIGMA, n=n, batch_size=batch_size
    )
    np.testing.assert_array_equal(chunked, whole)


def test_counts_do_not_depend_on_device_count():
  if len(jax.devices()) < 2:
    pytest.skip("needs 2 devices (tests/conftest.py sets XLA_FLAGS)")
  x, key = ten_class_images(), jax.random.key(6)
  one = smoothing.noise_counts(
    linear_ten_class,
    x,
    key,
    sigma=SIGMA,
    n=250,
    batch_size=100,
    mesh=parallel.mesh(jax.devices()[:1]),
  )
  two = smoothing.noise_counts(
    linear_ten_class,
    x,
    key,
    sigma=SIGMA,
    n=250,
    batch_size=100,
    mesh=parallel.mesh(jax.devices()[:2]),
  )
  np.testing.assert_array_equal(one, two)


def test_one_compilation_for_every_n_and_sigma():
  x, key = ten_class_images(), jax.random.key(7)
  smoothing.noise_counts(linear_ten_class, x, key, sigma=SIGMA, n=100, batch_size=50)
  compiled = smoothing._add_chunk_counts._cache_size()
  for n, sigma in ((101, 0.25), (977, 1.0), (5000, 0.1)):
    counts = smoothing.noise_counts(linear_ten_class, x, key, sigma=sigma, n=n, batch_size=50)
    np.testing.assert_array_equal(counts.sum(axis=1), n)
  assert smoothing._add_chunk_counts._cache_size() == compiled


GOOD = dict(sigma=SIGMA, n0=10, n=10, alpha=ALPHA, batch_size=10)
BAD_SETTINGS = [
  ("sigma", 0.0, "0.0"),
  ("sigma", -0.25, "-0.25"),
  ("sigma", float("nan"), "nan"),
  ("n0", 0, "0"),
  ("n", 0, "0"),
  ("n", 2.5, "2.5"),
  ("n", 2**31, str(2**31)),
  ("n0", 2**31, str(2**31)),
  ("alpha", 0.0, "0.0"),
  ("alpha", 1.0, "1.0"),
  ("alpha", 1.5, "1.5"),
  ("alpha", float("nan"), "nan"),
  ("batch_size", 0, "0"),
]


@pytest.mark.parametrize("name, value, shown", BAD_SETTINGS)
def test_bad_settings_raise(name, value, shown):
  settings = dict(GOOD, **{name: value})
  with pytest.raises(InputError, match=name) as error:
    smoothing.certify(constant_class_4, grey_images(1), jax.random.key(0), **settings)
  assert shown in str(error.value)
  if name != "n0":
    del settings["n0"]
    with pytest.raises(InputError, match=name):
      smoothing.predict(constant_class_4, grey_images(1), jax.random.key(0), **settings)


def with_value(value, index=0):
  x = grey_images(2)
  x.reshape(-1)[index] = value
  return x


@pytest.mark.parametrize(
  "x, shown",
  [
    (np.full(DIM, 0.5, np.float32), f"({DIM},)"),
    (with_value(np.nan), "NaN"),
    (with_value(1.5), "1.5"),
    (with_value(-0.25, index=7), "-0.25"),
  ],
)
def test_bad_images_raise(x, shown):
  for run in (smoothing.predict, smoothing.certify):
    with pytest.raises(InputError) as error:
      run(constant_class_4, x, jax.random.key(0), sigma=SIGMA)
    assert shown in str(error.value)


def test_bad_key_and_logits_raise():
  with pytest.raises(InputError, match="key"):
    smoothing.predict(constant_class_4, grey_images(1), 3, sigma=SIGMA)
  with pytest.raises(InputError, match="logits"):
    smoothing.predict(lambda x: flat(x)[:, 0], grey_images(1), jax.random.key(0), sigma=SIGMA)


def test_certified_accuracy_by_hand():
  pred = np.array([0, 1, -1, 2])
  radius = np.array([0.5, 0.2, 0.0, 1.0])
  y = np.array([0, 1, 1, 0])
  assert smoothing.certified_accuracy(pred, radius, y, [0.0, 0.2, 0.3, 0.5, 0.6]) == [
    0.5,
    0.5,
    0.25,
    0.25,
    0.0,
  ]


def synthetic_results(count=200):
  rng = np.random.RandomState(2)
  y = rng.randint(0, 10, count)
  pred = np.where(rng.rand(count) < 0.7, y, rng.randint(0, 10, count))
  pred = np.where(rng.rand(count) < 0.1, -1, pred).astype(np.int32)
  radius = np.where(pred >= 0, rng.exponential(0.4, count), 0.0).astype(np.float32)
  return pred, radius, y


def test_report_and_plot(tmp_path):
  pred, radius, y = synthetic_results()
  report = smoothing.certification_report(
    pred, radius, y, sigma=SIGMA, n0=100, n=1000, alpha=ALPHA, seconds=12.0
  )
  report = json.loads(json.dumps(report))  # JSON-ready
  radii, accuracy = report["radii"], report["certified_accuracy"]
  np.testing.assert_allclose(radii, 0.25 * np.arange(len(radii)))
  assert radii[-1] >= radius.max() > radii[-2]
  assert accuracy[0] == np.mean((pred == y) & (pred != -1))
  assert all(a >= b for a, b in zip(accuracy, accuracy[1:]))
  curve = report["curve"]["certified_accuracy"]
  assert all(a >= b for a, b in zip(curve, curve[1:]))
  assert report["abstain_rate"] == np.mean(pred == -1)
  assert report["seconds_per_image"] == 12.0 / len(y)
  assert (report["sigma"], report["n0"], report["n"], report["alpha"]) == (SIGMA, 100, 1000, ALPHA)

  table = smoothing.format_certification_table(report)
  rows = [line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]
  assert len(rows) == len(radii)
  assert rows[0] == f"| 0.00 | {100 * accuracy[0]:.2f} |"

  path = tmp_path / "certified.png"
  smoothing.plot_certified_accuracy(report, path)
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_of_a_real_certify_run():
  distances = np.array([0.3, -0.3, 0.0])
  x = images_at_signed_distances(distances)
  y = np.array([1, 0, 1])
  pred, radius = smoothing.certify(
    linear_two_class, x, jax.random.key(0), sigma=SIGMA, n0=100, n=2000, alpha=ALPHA
  )
  report = smoothing.certification_report(
    pred, radius, y, sigma=SIGMA, n0=100, n=2000, alpha=ALPHA, seconds=1.0, radii=[0.0, 0.1]
  )
  assert report["radii"] == [0.0, 0.1]
  assert report["certified_accuracy"] == smoothing.certified_accuracy(pred, radius, y, [0.0, 0.1])
  assert report["certified_accuracy"][0] == 2 / 3  # the boundary image abstains
  assert report["abstain_rate"] == 1 / 3


def test_counts_do_not_depend_on_the_threefry_partitionable_setting():
  x, key = ten_class_images(), jax.random.key(8)
  counts = []
  for partitionable in (True, False):
    with jax.threefry_partitionable(partitionable):
      counts.append(smoothing.noise_counts(linear_ten_class, x, key, sigma=SIGMA, n=200))
  np.testing.assert_array_equal(*counts)


def test_non_threefry_key_raises():
  with pytest.raises(InputError, match="rbg"):
    smoothing.certify(constant_class_4, grey_images(1), jax.random.key(0, impl="rbg"), sigma=SIGMA)
