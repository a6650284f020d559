"""Spectral normalisation and Lipschitz certificates, checked against explicit
matrices, flax.linen.SpectralNorm, sampled input pairs and a PGD-L2 attack."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrobust as jr
from jaxrobust import spectral
from jaxrobust.checks import InputError
from jaxrobust.certification import lipschitz


# --------------------------------------------------------------------------
# Helpers (test data from numpy: every new shape of a jax.random draw compiles)


def normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def uniform(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).uniform(size=shape), jnp.float32)


def explicit_matrix(fn, shape):
  """The matrix [out, in] of a map that is affine in one example of `shape`."""
  jacobian = jax.jit(jax.jacfwd(fn))(jnp.zeros(shape, jnp.float32))
  n_in = math.prod(shape)
  return np.asarray(jacobian, np.float64).reshape(-1, n_in)


def top_singular_value(matrix):
  return float(np.linalg.svd(matrix, compute_uv=False)[0])


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def conv_matrix(kernel, shape, strides, padding):
  """The matrix [out, in] of a convolution, from every basis image."""
  conv = lambda v: jax.lax.conv_general_dilated(
    v[None],
    kernel,
    strides,
    padding,
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    precision=jax.lax.Precision.HIGHEST,
  )[0]
  jacobian = jax.jacfwd(conv)(jnp.zeros(shape, jnp.float32))
  return jacobian.reshape(-1, math.prod(shape))


def conv_matrix_norm(kernel, shape, strides, padding):
  """Exact norm of a convolution: SVD of its explicit matrix."""
  padding = padding if isinstance(padding, str) else tuple(map(tuple, padding))
  matrix = conv_matrix(kernel, tuple(shape), tuple(strides), padding)
  return top_singular_value(np.asarray(matrix, np.float64))


def layer_norm_in_eval(module, variables, shape):
  """Exact operator norm of a wrapped layer as used with update_stats=False."""
  fn = lambda v: module.apply(variables, v[None], update_stats=False)[0]
  return top_singular_value(explicit_matrix(fn, shape))


def random_variables(module, seed, *args, **kwargs):
  """Variables shaped like `module.init(key, *args, **kwargs)`, drawn by numpy.

  Kernels ~ N(0, 1 / fan_in), biases ~ N(0, 0.01), BatchNorm at its identity
  statistics, power-iteration vectors (ours: v, Flax's: u) uniform on the
  sphere. Only shapes are traced: nothing is compiled (compiling an init
  takes seconds here).
  """
  shapes = jax.eval_shape(functools.partial(module.init, **kwargs), jax.random.key(0), *args)
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key.rsplit("/", 1)[-1]  # flax.linen.SpectralNorm: ".../u"
    if name == "kernel":
      value = rng.normal(size=leaf.shape) / math.sqrt(math.prod(leaf.shape[:-1]))
    elif name in ("bias", "mean"):
      value = 0.1 * rng.normal(size=leaf.shape)
    elif name in ("scale", "var", "sigma"):
      value = np.ones(leaf.shape)
    elif name in ("v", "u"):
      value = rng.normal(size=leaf.shape)
      value /= np.linalg.norm(value)
    else:
      raise ValueError(f"no rule for variable {path}")
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def init(module, x, seed=1):
  """Random variables for a SpectralNorm called on `x`."""
  return random_variables(module, seed, x, update_stats=False)


def train_stats(module, variables, x, steps):
  """`steps` training-mode calls, each advancing the "spectral" collection."""

  @jax.jit
  def step(variables):
    _, updates = module.apply(variables, x, update_stats=True, mutable=[spectral.COLLECTION])
    return {**variables, **updates}

  for _ in range(steps):
    variables = step(variables)
  return variables


def scale_kernel(variables, factor, layer="layer"):
  params = dict(variables["params"])
  params[layer] = {**params[layer], "kernel": params[layer]["kernel"] * factor}
  return {**variables, "params": params}


def jacobian_top(fn, x, steps=50):
  """(||J(x)||, top right singular vector of J(x)) by power iteration."""
  _, jvp = jax.linearize(fn, x)
  vjp = jax.linear_transpose(jvp, x)

  def step(_, v):
    v = vjp(jvp(v))[0]
    return v / jnp.linalg.norm(v)

  v = jax.lax.fori_loop(0, steps, step, jnp.ones_like(x) / math.sqrt(x.size))
  return jnp.linalg.norm(jvp(v)), v


def empirical_lipschitz(logits_fn, key, shape, n_pairs=256, n_near=6):
  """max ||f(x) - f(x')|| / ||x - x'|| over random pairs and near pairs.

  Near pairs are x' = x + h u, u the top singular vector of the Jacobian:
  about the largest local stretch there is.
  """
  single = lambda z: logits_fn(z[None])[0]

  @jax.jit
  def stretches(key):
    k1, k2, k3 = jax.random.split(key, 3)
    x = jax.random.uniform(k1, (n_pairs, *shape))
    x2 = jax.random.uniform(k2, (n_pairs, *shape))
    far = jnp.linalg.norm(logits_fn(x) - logits_fn(x2), axis=1) / jnp.linalg.norm(
      (x - x2).reshape(n_pairs, -1), axis=1
    )

    def near(z, h=1e-3):
      _, u = jacobian_top(single, z)
      return jnp.linalg.norm(single(z + h * u) - single(z)) / h

    return far.max(), jax.vmap(near)(jax.random.uniform(k3, (n_near, *shape)))

  far, near = stretches(key)
  return max(float(far), float(near.max()))


class Normalize(nn.Module):
  """(x - mean) / std with its own Lipschitz constant, like jr.models.Normalize."""

  mean: tuple
  std: tuple

  def __call__(self, x):
    return (x - jnp.asarray(self.mean)) / jnp.asarray(self.std)

  def lipschitz_constant(self):
    return 1.0 / min(self.std)


class TinyCNN(nn.Module):
  """Normalize, conv, relu, max-pool, conv (stride 2), BatchNorm, relu, dense."""

  spectral_norm: bool = False

  @nn.compact
  def __call__(self, x, train=False):
    wrap = (
      (
        lambda layer: functools.partial(
          spectral.SpectralNorm(layer, mode="operator"), update_stats=train
        )
      )
      if self.spectral_norm
      else (lambda layer: layer)
    )
    x = Normalize((0.5, 0.4, 0.3), (0.25, 0.5, 0.2))(x)
    x = nn.relu(wrap(nn.Conv(4, (3, 3)))(x))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = wrap(nn.Conv(6, (3, 3), strides=(2, 2)))(x)
    x = nn.relu(nn.BatchNorm(use_running_average=True)(x))
    x = x.reshape(x.shape[0], -1)
    return wrap(nn.Dense(5))(x)


SHAPE = (8, 8, 3)


@functools.cache
def tiny_bn_cnn(spectral_norm=False):
  """A TinyCNN with random BatchNorm statistics; (apply_fn, variables)."""
  model = TinyCNN(spectral_norm)
  x = uniform(0, (4, *SHAPE))
  variables = random_variables(model, 1, x)
  stats = variables["batch_stats"]["BatchNorm_0"]
  variables = {
    **variables,
    "batch_stats": {
      "BatchNorm_0": {
        "mean": normal(2, stats["mean"].shape),
        "var": 0.2 + 1.8 * uniform(3, stats["var"].shape),
      }
    },
    "params": {
      **variables["params"],
      "BatchNorm_0": {**variables["params"]["BatchNorm_0"], "scale": normal(4, (6,))},
    },
  }
  if spectral_norm:

    @jax.jit
    def step(variables):
      _, updates = model.apply(variables, x, train=True, mutable=[spectral.COLLECTION])
      return {**variables, **updates}

    for _ in range(20):
      variables = step(variables)
  return functools.partial(model.apply, train=False), variables


def pgd_l2(logits_fn, x, y, eps, steps=50):
  """Maximises max_{i != y} f_i - f_y over ||d|| <= eps (no box): x + d."""

  def loss(d):
    z = logits_fn((x + d)[None])[0]
    return jnp.max(jnp.where(jnp.arange(z.shape[0]) == y, -jnp.inf, z)) - z[y]

  def step(_, d):
    g = jax.grad(loss)(d)
    d = d + (2.5 * eps / steps) * g / (jnp.linalg.norm(g) + 1e-12)
    return d * jnp.minimum(1.0, eps / (jnp.linalg.norm(d) + 1e-12))

  d0 = normal(3, x.shape)
  d0 = 0.5 * eps * d0 / jnp.linalg.norm(d0)
  return x + jax.lax.fori_loop(0, steps, step, d0)


# --------------------------------------------------------------------------
# conv_operator_norm


@pytest.mark.parametrize("strides", [(1, 1), (2, 2)])
@pytest.mark.parametrize("padding", ["SAME", "VALID", ((1, 0), (0, 2))])
def test_conv_operator_norm_is_the_top_singular_value(strides, padding):
  shape = (6, 6, 2)
  for seed in range(3):
    kernel = normal(seed, (3, 3, 2, 3))
    exact = conv_matrix_norm(kernel, shape, strides, padding)
    estimate = spectral.conv_operator_norm(
      kernel, shape, strides, padding, key=jax.random.key(seed + 10)
    )
    assert abs(estimate / exact - 1) < 0.01, (seed, estimate, exact)
    assert estimate <= exact * (1 + 1e-5)


def test_matrix_norm_underestimates_the_operator_norm_of_a_3x3_conv():
  # matrix <= operator <= 3 matrix (module docstring); random 3x3 kernels sit
  # well inside, a constant kernel at the top.
  for seed in range(3):
    kernel = normal(seed, (3, 3, 4, 4))
    matrix = float(np.linalg.norm(np.asarray(kernel).reshape(-1, 4), 2))
    operator = spectral.conv_operator_norm(kernel, (16, 16, 4))
    assert 1.2 * matrix < operator <= 3 * matrix
  kernel = jnp.ones((3, 3, 1, 1))
  ratio = spectral.conv_operator_norm(kernel, (32, 32, 1)) / 3.0
  assert 2.8 < ratio <= 3.0


# --------------------------------------------------------------------------
# SpectralNorm


@pytest.mark.parametrize(
  "layer", [lambda: nn.Dense(7), lambda: nn.Conv(4, (3, 3))], ids=["dense", "conv"]
)
def test_matrix_mode_matches_flax_spectral_norm(layer):
  x = normal(1, (3, 5, 5, 2))
  ours = spectral.SpectralNorm(layer(), mode="matrix", rescale="normalize", n_steps=2)
  ours_vars = init(ours, x, seed=0)
  kernel = ours_vars["params"]["layer"]["kernel"] * 3.0
  params = {**ours_vars["params"]["layer"], "kernel": kernel}
  ours_vars = {**ours_vars, "params": {"layer": params}}

  theirs = nn.SpectralNorm(layer(), n_steps=3)
  theirs_vars = init(theirs, x, seed=0)
  theirs_vars = {**theirs_vars, "params": {"layer_instance": params}}
  u0 = next(value for name, value in theirs_vars["batch_stats"].items() if name.endswith("/u"))
  # Flax keeps the output-side vector u; its first step gives the input-side
  # vector v = normalise(K u) that we keep, so its n + 1 steps are our n.
  matrix = kernel.reshape(-1, kernel.shape[-1])
  v0 = matrix @ u0[0]
  ours_vars["spectral"] = {"v": v0 / jnp.linalg.norm(v0), "sigma": ours_vars["spectral"]["sigma"]}

  y_ours, ours_new = ours.apply(ours_vars, x, update_stats=True, mutable=["spectral"])
  y_theirs, theirs_new = theirs.apply(theirs_vars, x, update_stats=True, mutable=["batch_stats"])
  sigma_theirs = next(
    value for name, value in theirs_new["batch_stats"].items() if name.endswith("/sigma")
  )
  np.testing.assert_allclose(ours_new["spectral"]["sigma"], sigma_theirs, rtol=1e-5)
  np.testing.assert_allclose(y_ours, y_theirs, rtol=1e-4, atol=1e-5)

  # After convergence both are at the matrix's top singular value.
  ours_vars = train_stats(ours, ours_vars, x, 30)
  theirs_vars = {**theirs_vars, **theirs_new}
  theirs_step = jax.jit(lambda v: theirs.apply(v, x, update_stats=True, mutable=["batch_stats"])[1])
  for _ in range(30):
    theirs_vars = {**theirs_vars, **theirs_step(theirs_vars)}
  exact = float(np.linalg.norm(np.asarray(matrix, np.float64), 2))
  np.testing.assert_allclose(ours_vars["spectral"]["sigma"], exact, rtol=1e-4)
  np.testing.assert_allclose(
    ours.apply(ours_vars, x, update_stats=False),
    theirs.apply(theirs_vars, x, update_stats=False),
    rtol=1e-3,
    atol=1e-4,
  )


LAYERS = {
  "dense": (lambda: nn.Dense(6), (10,)),
  "conv": (lambda: nn.Conv(3, (3, 3)), (6, 6, 2)),
  "conv_stride2_valid": (lambda: nn.Conv(4, (3, 3), strides=(2, 2), padding="VALID"), (7, 7, 2)),
  "conv_transpose": (lambda: nn.ConvTranspose(3, (3, 3)), (4, 4, 2)),
}


@pytest.mark.parametrize(
  "name, rescale",
  [
    ("dense", "clip"),
    ("dense", "normalize"),
    ("conv", "clip"),
    ("conv", "normalize"),
    ("conv_stride2_valid", "clip"),
    ("conv_transpose", "normalize"),
  ],
)
def test_operator_mode_bounds_the_exact_norm(name, rescale):
  make, shape = LAYERS[name]
  target = 0.7
  module = spectral.SpectralNorm(make(), target=target, rescale=rescale)
  x = normal(0, (2, *shape))
  variables = init(module, x)
  variables = scale_kernel(variables, 4.0)  # well above the target
  variables = train_stats(module, variables, x, 40)
  norm = layer_norm_in_eval(module, variables, shape)
  assert norm <= target * 1.01
  if rescale == "normalize":
    assert norm >= target * 0.99
  np.testing.assert_allclose(variables["spectral"]["v"].shape, shape)


def test_matrix_mode_normalises_the_matrix_not_the_conv():
  module = spectral.SpectralNorm(nn.Conv(4, (3, 3)), mode="matrix")
  shape = (8, 8, 3)
  x = normal(0, (2, *shape))
  variables = scale_kernel(init(module, x), 5.0)
  variables = train_stats(module, variables, x, 40)
  assert variables["spectral"]["v"].shape == (27,)
  sigma = float(variables["spectral"]["sigma"])
  kernel = variables["params"]["layer"]["kernel"] / sigma  # sigma > target
  matrix = np.asarray(kernel, np.float64).reshape(-1, 4)
  assert np.linalg.norm(matrix, 2) <= 1.01
  assert layer_norm_in_eval(module, variables, shape) > 1.2


def test_dense_operator_mode_equals_matrix_mode():
  x = normal(0, (3, 9))
  outputs = []
  for mode in spectral.MODES:
    module = spectral.SpectralNorm(nn.Dense(4), mode=mode)
    variables = scale_kernel(init(module, x), 3.0)
    variables = train_stats(module, variables, x, 30)
    outputs.append(module.apply(variables, x, update_stats=False))
  np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", spectral.MODES)
def test_clip_leaves_a_layer_below_target_unchanged(mode):
  x = normal(0, (2, 6, 6, 2))
  module = spectral.SpectralNorm(nn.Conv(3, (3, 3)), mode=mode, target=2.0)
  variables = init(module, x)
  variables = scale_kernel(variables, 0.1)
  plain = nn.Conv(3, (3, 3)).apply({"params": variables["params"]["layer"]}, x)
  for update_stats in (False, True):
    y = module.apply(variables, x, update_stats=update_stats, mutable=["spectral"])[0]
    np.testing.assert_array_equal(y, plain)


@pytest.mark.parametrize("mode", spectral.MODES)
def test_spectral_state_changes_only_with_update_stats(mode):
  x = normal(0, (2, 6, 6, 2))
  module = spectral.SpectralNorm(nn.Conv(3, (3, 3)), mode=mode)
  variables = module.init(jax.random.key(1), x, update_stats=False)
  assert set(variables) == {"params", "spectral"}
  shape = (6, 6, 2) if mode == "operator" else (18,)
  assert variables["spectral"]["v"].shape == shape
  assert float(jnp.linalg.norm(variables["spectral"]["v"])) == pytest.approx(1)
  assert float(variables["spectral"]["sigma"]) > 0

  y = module.apply(variables, x, update_stats=False)  # no `mutable`
  y_jit = jax.jit(lambda v: module.apply(v, x, update_stats=False))(variables)
  np.testing.assert_allclose(y, y_jit, rtol=1e-5, atol=1e-6)
  _, unchanged = module.apply(variables, x, update_stats=False, mutable=["spectral"])
  jax.tree.map(np.testing.assert_array_equal, unchanged["spectral"], variables["spectral"])

  _, updated = module.apply(variables, x, True, mutable=["spectral"])
  assert not np.allclose(updated["spectral"]["v"], variables["spectral"]["v"])
  with pytest.raises(InputError, match="mutable"):
    module.apply(variables, x, update_stats=True)


def test_gradient_flows_through_sigma_with_constant_vectors():
  x = normal(0, (2, 6, 6, 2))
  module = spectral.SpectralNorm(nn.Conv(3, (3, 3)), rescale="normalize")
  variables = train_stats(module, init(module, x), x, 3)
  v = variables["spectral"]["v"]
  bias = variables["params"]["layer"]["bias"]
  conv = lambda kernel, z: nn.Conv(3, (3, 3)).apply(
    {"params": {"kernel": kernel, "bias": jnp.zeros_like(bias)}}, z
  )

  def reference(kernel):  # Miyato: sigma(K) = ||L_K v||, v a constant
    sigma = jnp.linalg.norm(conv(kernel, v[None]))
    params = {"kernel": kernel / sigma, "bias": bias}
    return jnp.sum(jnp.sin(nn.Conv(3, (3, 3)).apply({"params": params}, x)))

  def ours(kernel):
    params = {"layer": {"kernel": kernel, "bias": bias}}
    y = module.apply({**variables, "params": params}, x, update_stats=False)
    return jnp.sum(jnp.sin(y))

  kernel = variables["params"]["layer"]["kernel"]
  np.testing.assert_allclose(
    jax.grad(ours)(kernel), jax.grad(reference)(kernel), rtol=1e-4, atol=1e-6
  )


def test_spectral_norm_inside_a_model_keeps_the_params_layout():
  apply_fn, variables = tiny_bn_cnn(spectral_norm=True)
  assert set(variables["params"]) == {"Conv_0", "Conv_1", "BatchNorm_0", "Dense_0"}
  assert variables["spectral"]["SpectralNorm_0"]["v"].shape == (8, 8, 3)
  assert variables["spectral"]["SpectralNorm_1"]["v"].shape == (4, 4, 4)
  assert variables["spectral"]["SpectralNorm_2"]["v"].shape == (24,)
  with pytest.raises(InputError, match=r"\(8, 8, 3\).*\(6, 6, 3\)"):
    apply_fn(variables, jnp.zeros((1, 6, 6, 3)))


# --------------------------------------------------------------------------
# lipschitz_bound and certified_radius


@pytest.mark.parametrize("spectral_norm", [False, True])
def test_lipschitz_bound_is_above_every_measured_stretch(spectral_norm):
  apply_fn, variables = tiny_bn_cnn(spectral_norm)
  logits_fn = lambda x: apply_fn(variables, x)
  measured = empirical_lipschitz(logits_fn, jax.random.key(5), SHAPE)
  exact = lipschitz.lipschitz_bound(apply_fn, variables, SHAPE)
  assert measured <= exact
  if not spectral_norm:  # the Lanczos path, with its margin (compiles slowly)
    iterated = lipschitz.lipschitz_bound(
      apply_fn, variables, SHAPE, exact_max_entries=0, n_probes=0
    )
    assert exact <= iterated <= exact * 1.05
  factors = lipschitz.lipschitz_factors(apply_fn, variables, SHAPE)
  assert [f.kind for f in factors] == [
    "lipschitz_constant",
    "linear",
    "linear",
    "batch_norm",
    "linear",
  ]
  assert [f.input_shape for f in factors] == [SHAPE, SHAPE, (4, 4, 4), (2, 2, 6), (24,)]
  assert factors[0].value == pytest.approx(5.0, rel=1e-4)
  if spectral_norm:  # clipped to 1, up to the power iteration, which after
    # 20 steps can still be a few % low when top singular values are close
    assert all(f.value <= 1.05 for f in factors if f.kind == "linear")


def test_lipschitz_bound_of_a_linear_model_is_tight():
  model = nn.Sequential(
    [Normalize((0.5,), (0.5,)), nn.Conv(3, (3, 3)), lambda x: x.reshape(x.shape[0], -1)]
  )
  shape = (10, 10, 1)
  variables = model.init(jax.random.key(0), jnp.zeros((1, *shape)))
  kernel = variables["params"]["layers_1"]["kernel"]
  exact = 2.0 * conv_matrix_norm(kernel, shape, (1, 1), "SAME")
  bound = lipschitz.lipschitz_bound(model.apply, variables, shape, n_probes=0)
  assert exact <= bound <= exact * (1 + 1e-4)
  iterated = lipschitz.lipschitz_bound(
    model.apply, variables, shape, exact_max_entries=0, n_probes=0
  )
  margin = spectral.lanczos_margin(100, 100, 1e-6)
  assert exact <= iterated <= exact * margin * 1.001


@pytest.mark.parametrize(
  "pool, factor",
  [
    (lambda x: nn.max_pool(x, (3, 3), strides=(1, 1), padding="SAME"), 3.0),
    (lambda x: nn.max_pool(x, (2, 2), strides=(2, 2)), None),
    (lambda x: nn.avg_pool(x, (2, 2), strides=(2, 2)), 0.5),
    (lambda x: nn.avg_pool(x, (3, 3), strides=(1, 1), padding="SAME"), None),  # sqrt(9 / 9) = 1
  ],
  ids=["max_overlapping", "max", "avg", "avg_overlapping"],
)
def test_pools_add_their_factor(pool, factor):
  def pooled(variables, x):
    return pool(nn.Dense(4).apply(variables, x)).reshape(x.shape[0], -1)

  variables = nn.Dense(4).init(jax.random.key(0), jnp.zeros((1, 6, 6, 2)))
  factors = lipschitz.lipschitz_factors(pooled, variables, (6, 6, 2))
  if factor is None:
    assert [f.kind for f in factors] == ["linear"]
  else:
    assert [f.kind for f in factors] == ["linear", "pool"]
    assert factors[1].value == pytest.approx(factor)
  measured = empirical_lipschitz(lambda x: pooled(variables, x), jax.random.key(1), (6, 6, 2))
  assert measured <= lipschitz.lipschitz_bound(pooled, variables, (6, 6, 2), n_probes=0)


def test_lipschitz_bound_of_the_library_small_cnn():
  model = jr.models.SmallCNN(num_classes=3, mean=(0.5,), std=(0.25,), width=2)
  variables = random_variables(model, 0, jnp.zeros((1, 8, 8, 1)))
  apply_fn = functools.partial(model.apply, train=False)
  bound = lipschitz.lipschitz_bound(apply_fn, variables, (8, 8, 1))
  measured = empirical_lipschitz(lambda x: apply_fn(variables, x), jax.random.key(1), (8, 8, 1))
  assert measured <= bound


def test_certified_radius_is_never_contradicted_by_pgd():
  apply_fn, variables = tiny_bn_cnn(spectral_norm=True)
  logits_fn = lambda x: apply_fn(variables, x)
  bound = lipschitz.lipschitz_bound(apply_fn, variables, SHAPE, n_probes=0)
  x = uniform(9, (8, *SHAPE))
  logits = logits_fn(x)
  labels = jnp.argmax(logits, axis=1)
  radius = lipschitz.certified_radius(logits, bound, labels)
  assert bool(jnp.all(radius > 0))
  attack = jax.jit(jax.vmap(functools.partial(pgd_l2, logits_fn)))
  x_adv = attack(x, labels, radius * 0.999)
  assert bool(jnp.all(jnp.argmax(logits_fn(x_adv), axis=1) == labels))
  assert bool(jnp.all(jnp.linalg.norm((x_adv - x).reshape(8, -1), axis=1) <= radius))


def test_certified_radius_of_a_linear_model_is_reached_by_pgd():
  # For two classes and f(x) = W x + b the prediction flips at distance
  # |f_0 - f_1| / ||w_0 - w_1||; the radius margin / (sqrt(2) ||W||) is below
  # it, and PGD flips every example just beyond it (so the attack is not
  # toothless).
  model = nn.Dense(2)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 6)))
  kernel = variables["params"]["kernel"]
  logits_fn = lambda x: model.apply(variables, x)
  x = normal(1, (16, 6))
  logits = logits_fn(x)
  labels = jnp.argmax(logits, axis=1)
  bound = lipschitz.lipschitz_bound(model.apply, variables, (6,), n_probes=0)
  radius = lipschitz.certified_radius(logits, bound)
  flip = jnp.abs(logits[:, 0] - logits[:, 1]) / jnp.linalg.norm(kernel[:, 0] - kernel[:, 1])
  assert bool(jnp.all(radius <= flip * (1 + 1e-5)))
  attack = jax.jit(jax.vmap(functools.partial(pgd_l2, logits_fn)))
  assert bool(jnp.all(jnp.argmax(logits_fn(attack(x, labels, radius * 0.999)), 1) == labels))
  assert bool(jnp.all(jnp.argmax(logits_fn(attack(x, labels, flip * 1.05)), 1) != labels))


def test_certified_radius_formula():
  logits = jnp.array([[3.0, 1.0, 0.5], [0.0, 2.0, 1.5]])
  radius = lipschitz.certified_radius(logits, 2.0)
  np.testing.assert_allclose(radius, [2 / (2 * math.sqrt(2)), 0.5 / (2 * math.sqrt(2))], rtol=1e-6)
  with_labels = lipschitz.certified_radius(logits, 2.0, jnp.array([0, 2]))
  np.testing.assert_allclose(with_labels, [radius[0], 0.0], rtol=1e-6)


def test_lanczos_margin_shrinks_with_steps():
  margins = [spectral.lanczos_margin(3072, n, 1e-6) for n in (10, 50, 100)]
  assert margins[0] > margins[1] > margins[2] > 1.0
  assert margins[2] < 1.01
  assert spectral.lanczos_margin(3072, 100, 1e-9) > margins[2]


# --------------------------------------------------------------------------
# What lipschitz_bound refuses, and bad arguments


class Residual(nn.Module):
  residual = True

  @nn.compact
  def __call__(self, x):
    return x + nn.Dense(x.shape[-1])(x)


class WithLayerNorm(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.LayerNorm()(x))


class TrainingBatchNorm(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.BatchNorm(use_running_average=False)(x))


class ScaledOutsideModules(nn.Module):
  @nn.compact
  def __call__(self, x):
    return 100.0 * nn.Dense(3)(x)


@pytest.mark.parametrize(
  "model, match",
  [
    (Residual(), "residual"),
    (WithLayerNorm(), "LayerNorm"),
    (TrainingBatchNorm(), "training mode"),
    (ScaledOutsideModules(), "Jacobian norm"),
  ],
)
def test_lipschitz_bound_refuses_what_it_cannot_bound(model, match):
  variables = model.init(jax.random.key(0), jnp.ones((2, 5)))
  apply_fn = model.apply
  if isinstance(model, TrainingBatchNorm):
    apply_fn = lambda v, x: model.apply(v, x, mutable=["batch_stats"])[0]
  with pytest.raises(InputError, match=match):
    lipschitz.lipschitz_bound(apply_fn, variables, (5,))


def test_lipschitz_bound_refuses_a_jitted_apply():
  model = nn.Dense(3)
  variables = model.init(jax.random.key(0), jnp.ones((1, 5)))
  jitted = jax.jit(model.apply)
  jitted(variables, jnp.ones((1, 5)))
  with pytest.raises(InputError, match="jitted"):
    lipschitz.lipschitz_bound(jitted, variables, (5,))


class NoKernel(nn.Module):
  @nn.compact
  def __call__(self, x):
    return x * self.param("w", nn.initializers.ones, (x.shape[-1],))


@pytest.mark.parametrize(
  "kwargs, match",
  [
    ({"target": 0.0}, "target.*0.0"),
    ({"target": -1.0}, "target.*-1.0"),
    ({"n_steps": 0}, "n_steps.*0"),
    ({"mode": "frobenius"}, "mode 'frobenius'"),
    ({"rescale": "scale"}, "rescale 'scale'"),
    ({"layer": nn.BatchNorm(use_running_average=True)}, "BatchNorm"),
    ({"layer": NoKernel()}, "NoKernel"),
  ],
)
def test_spectral_norm_rejects_bad_settings(kwargs, match):
  kwargs = {"layer": nn.Dense(3), **kwargs}
  with pytest.raises(InputError, match=match):
    spectral.SpectralNorm(**kwargs)


def test_spectral_norm_rejects_a_non_boolean_update_stats():
  module = spectral.SpectralNorm(nn.Dense(3))
  with pytest.raises(InputError, match="update_stats.*'yes'"):
    module.init(jax.random.key(0), jnp.ones((1, 4)), update_stats="yes")


def test_spectral_norm_needs_its_collection():
  module = spectral.SpectralNorm(nn.Dense(3))
  x = jnp.ones((1, 4))
  variables = module.init(jax.random.key(0), x, update_stats=False)
  with pytest.raises(InputError, match="'spectral' collection"):
    module.apply({"params": variables["params"]}, x, update_stats=False)


@pytest.mark.parametrize(
  "args, match",
  [
    ((jnp.ones((3, 3, 2)), (6, 6, 2)), r"kernel.*\(3, 3, 2\)"),
    ((jnp.ones((3, 3, 2, 4)), (6, 6, 3)), "3 channels"),
    ((jnp.ones((3, 3, 2, 4)), (6, 6)), r"input_shape.*\(6, 6\)"),
    ((jnp.ones((3, 3, 2, 4)), (6, 6, 2), (0, 1)), r"strides.*\(0, 1\)"),
    ((jnp.ones((3, 3, 2, 4)), (6, 6, 2), (1, 1), "FULL"), "padding 'FULL'"),
    ((jnp.ones((3, 3, 2, 4)), (6, 6, 2), (1, 1), ((1, 1),)), r"\(\(1, 1\),\)"),
    ((jnp.ones((3, 3, 2, 4)), (6, 6, 2), (1, 1), "SAME", 0), "n_iter.*0"),
  ],
)
def test_conv_operator_norm_rejects_bad_arguments(args, match):
  with pytest.raises(InputError, match=match):
    spectral.conv_operator_norm(*args)


def test_lipschitz_and_radius_reject_bad_arguments():
  model = nn.Dense(3)
  variables = model.init(jax.random.key(0), jnp.ones((1, 5)))
  with pytest.raises(InputError, match=r"input_shape.*\(5, 0\)"):
    lipschitz.lipschitz_bound(model.apply, variables, (5, 0))
  with pytest.raises(InputError, match="failure_probability.*1.5"):
    lipschitz.lipschitz_bound(model.apply, variables, (5,), failure_probability=1.5)
  with pytest.raises(InputError, match="n_iter.*1"):
    lipschitz.lipschitz_bound(model.apply, variables, (5,), n_iter=1)
  with pytest.raises(InputError, match="lipschitz.*0.0"):
    lipschitz.certified_radius(jnp.ones((2, 3)), 0.0)
  with pytest.raises(InputError, match=r"logits.*\(3,\)"):
    lipschitz.certified_radius(jnp.ones((3,)), 1.0)
  with pytest.raises(InputError, match=r"labels.*\[7\]"):
    lipschitz.certified_radius(jnp.ones((2, 3)), 1.0, jnp.array([0, 7]))
