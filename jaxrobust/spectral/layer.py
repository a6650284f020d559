"""`SpectralNorm`: spectral normalisation of a Dense or Conv layer, as a Linen transform."""

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array

from jaxrobust import checks
from jaxrobust.spectral import iteration

COLLECTION = "spectral"
MODES = ("operator", "matrix")
RESCALES = ("clip", "normalize")
KERNEL_LAYERS = (nn.Dense, nn.Conv, nn.ConvTranspose)
# The name of the layer copies that `linear_part` applies; `lipschitz_bound`,
# which intercepts every module call, skips them.
LINEAR_PART = "jaxrobust_linear_part"
_HIGHEST = jax.lax.Precision.HIGHEST


def example_shape(input_shape: Sequence[int], kernel_ndim: int) -> tuple[int, ...]:
  """Shape of one example of a layer input: its last kernel_ndim - 1 axes.

  Dense (kernel [in, out]) acts on the last axis; an N-d convolution (kernel
  [*window, in, out]) on the last N + 1 axes. Any leading axes are batch axes,
  and the map is block diagonal over them, with the norm of one block.

  Args:
    input_shape: the shape of the layer's input, batch axes included.
    kernel_ndim: the rank of the layer's kernel.

  Returns:
    The shape of one example.
  """
  n = kernel_ndim - 1
  checks.require(
    len(input_shape) >= n,
    f"a layer with a {kernel_ndim}-d kernel needs inputs of rank "
    f">= {n}, got shape {tuple(input_shape)}",
  )
  return tuple(input_shape[len(input_shape) - n :])


def linear_part(layer: nn.Module, params: dict[str, Any]) -> Callable[[Array, Array], Array]:
  """f(kernel, v): the layer applied to one example v with the bias at 0.

  With every parameter but the kernel set to zero, the layer computes exactly
  its linear map.

  Args:
    layer: a Dense, Conv or ConvTranspose.
    params: its parameters ("kernel" and any others, e.g. "bias").

  Returns:
    The linear map, a function of the kernel and one example.
  """
  unbound = layer.clone(parent=None, name=LINEAR_PART)
  others = {name: jnp.zeros_like(value) for name, value in params.items() if name != "kernel"}

  def apply(kernel: Array, v: Array) -> Array:
    return unbound.apply({"params": {**others, "kernel": kernel}}, v[None])[0]

  return apply


def matrix_part(kernel: Array, v: Array) -> Array:
  """v times the kernel reshaped to [prod(other dims), out] (Miyato's matrix).

  Args:
    kernel: a kernel [..., out].
    v: a vector [prod(kernel.shape[:-1])].

  Returns:
    The product, [out].
  """
  return jnp.matmul(v, kernel.reshape(-1, kernel.shape[-1]), precision=_HIGHEST)


def _rescale_factor(sigma: Array, target: float, rescale: str) -> Array:
  """The number the kernel is divided by.

  "clip": max(1, sigma / target) (Farnia et al. 2019), which leaves a layer
  whose norm is already at most `target` unchanged; "normalize": sigma / target
  (Miyato et al. 2018), which sets the norm to `target` (1 when sigma = 0).
  """
  ratio = sigma / target
  if rescale == "clip":
    return jnp.maximum(1.0, ratio)
  return jnp.where(sigma > 0, ratio, 1.0)


def check_kernel_layer(layer: Any) -> None:
  """Raises InputError unless `layer` is an nn.Dense, nn.Conv or nn.ConvTranspose.

  Args:
    layer: the layer to check.
  """
  checks.require(
    isinstance(layer, KERNEL_LAYERS),
    "SpectralNorm wraps a layer with a kernel (nn.Dense, nn.Conv "
    f"or nn.ConvTranspose), got {type(layer).__name__}",
  )


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

  def __post_init__(self) -> None:
    check_kernel_layer(self.layer)
    checks.one_of("mode", self.mode, MODES)
    checks.one_of("rescale", self.rescale, RESCALES)
    checks.integer_at_least("n_steps", self.n_steps, 1)
    checks.positive("target", self.target)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: Array, update_stats: bool) -> Array:
    """Applies the layer to `x` with its spectrally normalised kernel.

    Args:
      x: the layer's input.
      update_stats: True in training: advance the power iteration and store
        it (needs `mutable=["spectral"]`); False: read the stored state only.

    Returns:
      The layer's output with kernel K / c (see the class docstring).
    """
    checks.require(
      isinstance(update_stats, bool), f"update_stats must be True or False, got {update_stats!r}"
    )
    if self.is_initializing():
      # Creates the raw parameters; the mapped call below only reads them
      # (map_variables with init=True would store the rescaled kernel).
      self.layer(x)
    normalize = functools.partial(
      self._normalize, input_shape=jnp.shape(x), update_stats=update_stats
    )
    return nn.map_variables(lambda layer: layer(x), "params", trans_in_fn=normalize, mutable=False)(
      self.layer
    )

  def _normalize(self, variables: Any, *, input_shape: tuple[int, ...], update_stats: bool) -> Any:
    """Returns the layer's variables with the kernel divided by c."""
    params = dict(variables["params"])
    checks.require(
      "kernel" in params,
      f"SpectralNorm needs a layer with a 'kernel' parameter; "
      f"{type(self.layer).__name__} has {sorted(params)}",
    )
    kernel = params["kernel"]
    linear: Callable[[Array, Array], Array]
    shape: tuple[int, ...]
    if self.mode == "matrix":
      linear = matrix_part
      shape = (math.prod(kernel.shape[:-1]),)
    else:
      linear = linear_part(self.layer, params)
      shape = example_shape(input_shape, kernel.ndim)
    v = self._stored_vector(shape)
    if update_stats:
      checks.require(
        self.is_mutable_collection(COLLECTION),
        f"update_stats=True updates the power iteration: call apply with mutable=[{COLLECTION!r}]",
      )
      frozen = functools.partial(linear, jax.lax.stop_gradient(kernel))
      for _ in range(self.n_steps):
        v = iteration.power_step(frozen, v)
    v = jax.lax.stop_gradient(v)
    sigma = iteration.sigma(functools.partial(linear, kernel), v)
    if update_stats or self.is_initializing():
      self.put_variable(COLLECTION, "v", v)
      self.put_variable(COLLECTION, "sigma", jax.lax.stop_gradient(sigma))
    factor = _rescale_factor(sigma, self.target, self.rescale)
    params["kernel"] = (kernel / factor).astype(kernel.dtype)
    return {**variables, "params": params}

  def _stored_vector(self, shape: tuple[int, ...]) -> Array:
    """The stored power-iteration vector (drawn at initialisation)."""
    if not self.has_variable(COLLECTION, "v"):
      checks.require(
        self.is_mutable_collection(COLLECTION),
        f"the variables have no {COLLECTION!r} collection for "
        f"{self.name}: pass the one returned by init",
      )
      self.put_variable(COLLECTION, "v", iteration.random_unit(self.make_rng("params"), shape))
      self.put_variable(COLLECTION, "sigma", jnp.zeros((), jnp.float32))
    v: Array = self.get_variable(COLLECTION, "v")
    checks.require(
      tuple(v.shape) == tuple(shape),
      f"SpectralNorm {self.name} was initialised for a "
      f"power-iteration vector of shape {tuple(v.shape)} but its "
      f"input now needs shape {tuple(shape)} (operator mode "
      "depends on the input's shape)",
    )
    return v
