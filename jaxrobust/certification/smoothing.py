"""Randomized smoothing: prediction and certification (Cohen, Rosenfeld & Kolter 2019).

Given a base classifier f(x) = argmax_c logits_fn(x)_c, the smoothed classifier
is

  g(x) = argmax_c P(f(x + d) = c),   d ~ N(0, sigma^2 I).

If the top class cA of g at x has probability pA > 1/2 under the noise, then
g(x + delta) = cA for every ||delta||_2 < sigma * Phi^-1(pA) (Cohen et al.,
Theorem 1, with the runner-up bounded by pB <= 1 - pA). `predict` and
`certify` are the paper's Monte Carlo algorithms PREDICT and CERTIFY, which
replace pA by a test or a one-sided confidence bound. Noise is added in the
[0, 1] pixel space without clipping, as in the paper, so the radius is an
L2 distance between images in [0, 1].

All the forward passes go through `noise_counts` (`certification.noise`);
the reports of a run are in `certification.smoothing_report`, and both are
reachable from here.

References:
  Cohen, Rosenfeld & Kolter, "Certified adversarial robustness via randomized
  smoothing", ICML 2019.
"""

import functools

import jax
import numpy as np
import scipy.stats
from jax.sharding import Mesh
from jaxtyping import ArrayLike

from jaxrobust import checks
from jaxrobust.certification.noise import (
  MAX_DRAWS,
  check_draws,
  check_sigma,
  noise_counts,
  threefry_key,
)
from jaxrobust.certification.noise import (  # noqa: F401  (its compile cache, for tests)
  add_chunk_counts as _add_chunk_counts,
)
from jaxrobust.certification.smoothing_report import (
  CURVE_RADIUS_STEP,
  REPORT_RADIUS_STEP,
  certification_report,
  certified_accuracy,
  format_certification_table,
  plot_certified_accuracy,
)
from jaxrobust.types import ApplyFn, Images, LogitsFn, PRNGKey, Variables


def predict(
  logits_fn: LogitsFn | ApplyFn,
  x: Images,
  key: PRNGKey,
  *,
  sigma: float,
  n: int = 100,
  alpha: float = 0.001,
  batch_size: int = 1000,
  mesh: Mesh | None = None,
  variables: Variables | None = None,
) -> np.ndarray:
  """Cohen et al.'s PREDICT: the smoothed classifier's class, or -1 (abstain).

  For each image, counts f(x + d) over n draws d ~ N(0, sigma^2 I), takes the
  two most frequent classes with counts nA >= nB, and returns the top class
  if the two-sided binomial test of nA successes in nA + nB trials with
  p = 1/2 (`scipy.stats.binomtest`) has p-value <= alpha, else -1.

  Guarantee (Proposition 1 of the paper): for each image, the probability
  over the noise that PREDICT returns a class other than g(x) is at most
  alpha. Abstention (-1) is not an error of this kind: it means the n draws
  could not separate the top two classes. The guarantee is per image, not
  simultaneous over the batch.

  Args:
    logits_fn: base classifier `logits_fn(x_batch) -> logits`, images in [0, 1], NHWC.
    x: images [B, ...] in [0, 1].
    key: a threefry2x32 PRNG key (see `noise_counts`); the same key gives the
      same predictions.
    sigma: noise standard deviation, > 0.
    n: number of noisy draws per image, 1 <= n <= 2**31 - 1.
    alpha: level of the test, in (0, 1).
    batch_size: forward passes per compiled chunk (see `noise_counts`).
    mesh: a 1-D mesh over `parallel.BATCH_AXIS` (default: all devices).
    variables: see `noise_counts`.

  Returns:
    int32 numpy array [B]: the predicted class, or -1 to abstain.
  """
  _check_alpha(alpha)
  counts = noise_counts(
    logits_fn, x, key, sigma=sigma, n=n, batch_size=batch_size, mesh=mesh, variables=variables
  )
  return np.array([_predict_from_counts(row, alpha) for row in counts], np.int32)


def _predict_from_counts(counts: np.ndarray, alpha: float) -> int:
  """PREDICT's decision for one image's class counts."""
  if counts.size == 1:
    top, count_top, count_second = 0, int(counts[0]), 0
  else:
    second, top = np.argsort(counts, kind="stable")[-2:]
    count_top, count_second = int(counts[top]), int(counts[second])
  p_value = scipy.stats.binomtest(count_top, count_top + count_second, 0.5).pvalue
  return int(top) if p_value <= alpha else -1


def certify(
  logits_fn: LogitsFn | ApplyFn,
  x: Images,
  key: PRNGKey,
  *,
  sigma: float,
  n0: int = 100,
  n: int = 100_000,
  alpha: float = 0.001,
  batch_size: int = 1000,
  mesh: Mesh | None = None,
  variables: Variables | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Cohen et al.'s CERTIFY: the smoothed class and a certified L2 radius, or abstain.

  For each image: guess cA, the most frequent class of f(x + d) over n0
  draws; count nA, the number of n fresh, independent draws classified cA;
  take the one-sided Clopper-Pearson lower confidence bound at level
  1 - alpha on pA = P(f(x + d) = cA),

    pA_lower = Beta(alpha; nA, n - nA + 1) quantile   (0 when nA = 0);

  if pA_lower > 1/2 return (cA, sigma * Phi^-1(pA_lower)), else (-1, 0.0).

  Guarantee (Theorem 1 and Proposition 2 of the paper): for each image x,
  with probability at least 1 - alpha over the noise drawn here, if CERTIFY
  returns a class cA with radius R, then the smoothed classifier
  g(x') = argmax_c P(f(x' + d) = c), d ~ N(0, sigma^2 I), satisfies
  g(x + delta) = cA for every perturbation with ||delta||_2 < R (L2 norm over
  all pixels and channels, in the [0, 1] pixel space; x + delta need not stay
  in [0, 1]). Abstaining (-1, radius 0) makes no claim: the n draws could not
  show pA > 1/2. The guarantee is per image, not simultaneous over the batch.
  The largest radius n draws can give is sigma * Phi^-1(alpha^(1/n)), reached
  when all n draws agree.

  Args:
    logits_fn: base classifier `logits_fn(x_batch) -> logits`, images in [0, 1], NHWC.
    x: images [B, ...] in [0, 1].
    key: a threefry2x32 PRNG key (see `noise_counts`); the n0 selection draws
      use `fold_in(key, 0)` and the n estimation draws `fold_in(key, 1)`, so
      the two sets of draws are independent.
    sigma: noise standard deviation, > 0.
    n0: draws used to guess the top class, 1 <= n0 <= 2**31 - 1.
    n: draws used to bound its probability, 1 <= n <= 2**31 - 1.
    alpha: failure probability of the certificate, in (0, 1).
    batch_size: forward passes per compiled chunk (see `noise_counts`).
    mesh: a 1-D mesh over `parallel.BATCH_AXIS` (default: all devices).
    variables: see `noise_counts`.

  Returns:
    (pred, radius): int32 numpy array [B] with the class or -1 (abstain), and
    float32 numpy array [B] with the certified L2 radius (0.0 when abstaining).
  """
  check_sigma(sigma)
  check_draws("n0", n0)
  check_draws("n", n)
  _check_alpha(alpha)
  key = threefry_key(key)
  # fold_in, unlike split, does not depend on the jax_threefry_partitionable flag.
  select_key, estimate_key = jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)
  draws = functools.partial(
    noise_counts, logits_fn, x, sigma=sigma, batch_size=batch_size, mesh=mesh, variables=variables
  )
  guess_counts = draws(select_key, n=n0)
  guess = np.argmax(guess_counts, axis=1)
  counts = draws(estimate_key, n=n)
  count_guess = np.take_along_axis(counts, guess[:, None], axis=1)[:, 0]
  p_lower = clopper_pearson_lower(count_guess, n, alpha)
  certified = p_lower > 0.5
  pred = np.where(certified, guess, -1).astype(np.int32)
  radius = np.where(certified, sigma * scipy.stats.norm.ppf(p_lower), 0.0)
  return pred, radius.astype(np.float32)


def clopper_pearson_lower(successes: ArrayLike, trials: int, alpha: float) -> np.ndarray:
  """One-sided Clopper-Pearson lower bound at level 1 - alpha on a binomial proportion.

  The alpha quantile of Beta(successes, trials - successes + 1), and 0 where
  successes = 0: P(p >= bound) >= 1 - alpha for every true proportion p.

  Args:
    successes: the number of successes (elementwise on arrays).
    trials: the number of trials.
    alpha: the bound's failure probability, in (0, 1).

  Returns:
    float64 array of `successes`' shape: the lower bounds.

  References:
    Clopper & Pearson, "The use of confidence or fiducial limits illustrated
    in the case of the binomial", Biometrika 1934.
  """
  count = np.asarray(successes, np.float64)
  with np.errstate(invalid="ignore"):
    bound = scipy.stats.beta.ppf(alpha, count, trials - count + 1)
  return np.where(count > 0, bound, 0.0)


def _check_alpha(alpha: float) -> None:
  checks.in_interval("alpha", alpha, 0, 1, closed=(False, False))


__all__ = [
  "CURVE_RADIUS_STEP",
  "MAX_DRAWS",
  "REPORT_RADIUS_STEP",
  "certification_report",
  "certified_accuracy",
  "certify",
  "clopper_pearson_lower",
  "format_certification_table",
  "noise_counts",
  "plot_certified_accuracy",
  "predict",
]
