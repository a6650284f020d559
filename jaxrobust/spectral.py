"""Spectral normalisation and Lipschitz certificates for Flax Linen networks.

Three tools, one idea: the L2 Lipschitz constant of a linear layer is the
largest singular value (the spectral norm) of the linear map it computes.

* `SpectralNorm` wraps an `nn.Dense`, `nn.Conv` or `nn.ConvTranspose` and
  divides its kernel by an estimate of that norm, kept up to date by power
  iteration during training (Miyato et al. 2018, "Spectral normalization for
  generative adversarial networks"; Farnia, Zhang & Tse 2019, "Generalizable
  adversarial training via spectral normalization").
* `conv_operator_norm` computes the norm of a 2-D convolution as a linear map
  on its actual input shape, strides and padding.
* `lipschitz_bound` multiplies the norms of a feed-forward network's layers
  into an upper bound on its Lipschitz constant, and `certified_radius` turns
  that bound into per-example L2 robustness certificates (Tsuzuku, Sato &
  Sugiyama 2018, "Lipschitz-margin training").

Two norms of a convolution kernel K of shape [kh, kw, c_in, c_out]:

* the *matrix* norm ||K_mat||, the largest singular value of K reshaped to
  K_mat of shape [kh * kw * c_in, c_out] (what Miyato et al.,
  `flax.linen.SpectralNorm` and `torch.nn.utils.spectral_norm` normalise);
* the *operator* norm, max ||conv(x)|| / ||x|| over inputs x of the layer's
  shape (H, W, c_in): the layer's true L2 Lipschitz constant.

Output pixel p is K_mat^T patch_p(x), and with stride 1 every input pixel lies
in at most kh * kw patches, so ||K_mat|| <= operator norm <= sqrt(kh * kw)
||K_mat|| (the left side for inputs at least as large as the kernel): the
matrix norm never overestimates, and can underestimate by up to 3x for a 3x3
kernel. For a dense layer the two coincide.
"""
import contextlib
import functools
import math
import numbers
import threading
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from jaxrobust import checks

COLLECTION = "spectral"
MODES = ("operator", "matrix")
RESCALES = ("clip", "normalize")
KERNEL_LAYERS = (nn.Dense, nn.Conv, nn.ConvTranspose)

_HIGHEST = jax.lax.Precision.HIGHEST
# Relative slack added to every certified norm for float32 rounding in the
# layer's own arithmetic (far below the margin of the iterative norms).
_ROUNDING_SLACK = 1e-5


# --------------------------------------------------------------------------
# Power iteration on a linear map L given as a function (one example in, one
# example out). Each step applies L and its transpose (via `jax.vjp`).


def _unit(v, epsilon=1e-12):
  """Returns v / sqrt(||v||^2 + epsilon): a unit vector, and 0 for v = 0."""
  return v * jax.lax.rsqrt(jnp.sum(jnp.square(v)) + epsilon)


def _random_unit(key, shape):
  """A vector drawn uniformly from the unit sphere of `shape`."""
  return _unit(jax.random.normal(key, shape, jnp.float32))


def _power_step(linear_fn, v):
  """One power-iteration step on L^T L: returns L^T L v / ||L^T L v||."""
  out, pullback = jax.vjp(linear_fn, v)
  return _unit(pullback(out)[0])


def _power_iterate(linear_fn, v, n_steps):
  """`n_steps` power-iteration steps from `v` (a `lax.fori_loop`)."""
  return jax.lax.fori_loop(0, n_steps, lambda _, w: _power_step(linear_fn, w), v)


def _sigma(linear_fn, v):
  """sigma = <u, L v> with u = L v / ||L v|| held constant.

  The value is ||L v||; the gradient with respect to L is u v^T, the one of
  Miyato et al. (2018, Algorithm 1), where the power-iteration vectors carry no
  gradient. Written with a stopped `u` (not as a norm) so that the gradient is
  0, not NaN, when L v = 0.
  """
  lv = linear_fn(v)
  u = jax.lax.stop_gradient(_unit(lv))
  return jnp.vdot(u, lv)


@functools.partial(jax.jit, static_argnums=(0, 2, 4))
def _lanczos_norm(linear_fn, params, shape, key, n_iter):
  """Estimates the norm of L = linear_fn(params, .) by `n_iter` Lanczos steps.

  L acts on arrays of `shape`. Lanczos iteration on B = L^T L from v0, drawn
  uniformly from the unit sphere with `key`, with full reorthogonalisation,
  builds an orthonormal basis Q of the Krylov space span{v0, B v0, ...,
  B^(n_iter - 1) v0} and the tridiagonal T = Q^T B Q. The estimate is ||L y||
  for the unit top eigenvector y = Q s of T (s: top eigenvector of T): a true
  Rayleigh quotient, so never above ||L|| (up to rounding) even if float32
  orthogonality is lost. As the space contains the power iterate
  B^(n_iter - 1) v0, the estimate is at least the power iteration's from the
  same start; it converges much faster when the top singular values are
  close. When the space becomes invariant (B of low rank, e.g. a strided
  convolution), the iteration stops adding vectors.
  """
  v0 = _random_unit(key, shape)
  linear = functools.partial(linear_fn, params)

  def gram(q):
    out, pullback = jax.vjp(linear, q.reshape(shape))
    return pullback(out)[0].ravel()

  basis = jnp.zeros((n_iter + 1, v0.size), jnp.float32)
  basis = basis.at[0].set(_unit(v0.ravel().astype(jnp.float32)))

  def step(j, carry):
    basis, alphas, betas = carry
    q = basis[j]
    bq = gram(q)
    alpha = jnp.vdot(q, bq)
    # Unfilled rows of `basis` are 0; projecting twice keeps the basis
    # orthogonal to float32 precision ("twice is enough", Parlett) unless
    # almost all of B q lies in the space already: then the space is
    # (numerically) invariant and the remainder is rounding noise, dropped.
    w = bq - (basis @ bq) @ basis
    w = w - (basis @ w) @ basis
    beta = jnp.linalg.norm(w)
    invariant = beta <= 1e-5 * jnp.linalg.norm(bq)
    basis = basis.at[j + 1].set(jnp.where(invariant, 0.0, w / beta))
    beta = jnp.where(invariant, 0.0, beta)
    return basis, alphas.at[j].set(alpha), betas.at[j].set(beta)

  zeros = jnp.zeros((n_iter,), jnp.float32)
  basis, alphas, betas = jax.lax.fori_loop(0, n_iter, step,
                                           (basis, zeros, zeros))
  off_diagonal = betas[:-1]
  tridiagonal = (jnp.diag(alphas) + jnp.diag(off_diagonal, 1)
                 + jnp.diag(off_diagonal, -1))
  top = jnp.linalg.eigh(tridiagonal)[1][:, -1]
  y = _unit(top @ basis[:n_iter])
  return jnp.linalg.norm(linear(y.reshape(shape)))


def _log_chebyshev(degree, x):
  """log T_degree(x) for x >= 1, where T_d(cosh y) = cosh(d y)."""
  y = degree * np.arccosh(x)
  return y - math.log(2) + np.log1p(np.exp(-2 * y))


def lanczos_margin(dim, n_iter, failure_probability):
  """A factor m with P(||L|| > m * estimate) <= failure_probability.

  Holds for any linear map L on R^dim, where `estimate` is the result of
  `_lanczos_norm` after `n_iter` steps from a start v drawn uniformly from the
  unit sphere, and the probability is over v. No eigenvalue gap is assumed.

  Proof. Scale lambda_1 = ||L||^2 to 1 and let c_i be the squared components
  of v in the eigenbasis of B = L^T L. The Krylov space holds p(B) v for every
  polynomial p of degree d = n_iter - 1, so estimate^2 is at least the
  Rayleigh quotient of B at p(B) v. Take p(x) = T_d(2x / t - 1) (Chebyshev):
  |p| <= 1 on [0, t] and p(1) = T_d(1 + 2 (1 - t) / t). Dropping the
  eigenvalues below t from the numerator and bounding their p(lambda)^2 by 1
  in the denominator gives estimate^2 >= t / (1 + 1 / (p(1)^2 c_1)). So
  estimate^2 < 1 - eps needs c_1 < 1 / (eta p(1)^2) with
  eta = t / (1 - eps) - 1, and as the first component of v has density at
  most sqrt(dim / (2 pi)) (Gautschi's inequality),
  P(estimate^2 < 1 - eps) <= sqrt(2 dim / (pi eta)) / p(1): the
  sqrt(dim) exp(-2 d sqrt(eps)) rate of Kuczynski & Wozniakowski (1992). This
  returns 1 / sqrt(1 - eps) for the smallest eps (by bisection, minimising
  over t on a grid) that makes the right-hand side at most
  `failure_probability`.

  Args:
    dim: dimension of the input space of L.
    n_iter: Lanczos steps (>= 1).
    failure_probability: in (0, 1).

  Returns:
    The factor, a float >= 1 (large for few steps: about 1.007 for 100 steps,
    dim 65536 and 1e-6).
  """
  log_scale = 0.5 * math.log(2 * dim / math.pi)
  log_target = math.log(failure_probability)
  alphas = np.linspace(1e-4, 1 - 1e-4, 4000)  # t = 1 - alpha * eps

  def fails(eps):
    t = 1 - alphas * eps
    eta = t / (1 - eps) - 1
    log_p = log_scale - 0.5 * np.log(eta) - _log_chebyshev(n_iter - 1,
                                                           1 + 2 * (1 - t) / t)
    return log_p.min() > log_target

  low, high = 0.0, 1.0 - 1e-12
  if fails(high):
    return math.inf
  for _ in range(100):
    middle = 0.5 * (low + high)
    low, high = (middle, high) if fails(middle) else (low, middle)
  return 1 / math.sqrt(1 - high)


# --------------------------------------------------------------------------
# The linear part of a layer.


def _example_shape(input_shape, kernel_ndim):
  """Shape of one example of a layer input: its last kernel_ndim - 1 axes.

  Dense (kernel [in, out]) acts on the last axis; an N-d convolution (kernel
  [*window, in, out]) on the last N + 1 axes. Any leading axes are batch axes,
  and the map is block diagonal over them, with the norm of one block.
  """
  n = kernel_ndim - 1
  checks.require(len(input_shape) >= n,
                 f"a layer with a {kernel_ndim}-d kernel needs inputs of rank "
                 f">= {n}, got shape {tuple(input_shape)}")
  return tuple(input_shape[len(input_shape) - n:])


# Set while `_linear_part` applies a copy of a layer, so that `lipschitz_bound`
# (which intercepts every module call) does not mistake it for a layer of the
# network.
_internal = threading.local()


@contextlib.contextmanager
def _internal_call():
  depth = getattr(_internal, "depth", 0)
  _internal.depth = depth + 1
  try:
    yield
  finally:
    _internal.depth = depth


def _linear_part(layer, params):
  """Returns f(kernel, v): the layer applied to one example v with the bias at 0.

  `layer` is a Dense, Conv or ConvTranspose; with every parameter but the
  kernel set to zero, the layer computes exactly its linear map.
  """
  unbound = layer.clone(parent=None)
  others = {name: jnp.zeros_like(value) for name, value in params.items()
            if name != "kernel"}

  def apply(kernel, v):
    with _internal_call():
      out = unbound.apply({"params": {**others, "kernel": kernel}}, v[None])
    return out[0]
  return apply


def _matrix_part(kernel, v):
  """v times the kernel reshaped to [prod(other dims), out] (Miyato's matrix)."""
  return jnp.matmul(v, kernel.reshape(-1, kernel.shape[-1]), precision=_HIGHEST)


def _rescale_factor(sigma, target, rescale):
  """The number the kernel is divided by.

  "clip": max(1, sigma / target) (Farnia et al. 2019), which leaves a layer
  whose norm is already at most `target` unchanged; "normalize": sigma / target
  (Miyato et al. 2018), which sets the norm to `target` (1 when sigma = 0).
  """
  ratio = sigma / target
  if rescale == "clip":
    return jnp.maximum(1.0, ratio)
  return jnp.where(sigma > 0, ratio, 1.0)


def _check_kernel_layer(layer):
  checks.require(isinstance(layer, KERNEL_LAYERS),
                 "SpectralNorm wraps a layer with a kernel (nn.Dense, nn.Conv "
                 f"or nn.ConvTranspose), got {type(layer).__name__}")


class SpectralNorm(nn.Module):
  """Spectral normalisation of a Dense or Conv layer, as a Linen transform.

  The wrapped layer computes with the kernel K / c, where
  c = max(1, sigma / target) (`rescale="clip"`, Farnia et al. 2019) or
  c = sigma / target (`rescale="normalize"`, Miyato et al. 2018) and sigma is
  a power-iteration estimate of the norm of its linear map. The bias is not
  rescaled. The norm is either

  * `mode="operator"` (default): the operator norm of the layer as a linear
    map on one example of the input it is called with (for a convolution: the
    shape (H, W, C_in), strides, padding, dilation and groups it actually
    uses), by power iteration through the layer and its transpose
    (`jax.vjp`). This is the layer's true L2 Lipschitz constant: with "clip",
    every normalised layer is `target`-Lipschitz once the iteration has
    converged. For a Dense layer it equals the matrix norm.
  * `mode="matrix"`: the largest singular value of the kernel reshaped to
    [prod(other dims), out] (Miyato et al. 2018, what `flax.linen.SpectralNorm`
    and PyTorch normalise). Cheaper, but for a convolution it is not the
    layer's Lipschitz constant (see the module docstring).

  Implementation: `nn.map_variables` presents the layer with the rescaled
  kernel, so its parameters stay where they would be without the wrapper
  (unnormalised) and the gradient flows to them through K / c, including
  through sigma (the power-iteration vectors are constants, as in Miyato et
  al.).

  State, in the variable collection "spectral" (under this module's path):

  * `v`: the unit power-iteration vector in the layer's input space: shape
    (prod(kernel.shape[:-1]),) in matrix mode, the shape of one input example
    in operator mode (e.g. (H, W, C_in) for a Conv, (in,) for a Dense);
  * `sigma`: the norm estimate computed by the last update (a scalar).

  `update_stats=True` (training) runs `n_steps` iterations v <- L^T L v /
  ||L^T L v|| from the stored v, uses sigma = ||L v|| and stores both; it needs
  `mutable=["spectral"]`. `update_stats=False` runs no iteration: it uses
  sigma = ||L v|| with the stored v and the current kernel and writes nothing,
  so it works without `mutable` (attacks and evaluation). Flax's built-in
  instead repeats its iterations at every evaluation call without storing
  them; here evaluation is deterministic and costs one extra layer call on a
  single example.

  sigma = ||L v|| never exceeds the true norm, and a few steps per training
  call keep it close because the kernel changes slowly (Miyato et al.), but
  it is an estimate: a certificate should use `lipschitz_bound`, which
  recomputes each layer's norm. In operator mode each step costs one call of
  the layer and of its transpose on a single example.

  At initialisation v is drawn uniformly from the unit sphere with the
  "params" RNG, and the layer's kernel is initialised unnormalised.

  Example::

    class Net(nn.Module):
      @nn.compact
      def __call__(self, x, train):
        x = SpectralNorm(nn.Conv(16, (3, 3)))(x, update_stats=train)
        ...

    variables = Net().init(key, x, train=False)   # {"params", "spectral"}
    logits, updates = Net().apply(variables, x, train=True, mutable=["spectral"])

  Attributes:
    layer: the wrapped nn.Dense, nn.Conv or nn.ConvTranspose.
    mode: "operator" or "matrix", the norm that is normalised.
    n_steps: power-iteration steps per training call (>= 1).
    target: the norm the layer is scaled to (clip: at most), > 0.
    rescale: "clip" or "normalize".
  """
  layer: nn.Module
  mode: str = "operator"
  n_steps: int = 1
  target: float = 1.0
  rescale: str = "clip"

  def __post_init__(self):
    _check_kernel_layer(self.layer)
    checks.one_of("mode", self.mode, MODES)
    checks.one_of("rescale", self.rescale, RESCALES)
    checks.integer_at_least("n_steps", self.n_steps, 1)
    checks.positive("target", self.target)
    super().__post_init__()

  @nn.compact
  def __call__(self, x, update_stats: bool):
    """Applies the layer to `x` with its spectrally normalised kernel.

    Args:
      x: the layer's input.
      update_stats: True in training: advance the power iteration and store
        it (needs `mutable=["spectral"]`); False: read the stored state only.

    Returns:
      The layer's output with kernel K / c (see the class docstring).
    """
    checks.require(isinstance(update_stats, bool),
                   f"update_stats must be True or False, got {update_stats!r}")
    if self.is_initializing():
      # Creates the raw parameters; the mapped call below only reads them
      # (map_variables with init=True would store the rescaled kernel).
      self.layer(x)
    normalize = functools.partial(self._normalize, input_shape=jnp.shape(x),
                                  update_stats=update_stats)
    return nn.map_variables(lambda layer: layer(x), "params",
                            trans_in_fn=normalize, mutable=False)(self.layer)

  def _normalize(self, variables, *, input_shape, update_stats):
    """Returns the layer's variables with the kernel divided by c."""
    params = dict(variables["params"])
    checks.require("kernel" in params,
                   f"SpectralNorm needs a layer with a 'kernel' parameter; "
                   f"{type(self.layer).__name__} has {sorted(params)}")
    kernel = params["kernel"]
    if self.mode == "matrix":
      linear = _matrix_part
      shape = (math.prod(kernel.shape[:-1]),)
    else:
      linear = _linear_part(self.layer, params)
      shape = _example_shape(input_shape, kernel.ndim)
    v = self._stored_vector(shape)
    if update_stats:
      checks.require(self.is_mutable_collection(COLLECTION),
                     "update_stats=True updates the power iteration: call apply "
                     f"with mutable=[{COLLECTION!r}]")
      frozen = functools.partial(linear, jax.lax.stop_gradient(kernel))
      for _ in range(self.n_steps):
        v = _power_step(frozen, v)
    v = jax.lax.stop_gradient(v)
    sigma = _sigma(functools.partial(linear, kernel), v)
    if update_stats or self.is_initializing():
      self.put_variable(COLLECTION, "v", v)
      self.put_variable(COLLECTION, "sigma", jax.lax.stop_gradient(sigma))
    factor = _rescale_factor(sigma, self.target, self.rescale)
    params["kernel"] = (kernel / factor).astype(kernel.dtype)
    return {**variables, "params": params}

  def _stored_vector(self, shape):
    """The stored power-iteration vector (drawn at initialisation)."""
    if not self.has_variable(COLLECTION, "v"):
      checks.require(self.is_mutable_collection(COLLECTION),
                     f"the variables have no {COLLECTION!r} collection for "
                     f"{self.name}: pass the one returned by init")
      self.put_variable(COLLECTION, "v",
                        _random_unit(self.make_rng("params"), shape))
      self.put_variable(COLLECTION, "sigma", jnp.zeros((), jnp.float32))
    v = self.get_variable(COLLECTION, "v")
    checks.require(tuple(v.shape) == tuple(shape),
                   f"SpectralNorm {self.name} was initialised for a "
                   f"power-iteration vector of shape {tuple(v.shape)} but its "
                   f"input now needs shape {tuple(shape)} (operator mode "
                   "depends on the input's shape)")
    return v


# --------------------------------------------------------------------------
# The operator norm of a convolution.


def _check_pair(name, value):
  checks.require(isinstance(value, (tuple, list)) and len(value) == 2
                 and all(isinstance(s, numbers.Integral) and s >= 1
                         for s in value),
                 f"{name} must be two integers >= 1, got {value!r}")
  return tuple(int(s) for s in value)


def _check_padding(padding):
  """Returns "SAME", "VALID" or ((low, high), (low, high)) as a hashable."""
  if isinstance(padding, str):
    return checks.one_of("padding", padding.upper(), ("SAME", "VALID"))
  ok = (isinstance(padding, (tuple, list)) and len(padding) == 2
        and all(isinstance(p, (tuple, list)) and len(p) == 2
                and all(isinstance(q, numbers.Integral) for q in p)
                for p in padding))
  checks.require(ok, "padding must be 'SAME', 'VALID' or two (low, high) "
                 f"integer pairs, got {padding!r}")
  return tuple((int(lo), int(hi)) for lo, hi in padding)


def _check_shape(name, shape, rank=None):
  """Returns `shape` as a tuple if it is `rank` (default: >= 1) integers >= 1."""
  ok = (isinstance(shape, (tuple, list)) and len(shape) >= 1
        and (rank is None or len(shape) == rank)
        and all(isinstance(s, numbers.Integral) and s >= 1 for s in shape))
  count = "one or more" if rank is None else rank
  checks.require(ok, f"{name} must be {count} integers >= 1, got {shape!r}")
  return tuple(int(s) for s in shape)


def _conv2d(strides, padding, kernel, v):
  """The convolution of one image v [H, W, C_in] with kernel [kh, kw, C_in, C_out]."""
  out = jax.lax.conv_general_dilated(
      v[None], kernel, strides, padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=_HIGHEST)
  return out[0]


@functools.lru_cache(maxsize=None)
def _conv2d_map(strides, padding):
  # One function object per (strides, padding), so that `_lanczos_norm`,
  # which takes it as a static argument, compiles once per configuration.
  return functools.partial(_conv2d, strides, padding)


def conv_operator_norm(kernel, input_shape, strides=(1, 1), padding="SAME",
                       n_iter=50, key=None):
  """The largest singular value of a 2-D convolution as a linear map.

  Computes max ||conv(x)|| / ||x|| over images x of shape `input_shape`, where
  conv is `lax.conv_general_dilated(x, kernel, strides, padding)` (NHWC, HWIO,
  no bias): the convolution's L2 operator norm, its Lipschitz constant (Farnia
  et al. 2019). Power iteration on conv^T conv (`jax.vjp` gives the
  transpose) from a random unit vector, in its Krylov-subspace form (Lanczos
  with full reorthogonalisation): the estimate is at least the plain power
  iteration's after the same number of steps, never above the norm (up to
  float32 rounding), and it converges fast even when the top singular values
  are close, where plain power iteration stalls (50 plain steps are off by up
  to 1 % on small random kernels; 50 Lanczos steps by < 1e-4). For a
  certified upper bound use `lipschitz_bound`.

  Args:
    kernel: array [kh, kw, C_in, C_out].
    input_shape: (H, W, C_in) of one input image.
    strides: two integers >= 1.
    padding: "SAME", "VALID" or ((top, bottom), (left, right)).
    n_iter: iteration steps (>= 1), each one convolution and its transpose.
    key: PRNG key of the random start (default `jax.random.key(0)`).

  Returns:
    The estimated norm, a Python float.
  """
  checks.require(np.ndim(kernel) == 4,
                 f"kernel must have shape [kh, kw, C_in, C_out], got shape "
                 f"{tuple(np.shape(kernel))}")
  input_shape = _check_shape("input_shape", input_shape, 3)
  checks.require(input_shape[2] == np.shape(kernel)[2],
                 f"input_shape {input_shape} has {input_shape[2]} channels but "
                 f"the kernel expects {np.shape(kernel)[2]}")
  strides = _check_pair("strides", strides)
  padding = _check_padding(padding)
  n_iter = checks.integer_at_least("n_iter", n_iter, 1)
  key = jax.random.key(0) if key is None else key
  return float(_lanczos_norm(_conv2d_map(strides, padding),
                              jnp.asarray(kernel, jnp.float32), input_shape,
                              key, n_iter))


# --------------------------------------------------------------------------
# A certified upper bound on a network's Lipschitz constant.


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
    own += [f"{collection}/{name}" for name, value in tree.items()
            if not hasattr(value, "items")]
  return own


def _classify(module):
  """"transparent" (look inside), or the kind of factor the module contributes.

  Raises InputError for a module flagged `residual = True` and for a module
  that holds variables but is none of the known kinds.
  """
  name = _module_name(module)
  checks.require(getattr(module, "residual", False) is not True,
                 f"lipschitz_bound cannot bound {name}: it is flagged residual, "
                 "and the product of layer norms is no bound for x + f(x)")
  if callable(getattr(module, "lipschitz_constant", None)):
    return "lipschitz_constant"
  if isinstance(module, KERNEL_LAYERS):
    return "linear"
  if isinstance(module, nn.BatchNorm):
    return "batch_norm"
  if isinstance(module, _REPARAMETRISATIONS):
    return "transparent"
  own = _own_variables(module)
  checks.require(not own,
                 f"lipschitz_bound cannot bound {name}: {type(module).__name__} "
                 f"holds variables {own} and is none of Dense, Conv, "
                 "ConvTranspose, BatchNorm, a spectral or weight normalisation "
                 "wrapper, or a module with a lipschitz_constant() method")
  return "transparent"


def _concrete_float(name, value):
  checks.require(checks.is_concrete(value),
                 f"{name} is abstract: pass an apply_fn that is not jitted")
  return float(np.asarray(value))


def _batch_norm_constant(module, args, kwargs):
  """max |scale / sqrt(var + eps)| of a BatchNorm in inference mode."""
  name = _module_name(module)
  call_value = kwargs.get("use_running_average",
                          args[1] if len(args) > 1 else None)
  running = nn.merge_param("use_running_average", module.use_running_average,
                           call_value)
  checks.require(running is True,
                 f"BatchNorm {name} runs in training mode (batch statistics): "
                 "pass an apply_fn in inference mode")
  stats = module.variables["batch_stats"]
  gain = jax.lax.rsqrt(jnp.asarray(stats["var"], jnp.float32) + module.epsilon)
  if module.use_scale:
    gain = gain * module.variables["params"]["scale"]
  return _concrete_float(f"BatchNorm {name}", jnp.max(jnp.abs(gain)))


def _find_factors(apply_fn, variables, input_shape):
  """Runs the model once and returns what each module contributes.

  Returns a list of (module_name, kind, example_shape, payload) where payload
  is (layer clone, effective params) for "linear" and a float otherwise.
  """
  found = []
  inside = [0]  # > 0 inside a module that contributes as a whole

  def interceptor(next_fun, args, kwargs, context):
    if (context.method_name != "__call__" or inside[0]
        or getattr(_internal, "depth", 0)):
      return next_fun(*args, **kwargs)
    module = context.module
    kind = _classify(module)
    if kind == "transparent":
      return next_fun(*args, **kwargs)
    inside[0] += 1
    try:
      out = next_fun(*args, **kwargs)
      name = _module_name(module)
      example = tuple(jnp.shape(args[0]))[1:]
      if kind == "linear":
        params = dict(module.variables["params"])
        checks.require(checks.is_concrete(params["kernel"]),
                       f"the kernel of {name} is abstract: pass an apply_fn "
                       "that is not jitted")
        example = _example_shape(jnp.shape(args[0]), params["kernel"].ndim)
        payload = (module.clone(parent=None), params)
      elif kind == "batch_norm":
        payload = _batch_norm_constant(module, args, kwargs)
      else:
        payload = _concrete_float(f"{name}.lipschitz_constant()",
                                  module.lipschitz_constant())
        checks.require(payload >= 0 and math.isfinite(payload),
                       f"{name}.lipschitz_constant() must be finite and >= 0, "
                       f"got {payload!r}")
      found.append((name, kind, example, payload))
    finally:
      inside[0] -= 1
    return out

  dummy = jnp.full((1, *input_shape), 0.5, jnp.float32)
  with nn.intercept_methods(interceptor):
    apply_fn(variables, dummy)
  checks.require(found, "lipschitz_bound found no Dense, Conv, BatchNorm or "
                 "lipschitz_constant() module: apply_fn must call a Linen "
                 "model's apply (not a jitted function)")
  return found


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
    checks.require(name in ("reduce_window_max", "reduce_window_min",
                            "reduce_window_sum"),
                   f"lipschitz_bound cannot bound the window reduction {name}")
    params = eqn.params
    checks.require(all(d == 1 for d in params["base_dilation"]),
                   f"lipschitz_bound cannot bound a {name} with base dilation "
                   f"{params['base_dilation']}")
    windows = params["window_dimensions"]
    covering = math.prod(
        min(w, -(-((w - 1) * d + 1) // s)) for w, s, d in zip(
            windows, params["window_strides"], params["window_dilation"]))
    factor = math.sqrt(covering)
    if name == "reduce_window_sum":
      factor *= math.sqrt(math.prod(windows))
      consumers = uses.get(eqn.outvars[0], [])
      if (len(consumers) == 1 and consumers[0].primitive.name == "div"
          and consumers[0].invars[0] is eqn.outvars[0]
          and isinstance(consumers[0].invars[1], jex_core.Literal)):
        factor /= abs(float(consumers[0].invars[1].val))
    if factor != 1.0:
      yield name, tuple(eqn.invars[0].aval.shape)[1:], factor


def _pool_factors(apply_fn, variables, input_shape):
  """The factors of the pools in the network (see `_window_factors`)."""
  dummy = jnp.full((1, *input_shape), 0.5, jnp.float32)
  jaxpr = jax.make_jaxpr(lambda x: apply_fn(variables, x))(dummy).jaxpr
  return [LayerFactor(name, "pool", shape, factor, "formula")
          for name, shape, factor in _window_factors(jaxpr, set(jaxpr.invars))]


def _linear_norm(clone, params, example_shape, *, n_iter, failure_probability,
                 exact_max_entries, key):
  """(upper bound on the layer's operator norm, method)."""
  linear = _linear_part(clone, params)
  kernel = params["kernel"]
  dim = math.prod(example_shape)
  out_dim = math.prod(jax.eval_shape(
      functools.partial(linear, kernel),
      jax.ShapeDtypeStruct(example_shape, jnp.float32)).shape)
  if dim * out_dim <= exact_max_entries:
    matrix = jax.jit(jax.jacfwd(linear, argnums=1))(
        kernel, jnp.zeros(example_shape, jnp.float32))
    matrix = np.asarray(matrix, np.float64).reshape(out_dim, dim)
    gram = matrix.T @ matrix if dim <= out_dim else matrix @ matrix.T
    top = max(float(np.linalg.eigvalsh(gram)[-1]), 0.0)
    return math.sqrt(top) * (1 + _ROUNDING_SLACK), "svd"
  estimate = float(_lanczos_norm(linear, kernel, example_shape, key, n_iter))
  margin = lanczos_margin(dim, n_iter, failure_probability)
  return estimate * margin * (1 + _ROUNDING_SLACK), "lanczos"


def lipschitz_factors(apply_fn, variables, input_shape, *, n_iter=100,
                      failure_probability=1e-6, exact_max_entries=2**22,
                      key=None):
  """The factors whose product is `lipschitz_bound` (see there), in call order.

  Returns:
    A list of `LayerFactor`.
  """
  input_shape = _check_shape("input_shape", input_shape)
  n_iter = checks.integer_at_least("n_iter", n_iter, 2)
  checks.in_interval("failure_probability", failure_probability, 0, 1,
                     closed=(False, False))
  checks.require(isinstance(exact_max_entries, numbers.Integral)
                 and exact_max_entries >= 0,
                 f"exact_max_entries must be an integer >= 0, got "
                 f"{exact_max_entries!r}")
  key = jax.random.key(0) if key is None else key
  found = _find_factors(apply_fn, variables, input_shape)
  n_linear = sum(kind == "linear" for _, kind, _, _ in found)
  factors = []
  for index, (name, kind, example, payload) in enumerate(found):
    if kind == "linear":
      value, method = _linear_norm(
          *payload, example, n_iter=n_iter,
          failure_probability=failure_probability / n_linear,
          exact_max_entries=exact_max_entries,
          key=jax.random.fold_in(key, index))
    else:
      value, method = payload * (1 + _ROUNDING_SLACK), "formula"
    factors.append(LayerFactor(name, kind, example, value, method))
  return factors + _pool_factors(apply_fn, variables, input_shape)


def _jacobian_norms(apply_fn, variables, input_shape, n_probes, key,
                    n_iter=30):
  """||J(x)|| at `n_probes` inputs x uniform in [0, 1]^input_shape.

  By power iteration, so each is a lower bound on the Lipschitz constant.
  """
  def jacobian_norm(key):
    probe_key, start_key = jax.random.split(key)
    x = jax.random.uniform(probe_key, input_shape)
    _, jvp = jax.linearize(lambda z: apply_fn(variables, z[None])[0], x)
    v = _power_iterate(jvp, _random_unit(start_key, input_shape), n_iter)
    return _sigma(jvp, v)
  norms = jax.jit(jax.vmap(jacobian_norm))(jax.random.split(key, n_probes))
  return [float(n) for n in norms]


def lipschitz_bound(apply_fn, variables, input_shape, *, n_iter=100,
                    failure_probability=1e-6, exact_max_entries=2**22,
                    n_probes=4, key=None):
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
      apply_fn, variables, input_shape, n_iter=n_iter,
      failure_probability=failure_probability,
      exact_max_entries=exact_max_entries, key=key)
  bound = math.prod(f.value for f in factors)
  if n_probes == 0:
    return bound
  probe_key = jax.random.fold_in(key, 2**31 - 1)
  for local in _jacobian_norms(apply_fn, variables, tuple(input_shape),
                               n_probes, probe_key):
    checks.require(local <= bound * (1 + 1e-4),
                   f"lipschitz_bound: the network's Jacobian norm {local:.6g} "
                   f"at a random input exceeds the product {bound:.6g} of its "
                   "layers' norms, so it is not a plain chain of the layers "
                   "found (residual connections or glue code outside modules?)")
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
  checks.require(np.ndim(logits) == 2 and np.shape(logits)[1] >= 2,
                 "logits must have shape [batch, classes] with classes >= 2, "
                 f"got shape {tuple(np.shape(logits))}")
  if checks.is_concrete(lipschitz):
    checks.positive("lipschitz", float(np.asarray(lipschitz)))
  top2 = jax.lax.top_k(logits, 2)[0]
  radius = (top2[:, 0] - top2[:, 1]) / (math.sqrt(2) * lipschitz)
  if labels is None:
    return radius
  checks.check_labels(labels, np.shape(logits)[0], np.shape(logits)[1])
  return jnp.where(jnp.argmax(logits, axis=1) == labels, radius, 0.0)
