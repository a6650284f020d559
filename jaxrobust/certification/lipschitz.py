"""A certified upper bound on a feed-forward network's Lipschitz constant, and
the L2 robustness certificates it gives (Tsuzuku, Sato & Sugiyama 2018)."""

import functools
import math
import numbers
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from jaxrobust import checks
from jaxrobust.spectral import iteration
from jaxrobust.spectral.conv import check_shape
from jaxrobust.spectral.layer import (
  KERNEL_LAYERS,
  LINEAR_PART,
  SpectralNorm,
  example_shape,
  linear_part,
)

# Relative slack added to every certified norm for float32 rounding in the
# layer's own arithmetic (far below the margin of the iterative norms).
_ROUNDING_SLACK = 1e-5


class LayerFactor(NamedTuple):
  """One factor of the product in `lipschitz_bound`.

  Attributes:
    name: the module's path in the model ("/"-joined), or the primitive.
    kind: "linear" (Dense, Conv, ConvTranspose), "batch_norm",
      "lipschitz_constant" (a module's own method) or "pool" (a window
      reduction: overlapping max-pools, sum and average pools).
    input_shape: shape of one example of the factor's input.
    value: the factor, an upper bound on the piece's Lipschitz constant.
    method: how it was obtained: "svd" (exact, from the explicit matrix),
      "lanczos" (iteration times `lanczos_margin`), or "formula".
  """

  name: str
  kind: str
  input_shape: tuple
  value: float
  method: str


# Wrappers that only reparametrise the kernel of the layer inside them: that
# layer is seen with its effective kernel, so they add no factor of their own.
_REPARAMETRISATIONS = (SpectralNorm, nn.SpectralNorm, nn.WeightNorm)


def _module_name(module):
  path = getattr(module, "path", None) or (module.name or type(module).__name__,)
  return "/".join(str(p) for p in path)


def _own_variables(module):
  """Names of the variables a module holds itself (not in its submodules)."""
  own = []
  for collection, tree in module.variables.items():
    own += [f"{collection}/{name}" for name, value in tree.items() if not hasattr(value, "items")]
  return own


def _classify(module):
  """ "transparent" (look inside), or the kind of factor the module contributes.

  Raises InputError for a module flagged `residual = True` and for a module
  that holds variables but is none of the known kinds.
  """
  name = _module_name(module)
  checks.require(
    getattr(module, "residual", False) is not True,
    f"lipschitz_bound cannot bound {name}: it is flagged residual, "
    "and the product of layer norms is no bound for x + f(x)",
  )
  if callable(getattr(module, "lipschitz_constant", None)):
    return "lipschitz_constant"
  if isinstance(module, KERNEL_LAYERS):
    return "linear"
  if isinstance(module, nn.BatchNorm):
    return "batch_norm"
  if isinstance(module, _REPARAMETRISATIONS):
    return "transparent"
  own = _own_variables(module)
  checks.require(
    not own,
    f"lipschitz_bound cannot bound {name}: {type(module).__name__} "
    f"holds variables {own} and is none of Dense, Conv, "
    "ConvTranspose, BatchNorm, a spectral or weight normalisation "
    "wrapper, or a module with a lipschitz_constant() method",
  )
  return "transparent"


def _concrete_float(name, value):
  checks.require(
    checks.is_concrete(value), f"{name} is abstract: pass an apply_fn that is not jitted"
  )
  return float(np.asarray(value))


def _batch_norm_constant(module, args, kwargs):
  """max |scale / sqrt(var + eps)| of a BatchNorm in inference mode."""
  name = _module_name(module)
  call_value = kwargs.get("use_running_average", args[1] if len(args) > 1 else None)
  running = nn.merge_param("use_running_average", module.use_running_average, call_value)
  checks.require(
    running is True,
    f"BatchNorm {name} runs in training mode (batch statistics): "
    "pass an apply_fn in inference mode",
  )
  stats = module.variables["batch_stats"]
  gain = jax.lax.rsqrt(jnp.asarray(stats["var"], jnp.float32) + module.epsilon)
  if module.use_scale:
    gain = gain * module.variables["params"]["scale"]
  return _concrete_float(f"BatchNorm {name}", jnp.max(jnp.abs(gain)))


def _find_factors(apply_fn, variables, input_shape):
  """Runs the model once and returns what each module contributes, in call order.

  Returns a list of (module_name, kind, example_shape, payload) where payload
  is (layer clone, effective params) for "linear" and a float otherwise. A
  module inside a contributing one is not looked at (its path extends the
  contributor's), nor are the layer copies `SpectralNorm` applies to
  measure its own norm (named `LINEAR_PART`).
  """
  found = []  # [path, (name, kind, example, payload)], filled as calls return

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    path = tuple(module.path)
    if (
      context.method_name != "__call__"
      or module.name == LINEAR_PART
      or any(path[: len(p)] == p for p, _ in found)
    ):
      return next_fun(*args, **kwargs)
    kind = _classify(module)
    if kind == "transparent":
      return next_fun(*args, **kwargs)
    entry = [path, None]
    found.append(entry)
    out = next_fun(*args, **kwargs)
    entry[1] = _factor(module, kind, args, kwargs)
    return out

  dummy = jnp.full((1, *input_shape), 0.5, jnp.float32)
  with nn.intercept_methods(interceptor):
    apply_fn(variables, dummy)
  checks.require(
    found,
    "lipschitz_bound found no Dense, Conv, BatchNorm or "
    "lipschitz_constant() module: apply_fn must call a Linen "
    "model's apply (not a jitted function)",
  )
  return [factor for _, factor in found]


def _factor(module, kind, args, kwargs):
  """(name, kind, example shape, payload) of a module that contributes."""
  name = _module_name(module)
  example = tuple(jnp.shape(args[0]))[1:]
  if kind == "linear":
    params = dict(module.variables["params"])
    checks.require(
      checks.is_concrete(params["kernel"]),
      f"the kernel of {name} is abstract: pass an apply_fn that is not jitted",
    )
    example = example_shape(jnp.shape(args[0]), params["kernel"].ndim)
    payload = (module.clone(parent=None), params)
  elif kind == "batch_norm":
    payload = _batch_norm_constant(module, args, kwargs)
  else:
    payload = _concrete_float(f"{name}.lipschitz_constant()", module.lipschitz_constant())
    checks.require(
      payload >= 0 and math.isfinite(payload),
      f"{name}.lipschitz_constant() must be finite and >= 0, got {payload!r}",
    )
  return name, kind, example, payload


def _window_factors(jaxpr, dependent):
  """Yields (primitive, input shape, factor) for the window reductions in
  `jaxpr` (and the jaxprs nested in it) that depend on the `dependent` vars.

  Max- and min-pools: |max_W a - max_W b| <= max_W |a - b|, so
  ||pool(a) - pool(b)||^2 <= c ||a - b||^2 for c the largest number of
  windows covering one pixel: factor sqrt(c), 1 without overlap. Sum pools:
  (sum_W d)^2 <= |W| sum_W d^2 (Cauchy-Schwarz), factor sqrt(c |W|), divided
  by q when the sum's only use is a division by a constant q (`nn.avg_pool`:
  q = |W|, e.g. 1/2 for 2x2 windows with stride 2). Other window reductions
  are refused.
  """
  uses = {}
  for eqn in jaxpr.eqns:
    for var in eqn.invars:
      if not isinstance(var, jex_core.Literal):
        uses.setdefault(var, []).append(eqn)
  for eqn in jaxpr.eqns:
    inputs = [v for v in eqn.invars if not isinstance(v, jex_core.Literal)]
    if not any(v in dependent for v in inputs):
      continue  # computes a constant, e.g. the window sizes of an average
    dependent.update(eqn.outvars)
    for sub in jex_core.jaxprs_in_params(eqn.params):
      yield from _window_factors(sub, set(sub.invars))
    name = eqn.primitive.name
    if not name.startswith("reduce_window"):
      continue
    checks.require(
      name in ("reduce_window_max", "reduce_window_min", "reduce_window_sum"),
      f"lipschitz_bound cannot bound the window reduction {name}",
    )
    params = eqn.params
    checks.require(
      all(d == 1 for d in params["base_dilation"]),
      f"lipschitz_bound cannot bound a {name} with base dilation {params['base_dilation']}",
    )
    windows = params["window_dimensions"]
    covering = math.prod(
      min(w, -(-((w - 1) * d + 1) // s))
      for w, s, d in zip(windows, params["window_strides"], params["window_dilation"])
    )
    factor = math.sqrt(covering)
    if name == "reduce_window_sum":
      factor *= math.sqrt(math.prod(windows))
      consumers = uses.get(eqn.outvars[0], [])
      if (
        len(consumers) == 1
        and consumers[0].primitive.name == "div"
        and consumers[0].invars[0] is eqn.outvars[0]
        and isinstance(consumers[0].invars[1], jex_core.Literal)
      ):
        factor /= abs(float(consumers[0].invars[1].val))
    if factor != 1.0:
      yield name, tuple(eqn.invars[0].aval.shape)[1:], factor


def _pool_factors(apply_fn, variables, input_shape):
  """The factors of the pools in the network (see `_window_factors`)."""
  dummy = jnp.full((1, *input_shape), 0.5, jnp.float32)
  jaxpr = jax.make_jaxpr(lambda x: apply_fn(variables, x))(dummy).jaxpr
  return [
    LayerFactor(name, "pool", shape, factor, "formula")
    for name, shape, factor in _window_factors(jaxpr, set(jaxpr.invars))
  ]


def _linear_norm(
  clone, params, example_shape, *, n_iter, failure_probability, exact_max_entries, key
):
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
  apply_fn,
  variables,
  input_shape,
  *,
  n_iter=100,
  failure_probability=1e-6,
  exact_max_entries=2**22,
  key=None,
):
  """The factors whose product is `lipschitz_bound` (see there), in call order.

  Returns:
    A list of `LayerFactor`.
  """
  input_shape = check_shape("input_shape", input_shape)
  n_iter = checks.integer_at_least("n_iter", n_iter, 2)
  checks.in_interval("failure_probability", failure_probability, 0, 1, closed=(False, False))
  checks.require(
    isinstance(exact_max_entries, numbers.Integral) and exact_max_entries >= 0,
    f"exact_max_entries must be an integer >= 0, got {exact_max_entries!r}",
  )
  key = jax.random.key(0) if key is None else key
  found = _find_factors(apply_fn, variables, input_shape)
  n_linear = sum(kind == "linear" for _, kind, _, _ in found)
  factors = []
  for index, (name, kind, example, payload) in enumerate(found):
    if kind == "linear":
      value, method = _linear_norm(
        *payload,
        example,
        n_iter=n_iter,
        failure_probability=failure_probability / n_linear,
        exact_max_entries=exact_max_entries,
        key=jax.random.fold_in(key, index),
      )
    else:
      value, method = payload * (1 + _ROUNDING_SLACK), "formula"
    factors.append(LayerFactor(name, kind, example, value, method))
  return factors + _pool_factors(apply_fn, variables, input_shape)


def _jacobian_norms(apply_fn, variables, input_shape, n_probes, key, n_iter=30):
  """||J(x)|| at `n_probes` inputs x uniform in [0, 1]^input_shape.

  By power iteration, so each is a lower bound on the Lipschitz constant.
  """

  def jacobian_norm(key):
    probe_key, start_key = jax.random.split(key)
    x = jax.random.uniform(probe_key, input_shape)
    _, jvp = jax.linearize(lambda z: apply_fn(variables, z[None])[0], x)
    v = iteration.power_iterate(jvp, iteration.random_unit(start_key, input_shape), n_iter)
    return iteration.sigma(jvp, v)

  norms = jax.jit(jax.vmap(jacobian_norm))(jax.random.split(key, n_probes))
  return [float(n) for n in norms]


def lipschitz_bound(
  apply_fn,
  variables,
  input_shape,
  *,
  n_iter=100,
  failure_probability=1e-6,
  exact_max_entries=2**22,
  n_probes=4,
  key=None,
):
  """An upper bound on the L2 Lipschitz constant of a feed-forward network.

  For f = g_k o ... o g_1, Lip(f) <= prod Lip(g_i). The network is run once on
  a dummy input of shape (1, *input_shape) under `nn.intercept_methods`, and
  every module call contributes, in the order of the calls:

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
  if n_probes == 0:
    return bound
  probe_key = jax.random.fold_in(key, 2**31 - 1)
  for local in _jacobian_norms(apply_fn, variables, tuple(input_shape), n_probes, probe_key):
    checks.require(
      local <= bound * (1 + 1e-4),
      f"lipschitz_bound: the network's Jacobian norm {local:.6g} "
      f"at a random input exceeds the product {bound:.6g} of its "
      "layers' norms, so it is not a plain chain of the layers "
      "found (residual connections or glue code outside modules?)",
    )
  return bound


def certified_radius(logits, lipschitz, labels=None):
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
