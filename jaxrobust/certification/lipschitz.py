"""A certified upper bound on a feed-forward network's Lipschitz constant, and
the L2 robustness certificates it gives.

For f = g_k o ... o g_1, Lip(f) <= prod Lip(g_i). `lipschitz_bound` runs the
network once on a dummy input under `nn.intercept_methods`
(`certification.layer_factors`), and every module call contributes, in the
order of the calls:

* nn.Dense, nn.Conv, nn.ConvTranspose: the operator norm of its linear map
  on the input shape it actually sees, with the kernel it actually uses (the
  effective kernel inside `SpectralNorm`, `nn.SpectralNorm` or
  `nn.WeightNorm`). Exact (float64 eigenvalues of the explicit matrix's
  Gram) when the matrix has at most `exact_max_entries` entries; otherwise
  the estimate of `n_iter` Lanczos steps (power iteration in Krylov form, as
  in `conv_operator_norm`) times `lanczos_margin`, which makes it an upper
  bound except with probability failure_probability / (number of such
  layers) over the random start, for any spectrum (the margin is about
  0.7 % for 100 steps on a 32x32x3 or 32x32x64 input at 1e-6).
* nn.BatchNorm in inference mode: max |scale / sqrt(var + eps)|.
* any module with a `lipschitz_constant()` method: its value (and nothing
  inside it is looked at), e.g. an input normalisation (x - mean) / std
  returning 1 / min(std).
* window reductions on the input's path, found in the jaxpr: max- (or
  min-) pools sqrt(c), c the largest number of windows covering one pixel
  (1 without overlap); `nn.avg_pool` sqrt(c / |W|) (1/2 for 2x2, stride 2);
  other sum pools sqrt(c |W|). ReLU-like activations and reshapes are taken
  as 1-Lipschitz.

Each factor also gets a relative slack of 1e-5 for float32 rounding.

What is refused (InputError): a module flagged `residual = True`; a module
that holds variables of its own but is none of the kinds above (LayerNorm,
GroupNorm, Embed, attention, PReLU, ...); BatchNorm in training mode;
window reductions other than max, min and sum; a jitted `apply_fn` (its
layers cannot be seen). Code outside modules, e.g. `x + skip` or `3 * x`,
is invisible to the interception; as a check, the Jacobian norm at
`n_probes` random inputs in [0, 1] (power iteration, a lower bound on the
true constant) must not exceed the product, otherwise the network is not
the chain of 1-Lipschitz glue the product assumes and InputError is raised.
This check catches gross violations, not all: non-1-Lipschitz glue code
between layers (e.g. a residual sum or a scaling outside any module) can
still make the product too small.

References:
  Tsuzuku, Sato & Sugiyama, "Lipschitz-margin training: scalable
  certification of perturbation invariance for deep neural networks",
  NeurIPS 2018.
"""

import functools
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jaxtyping import Array, ArrayLike

from jaxrobust import checks
from jaxrobust.certification import layer_factors
from jaxrobust.certification.layer_factors import LayerFactor
from jaxrobust.spectral import iteration
from jaxrobust.spectral.conv import check_shape
from jaxrobust.spectral.layer import linear_part
from jaxrobust.types import ApplyFn, PRNGKey, Variables

# Relative slack added to every certified norm for float32 rounding in the
# layer's own arithmetic (far below the margin of the iterative norms).
_ROUNDING_SLACK = 1e-5


def _linear_norm(
  clone: nn.Module,
  params: Variables,
  example_shape: tuple[int, ...],
  *,
  n_iter: int,
  failure_probability: float,
  exact_max_entries: int,
  key: PRNGKey,
) -> tuple[float, str]:
  """(upper bound on the layer's operator norm, method)."""
  linear = linear_part(clone, params)
  kernel = params["kernel"]
  dim = math.prod(example_shape)
  out_dim = math.prod(
    jax.eval_shape(
      functools.partial(linear, kernel), jax.ShapeDtypeStruct(example_shape, jnp.float32)
    ).shape
  )
  if dim * out_dim <= exact_max_entries:
    matrix = jax.jit(jax.jacfwd(linear, argnums=1))(kernel, jnp.zeros(example_shape, jnp.float32))
    matrix = np.asarray(matrix, np.float64).reshape(out_dim, dim)
    gram = matrix.T @ matrix if dim <= out_dim else matrix @ matrix.T
    top = max(float(np.linalg.eigvalsh(gram)[-1]), 0.0)
    return math.sqrt(top) * (1 + _ROUNDING_SLACK), "svd"
  estimate = float(iteration.lanczos_norm(linear, kernel, example_shape, key, n_iter))
  margin = iteration.lanczos_margin(dim, n_iter, failure_probability)
  return estimate * margin * (1 + _ROUNDING_SLACK), "lanczos"


def lipschitz_factors(
  apply_fn: ApplyFn,
  variables: Variables,
  input_shape: tuple[int, ...],
  *,
  n_iter: int = 100,
  failure_probability: float = 1e-6,
  exact_max_entries: int = 2**22,
  key: PRNGKey | None = None,
) -> list[LayerFactor]:
  """The factors whose product is `lipschitz_bound`, in call order.

  Args:
    apply_fn: `apply_fn(variables, x) -> logits`, inference mode, not jitted.
    variables: the model's variables.
    input_shape: the shape of one input example, e.g. (32, 32, 3).
    n_iter: Lanczos steps for layers too large for the exact method (>= 2).
    failure_probability: total probability, over the random starts, that the
      layers done by iteration make the bound too small.
    exact_max_entries: layers whose explicit matrix has at most this many
      entries get their exact norm.
    key: PRNG key of the random starts (default `jax.random.key(0)`).

  Returns:
    A `LayerFactor` for each module that contributes (the module docstring
    lists them), then one for each window reduction whose factor is not 1.
  """
  input_shape = check_shape("input_shape", input_shape)
  n_iter = checks.integer_at_least("n_iter", n_iter, 2)
  checks.in_interval("failure_probability", failure_probability, 0, 1, closed=(False, False))
  checks.require(
    isinstance(exact_max_entries, numbers.Integral) and exact_max_entries >= 0,
    f"exact_max_entries must be an integer >= 0, got {exact_max_entries!r}",
  )
  key = jax.random.key(0) if key is None else key
  found = layer_factors.find_factors(apply_fn, variables, input_shape)
  n_linear = sum(kind == "linear" for _, kind, _, _ in found)
  factors: list[LayerFactor] = []
  for index, (name, kind, example, payload) in enumerate(found):
    if kind == "linear":
      clone, params = payload
      value, method = _linear_norm(
        clone,
        params,
        example,
        n_iter=n_iter,
        failure_probability=failure_probability / n_linear,
        exact_max_entries=exact_max_entries,
        key=jax.random.fold_in(key, index),
      )
    else:
      value, method = payload * (1 + _ROUNDING_SLACK), "formula"
    factors.append(LayerFactor(name, kind, example, value, method))
  return factors + layer_factors.pool_factors(apply_fn, variables, input_shape)


def _jacobian_norms(
  apply_fn: ApplyFn,
  variables: Variables,
  input_shape: tuple[int, ...],
  n_probes: int,
  key: PRNGKey,
  n_iter: int = 30,
) -> list[float]:
  """||J(x)|| at `n_probes` inputs x uniform in [0, 1]^input_shape.

  By power iteration, so each is a lower bound on the Lipschitz constant.
  """

  def jacobian_norm(key: PRNGKey) -> Array:
    probe_key, start_key = jax.random.split(key)
    x = jax.random.uniform(probe_key, input_shape)
    _, jvp = jax.linearize(lambda z: apply_fn(variables, z[None])[0], x)
    v = iteration.power_iterate(jvp, iteration.random_unit(start_key, input_shape), n_iter)
    return iteration.sigma(jvp, v)

  norms = jax.jit(jax.vmap(jacobian_norm))(jax.random.split(key, n_probes))
  return [float(n) for n in norms]


def lipschitz_bound(
  apply_fn: ApplyFn,
  variables: Variables,
  input_shape: tuple[int, ...],
  *,
  n_iter: int = 100,
  failure_probability: float = 1e-6,
  exact_max_entries: int = 2**22,
  n_probes: int = 4,
  key: PRNGKey | None = None,
) -> float:
  """An upper bound on the L2 Lipschitz constant of a feed-forward network.

  Lip(f) <= prod_i Lip(g_i) for f = g_k o ... o g_1, over the factors the
  module docstring lists (`lipschitz_factors`), checked against the
  Jacobian norm at `n_probes` random inputs.

  Args:
    apply_fn: `apply_fn(variables, x) -> logits` for a batch x, in inference
      mode, not jitted, e.g. `functools.partial(model.apply, train=False)`.
    variables: the model's variables.
    input_shape: the shape of one input example, e.g. (32, 32, 3).
    n_iter: Lanczos steps for layers too large for the exact method (>= 2).
    failure_probability: total probability, over the random starts, that the
      layers done by iteration make the bound too small.
    exact_max_entries: layers whose explicit matrix has at most this many
      entries get their exact norm.
    n_probes: random inputs of the Jacobian check (0 to skip it).
    key: PRNG key of the random starts and probes (default `jax.random.key(0)`).

  Returns:
    The bound, a Python float.

  Raises:
    InputError: for a network the bound cannot cover (the module docstring
      lists them), or one whose Jacobian norm at a probe exceeds the bound.
  """
  n_probes = checks.integer_at_least("n_probes", n_probes, 0)
  key = jax.random.key(0) if key is None else key
  factors = lipschitz_factors(
    apply_fn,
    variables,
    input_shape,
    n_iter=n_iter,
    failure_probability=failure_probability,
    exact_max_entries=exact_max_entries,
    key=key,
  )
  bound = math.prod(f.value for f in factors)
  if n_probes > 0:
    probe_key = jax.random.fold_in(key, 2**31 - 1)
    _check_jacobians(apply_fn, variables, tuple(input_shape), n_probes, probe_key, bound)
  return bound


def _check_jacobians(
  apply_fn: ApplyFn,
  variables: Variables,
  input_shape: tuple[int, ...],
  n_probes: int,
  key: PRNGKey,
  bound: float,
) -> None:
  """Raises InputError where the Jacobian norm at a random input exceeds `bound`."""
  for local in _jacobian_norms(apply_fn, variables, input_shape, n_probes, key):
    checks.require(
      local <= bound * (1 + 1e-4),
      f"lipschitz_bound: the network's Jacobian norm {local:.6g} "
      f"at a random input exceeds the product {bound:.6g} of its "
      "layers' norms, so it is not a plain chain of the layers "
      "found (residual connections or glue code outside modules?)",
    )


def certified_radius(
  logits: ArrayLike, lipschitz: float | ArrayLike, labels: ArrayLike | None = None
) -> Array:
  """L2 radii within which the predictions provably do not change.

  For a network f with L2 Lipschitz constant at most L, each difference
  f_i - f_j is sqrt(2) L-Lipschitz, so the top class cannot change within
  radius margin / (sqrt(2) L), margin = (top logit) - (second logit) (Tsuzuku,
  Sato & Sugiyama 2018, Proposition 1). Inputs at a distance strictly below
  the radius keep the prediction.

  Args:
    logits: array [batch, classes] (classes >= 2), f(x).
    lipschitz: an upper bound on the Lipschitz constant of f, > 0 (from
      `lipschitz_bound`).
    labels: optional int array [batch]; misclassified examples then get
      radius 0 (the certificate is for a wrong prediction).

  Returns:
    float array [batch] of radii >= 0.

  References:
    Tsuzuku, Sato & Sugiyama 2018, Proposition 1.
  """
  checks.require(
    np.ndim(logits) == 2 and np.shape(logits)[1] >= 2,
    "logits must have shape [batch, classes] with classes >= 2, "
    f"got shape {tuple(np.shape(logits))}",
  )
  if checks.is_concrete(lipschitz):
    checks.positive("lipschitz", float(np.asarray(lipschitz)))
  top2 = jax.lax.top_k(logits, 2)[0]
  radius = (top2[:, 0] - top2[:, 1]) / (math.sqrt(2) * lipschitz)
  if labels is None:
    return radius
  checks.check_labels(labels, np.shape(logits)[0], np.shape(logits)[1])
  return jnp.where(jnp.argmax(logits, axis=1) == labels, radius, 0.0)
