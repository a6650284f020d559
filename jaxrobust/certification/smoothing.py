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

All the forward passes go through `noise_counts`: one jit-compiled function
evaluates a chunk of `batch_size` noisy copies (of one or many images) split
over every device of a mesh, and a host loop calls it until all the draws are
counted. Draw j of example i uses the key `fold_in(fold_in(key, i), j)`, so
the counts depend only on `key`, never on `batch_size` or on the number of
devices.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats
from jax.sharding import PartitionSpec as P

from jaxrobust import checks
from jaxrobust.models import inference
from jaxrobust import parallel

MAX_DRAWS = 2**31 - 1  # counts are int32: at most this many draws per example
REPORT_RADIUS_STEP = 0.25
CURVE_RADIUS_STEP = 0.01


def noise_counts(logits_fn, x, key, *, sigma, n, batch_size=1000, mesh=None, variables=None):
  """Counts the classes the base classifier gives to `n` noisy copies of each image.

  counts[i, c] = #{j < n : argmax logits_fn(x[i] + d_ij) = c}, where
  d_ij = sigma * normal(fold_in(fold_in(key, i), j), x.shape[1:]). The draws
  are evaluated `batch_size` at a time (memory is bounded whatever `n` is),
  each chunk split over the devices of `mesh`; the counts are identical for
  every `batch_size` and every mesh (up to the base classifier giving a
  different argmax for the same input at a different batch size). The
  normals come from JAX's original (non-partitionable) threefry variant
  whatever the `jax_threefry_partitionable` setting, so they do not change
  with it either.

  Args:
    logits_fn: base classifier, `logits_fn(x_batch) -> logits [batch, classes]`,
      traceable by `jax.jit`; it is a static argument of the compiled chunk,
      so pass the same function object across calls to reuse the compilation.
    variables: optional; then `logits_fn` is `apply_fn(variables, x_batch)
      -> logits` and the variables are an argument of the compiled chunk: one
      compilation per `apply_fn`, whatever the weights (`inference.split`).
    x: images [B, ...] in [0, 1]; they, the noise and the noisy copies are float32.
    key: a threefry2x32 PRNG key (JAX's default: `jax.random.key(seed)` or
      `jax.random.PRNGKey(seed)`).
    sigma: standard deviation of the Gaussian noise, > 0.
    n: number of noisy draws per image, 1 <= n <= 2**31 - 1.
    batch_size: forward passes per compiled chunk (rounded up to a multiple of
      the number of devices, and down to B * n when that is smaller).
    mesh: a 1-D mesh over `parallel.BATCH_AXIS` (default: all devices).

  Returns:
    int32 numpy array [B, num_classes]; every row sums to n.

  Runs on the host, as `predict` and `certify` do (each chunk is a compiled
  program; the counts and the confidence bounds are numpy): call it outside
  `jax.jit`, `vmap` and `scan`; `logits_fn` itself may be anything traceable.
  """
  checks.require(
    checks.is_concrete(x) and checks.is_concrete(key),
    "smoothing.noise_counts, predict and certify run on the host (chunks of draws, then "
    "numpy confidence bounds): call them outside jax.jit / vmap / scan, with concrete "
    "images and key",
  )
  _check_sigma(sigma)
  _check_draws("n", n)
  _check_draws("batch_size", batch_size)
  key = _threefry_key(key)
  checks.check_images(x)
  x = jnp.asarray(x, jnp.float32)
  mesh = parallel.mesh() if mesh is None else mesh
  num_devices = mesh.devices.size
  num_examples = x.shape[0]
  total = num_examples * n
  chunk = min(batch_size, max(total, 1))
  per_device = -(-chunk // num_devices)
  if variables is None:
    apply_fn, variables = inference.constant_apply(logits_fn), ()
  else:
    apply_fn = logits_fn
  num_classes = _num_classes(functools.partial(apply_fn, variables), x, per_device)
  if total == 0:
    return np.zeros((0, num_classes), np.int32)
  counts = jax.device_put(
    np.zeros((num_devices * num_examples, num_classes), np.int32), parallel.batch_sharding(mesh)
  )
  replicate = functools.partial(jax.device_put, device=parallel.replicated(mesh))
  x, key, sigma_array, n_array = map(replicate, (x, key, np.float32(sigma), np.uint32(n)))
  # Each draw's noise is generated on one device from its own key, so the
  # partitionable threefry variant (JAX's default) buys nothing here, and on
  # XLA:CPU it generates normals about 5x slower than the original variant.
  # Fixing the variant also makes the noise independent of the user's setting.
  with jax.threefry_partitionable(False):
    for start in range(0, total, per_device * num_devices):
      counts = _add_chunk_counts(
        counts,
        variables,
        x,
        key,
        sigma_array,
        n_array,
        np.uint32(start // n),
        np.uint32(start % n),
        apply_fn=apply_fn,
        mesh=mesh,
        per_device=per_device,
      )
  per_device_counts = np.asarray(counts).reshape(num_devices, num_examples, -1)
  return per_device_counts.sum(axis=0, dtype=np.int32)


@functools.partial(jax.jit, static_argnames=("apply_fn", "mesh", "per_device"), donate_argnums=0)
def _add_chunk_counts(
  counts, variables, x, key, sigma, n, start_example, start_draw, *, apply_fn, mesh, per_device
):
  """Adds the classes of draws start .. start + chunk - 1 (flat index i * n + j) to `counts`.

  `counts` is [devices * B, classes], one block of B rows per device, so no
  collective is needed; the caller sums the blocks at the end. Draws past
  B * n (the padded tail of the last chunk) are computed and not counted.
  """

  def count_on_device(counts, variables, x, key, sigma, n, start_example, start_draw):
    device = jax.lax.axis_index(parallel.BATCH_AXIS).astype(jnp.uint32)
    # uint32 cannot overflow: start_draw < n <= 2**31 - 1 and the offset within
    # the chunk is far below 2**31 (a chunk holds that many images in memory).
    offset = start_draw + device * per_device + jnp.arange(per_device, dtype=jnp.uint32)
    example = start_example + offset // n
    draw = offset % n
    counted = example < x.shape[0]
    example = jnp.minimum(example, x.shape[0] - 1)
    noise = jax.vmap(_gaussian_draw, in_axes=(None, 0, 0, None, None))(
      key, example, draw, x.shape[1:], x.dtype
    )
    logits = apply_fn(variables, x[example] + sigma * noise)
    predicted = jnp.argmax(logits, axis=-1)
    return counts.at[example, predicted].add(counted.astype(jnp.int32))

  replicated = P()
  return parallel.data_parallel(
    count_on_device,
    mesh,
    in_specs=(P(parallel.BATCH_AXIS),) + (replicated,) * 7,
    out_specs=P(parallel.BATCH_AXIS),
  )(counts, variables, x, key, sigma, n, start_example, start_draw)


def _gaussian_draw(key, example, draw, shape, dtype):
  """Standard normal noise of draw `draw` of example `example`: a counter-based key."""
  key = jax.random.fold_in(jax.random.fold_in(key, example), draw)
  return jax.random.normal(key, shape, dtype)


def predict(
  logits_fn, x, key, *, sigma, n=100, alpha=0.001, batch_size=1000, mesh=None, variables=None
):
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


def _predict_from_counts(counts, alpha):
  """PREDICT's decision for one image's class counts."""
  if counts.size == 1:
    top, count_top, count_second = 0, int(counts[0]), 0
  else:
    second, top = np.argsort(counts, kind="stable")[-2:]
    count_top, count_second = int(counts[top]), int(counts[second])
  p_value = scipy.stats.binomtest(count_top, count_top + count_second, 0.5).pvalue
  return int(top) if p_value <= alpha else -1


def certify(
  logits_fn,
  x,
  key,
  *,
  sigma,
  n0=100,
  n=100_000,
  alpha=0.001,
  batch_size=1000,
  mesh=None,
  variables=None,
):
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
  _check_sigma(sigma)
  _check_draws("n0", n0)
  _check_draws("n", n)
  _check_alpha(alpha)
  key = _threefry_key(key)
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


def clopper_pearson_lower(successes, trials, alpha):
  """One-sided Clopper-Pearson lower bound at level 1 - alpha on a binomial proportion.

  The alpha quantile of Beta(successes, trials - successes + 1), and 0 where
  successes = 0: P(p >= bound) >= 1 - alpha for every true proportion p.
  Works elementwise on arrays of `successes`; returns float64.
  """
  successes = np.asarray(successes, np.float64)
  with np.errstate(invalid="ignore"):
    bound = scipy.stats.beta.ppf(alpha, successes, trials - successes + 1)
  return np.where(successes > 0, bound, 0.0)


def certified_accuracy(pred, radius, y, radii):
  """Fraction of examples with pred == y and radius >= r, for each r in `radii`.

  Abstentions (pred = -1) never count as correct, so at r = 0 this is the
  accuracy of the smoothed classifier with abstentions counted as errors.
  """
  pred, radius, y = _check_results(pred, radius, y)
  correct = pred == y
  return [float(np.mean(correct & (radius >= r))) if y.size else 0.0 for r in radii]


def certification_report(pred, radius, y, *, sigma, n0, n, alpha, seconds, radii=None):
  """A JSON-ready summary of a `certify` run against the true labels `y`.

  Args:
    pred, radius: the outputs of `certify`.
    y: the true labels [B].
    sigma, n0, n, alpha: the settings `certify` ran with (recorded as given).
    seconds: wall-clock time of the run.
    radii: radii for the table; default 0, 0.25, 0.5, ..., up to the first
      multiple of 0.25 at or above the largest certified radius.

  Returns:
    dict with the settings, `num_examples`, `radii` and `certified_accuracy`
    (same length), `abstain_rate`, `max_radius`, `seconds`,
    `seconds_per_image`, and `curve`: certified accuracy on a 0.01 grid of
    radii up to the last table radius, for plotting.
  """
  pred, radius, y = _check_results(pred, radius, y)
  checks.non_negative("seconds", seconds)
  max_radius = float(radius.max(initial=0.0))
  top = REPORT_RADIUS_STEP * math.ceil(max_radius / REPORT_RADIUS_STEP)
  if radii is None:
    radii = _grid(top, REPORT_RADIUS_STEP)
  radii = [float(r) for r in radii]
  curve_radii = _grid(max([top] + radii), CURVE_RADIUS_STEP)
  num_examples = int(y.size)
  return {
    "method": "randomized smoothing CERTIFY (Cohen et al. 2019)",
    "sigma": float(sigma),
    "n0": int(n0),
    "n": int(n),
    "alpha": float(alpha),
    "num_examples": num_examples,
    "radii": radii,
    "certified_accuracy": certified_accuracy(pred, radius, y, radii),
    "abstain_rate": float(np.mean(pred == -1)) if num_examples else 0.0,
    "max_radius": max_radius,
    "seconds": float(seconds),
    "seconds_per_image": float(seconds) / max(num_examples, 1),
    "curve": {
      "radius": curve_radii,
      "certified_accuracy": certified_accuracy(pred, radius, y, curve_radii),
    },
  }


def format_certification_table(report):
  """The report as markdown: a settings line and a radius / certified accuracy table."""
  lines = [
    f"Randomized smoothing (Cohen et al. 2019): sigma = {report['sigma']:g}, "
    f"n0 = {report['n0']}, n = {report['n']}, alpha = {report['alpha']:g}; "
    f"{report['num_examples']} images, {report['seconds_per_image']:.3g} s "
    f"per image, {100 * report['abstain_rate']:.2f} % abstained.",
    "",
    "| L2 radius | certified accuracy (%) |",
    "| --- | --- |",
  ]
  for r, accuracy in zip(report["radii"], report["certified_accuracy"]):
    lines.append(f"| {r:.2f} | {100 * accuracy:.2f} |")
  return "\n".join(lines) + "\n"


def plot_certified_accuracy(report, path):
  """Saves certified accuracy against L2 radius (a step curve) as a PNG at `path`."""
  # A bare Figure renders with Agg and leaves pyplot's global backend alone.
  from matplotlib.figure import Figure

  curve = report["curve"]
  figure = Figure(figsize=(5, 3.5), dpi=120)
  axes = figure.subplots()
  axes.step(curve["radius"], curve["certified_accuracy"], where="post")
  axes.set_xlabel("L2 radius")
  axes.set_ylabel("certified accuracy")
  axes.set_ylim(0.0, 1.0)
  axes.set_xlim(left=0.0)
  axes.grid(alpha=0.3)
  axes.set_title(f"sigma = {report['sigma']:g}, n = {report['n']}, alpha = {report['alpha']:g}")
  figure.tight_layout()
  figure.savefig(path, format="png")


def _grid(top, step):
  """0, step, 2 step, ..., up to the first multiple of `step` at or above `top`."""
  return [round(k * step, 10) for k in range(math.ceil(top / step - 1e-9) + 1)]


def _num_classes(logits_fn, x, batch):
  """The number of classes `logits_fn` gives, checked on an abstract batch of `batch` images."""
  images = jax.ShapeDtypeStruct((batch,) + x.shape[1:], x.dtype)
  shape = jax.eval_shape(logits_fn, images).shape
  checks.require(
    len(shape) == 2 and shape[0] == batch and shape[1] >= 1,
    f"logits_fn must map images [{batch}, ...] to logits [{batch}, classes], got shape {shape}",
  )
  return shape[1]


def _check_sigma(sigma):
  checks.positive("sigma", sigma)


def _check_draws(name, value):
  checks.integer_at_least(name, value, 1)
  checks.require(
    value <= MAX_DRAWS,
    f"{name} must be <= 2**31 - 1 = {MAX_DRAWS} so that int32 "
    f"counts cannot overflow, got {value!r}",
  )


def _check_alpha(alpha):
  checks.in_interval("alpha", alpha, 0, 1, closed=(False, False))


def _threefry_key(key):
  """`key` as a typed threefry2x32 key; a raw uint32 [2] key is read as one.

  Other generators (rbg, unsafe_rbg) give a draw different noise at different
  batch sizes, which would make the counts depend on `batch_size`.
  """
  dtype = getattr(key, "dtype", None)
  if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    checks.require(
      np.shape(key) == (),
      f"key must be a single PRNG key, got a key array of shape {np.shape(key)}",
    )
    impl = str(jax.random.key_impl(key))
    checks.require(
      impl == "threefry2x32",
      f"key must be a threefry2x32 key (JAX's default generator), got a {impl} key",
    )
    return key
  checks.require(
    np.shape(key) == (2,) and np.asarray(key).dtype == np.uint32,
    f"key must be a JAX PRNG key (jax.random.key or jax.random.PRNGKey), got {key!r}",
  )
  return jax.random.wrap_key_data(jnp.asarray(key), impl="threefry2x32")


def _check_results(pred, radius, y):
  """Checks `certify` outputs against labels `y`: three arrays of one shape [B]."""
  pred, radius, y = np.asarray(pred), np.asarray(radius), np.asarray(y)
  checks.require(
    pred.ndim == 1 and pred.shape == radius.shape == y.shape,
    f"pred, radius and labels must have the same shape [batch], "
    f"got {pred.shape}, {radius.shape} and {y.shape}",
  )
  return pred, radius, y
