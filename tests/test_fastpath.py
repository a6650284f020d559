"""The CPU fast path: the same values and gradients as the untransformed
function, the structure it promises (no select-and-scatter), and the JAX
internals it reads."""

from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxrobust import fastpath


def normal(seed, shape):
  return jax.random.normal(jax.random.key(seed), shape)


def primitives(jaxpr):
  """{name: [params, ...]} of every equation of `jaxpr`, sub-jaxprs included."""
  found = {}
  for eqn in jaxpr.eqns:
    found.setdefault(eqn.primitive.name, []).append(eqn.params)
    for value in eqn.params.values():
      for sub in value if isinstance(value, tuple) else (value,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          for name, params in primitives(sub).items():
            found.setdefault(name, []).extend(params)
  return found


def assert_same(pairs, *args, rtol=1e-4, atol=1e-5):
  """Each (f, g) of `pairs` agree on `args`; all compiled as one program."""
  outs = jax.jit(lambda *a: [(f(*a), g(*a)) for f, g in pairs])(*args)
  for expected, actual in outs:
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(actual)):
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=rtol, atol=atol)


def assert_fast_is_exact(f, x, rtol=1e-4, atol=1e-5):
  """Values, the gradient transformed after differentiation (how the
  attacks use it) and the gradient of the transformed function all agree."""
  loss = lambda f: lambda x: jnp.sum(jnp.sin(f(x)))
  grad = jax.grad(loss(f))
  assert_same(
    [(f, fastpath.fast(f)), (grad, fastpath.fast(grad)), (grad, jax.grad(loss(fastpath.fast(f))))],
    x,
    rtol=rtol,
    atol=atol,
  )


class LinenCNN(nn.Module):
  """Every layer the fast path rewrites: small-channel and wide convolutions
  (one strided), max- and average-pooling (VALID and SAME), BatchNorm."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(6, (5, 5), padding="VALID")(x))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = nn.relu(nn.Conv(24, (3, 3))(x))
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = nn.BatchNorm(use_running_average=True)(x)
    x = nn.relu(nn.Conv(20, (3, 3), strides=(2, 2))(x))
    x = nn.max_pool(x, (3, 3), strides=(3, 3), padding="SAME")  # padded windows
    return nn.Dense(10)(x.reshape(x.shape[0], -1))


@pytest.fixture(scope="module")
def linen_fn():
  model = LinenCNN()
  x = jax.random.uniform(jax.random.key(0), (4, 28, 28, 3))
  variables = jax.jit(model.init)(jax.random.key(1), x)
  # Non-trivial running statistics, so that BatchNorm is not the identity.
  stats = jax.jit(lambda s: jax.tree.map(lambda s: s + 0.3 * jnp.abs(normal(2, s.shape)), s))(
    variables["batch_stats"]
  )
  variables = {**variables, "batch_stats": stats}
  return lambda x: model.apply(variables, x), x


def test_linen_model_values_and_gradients(linen_fn):
  f, x = linen_fn
  assert_fast_is_exact(f, x)


def test_gradient_has_no_select_and_scatter(linen_fn):
  f, x = linen_fn
  g = jax.grad(lambda x: f(x).sum())
  assert "select_and_scatter" in jax.jit(g).lower(x).as_text()  # the test can fail
  for fast_g in (fastpath.fast(g), jax.grad(lambda x: fastpath.fast(f)(x).sum())):
    assert "select_and_scatter" not in jax.jit(fast_g).lower(x).as_text()
    compiled = jax.jit(fast_g).lower(x).compile().as_text()
    assert " scatter(" not in compiled and "reduce-window(" not in compiled


def test_bare_lax_model_nchw():
  kernel, dense = normal(1, (8, 3, 3, 3)), normal(2, (8 * 4 * 4, 5))

  def f(x):  # NCHW, OIHW, strided and dilated convolution, lax pooling
    y = lax.conv_general_dilated(
      x,
      kernel,
      (1, 1),
      ((1, 1), (1, 1)),
      rhs_dilation=(1, 1),
      dimension_numbers=("NCHW", "OIHW", "NCHW"),
    )
    y = lax.reduce_window(jnp.tanh(y), -jnp.inf, lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")
    y = lax.reduce_window(y, 0.0, lax.add, (1, 1, 2, 2), (1, 1, 2, 2), "VALID") / 4
    return y.reshape(y.shape[0], -1) @ dense

  assert_fast_is_exact(f, normal(0, (3, 3, 17, 16)))  # 17: VALID drops a row


def test_overlapping_and_dilated_windows_fall_back():
  f = lambda x: lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "VALID")
  jaxpr = jax.make_jaxpr(fastpath.fast(f))(normal(0, (2, 9, 9, 2)))
  assert "reduce_window_max" in primitives(jaxpr.jaxpr)
  assert_fast_is_exact(f, normal(0, (2, 9, 9, 2)))


def test_ties_take_the_first_maximum_in_row_major_order():
  # ReLU zeros tie in real networks: the gradient must equal XLA's, which
  # sends all of it to the first maximum of each window (row-major).
  x = jnp.zeros((1, 4, 4, 1)).at[0, 1, :, 0].set(1.0).at[0, 3, 3, 0].set(-1.0)
  pool = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))
  fast_grad = jax.grad(lambda x: fastpath.fast(pool)(x).sum())(x)[0, :, :, 0]
  expected = np.array([[0, 0, 0, 0], [1, 0, 1, 0], [1, 0, 1, 0], [0, 0, 0, 0]], np.float32)
  np.testing.assert_array_equal(fast_grad, expected)
  np.testing.assert_array_equal(jax.grad(lambda x: pool(x).sum())(x)[0, :, :, 0], expected)
  assert_fast_is_exact(pool, jnp.round(normal(1, (2, 8, 8, 3))))  # many ties
  # forward mode (select_and_gather_add) too
  jvp = lambda f: lambda x: jax.jvp(f, (x,), (normal(3, x.shape),))[1]
  assert_same([(jvp(pool), fastpath.fast(jvp(pool)))], jnp.round(normal(1, (2, 8, 8, 3))))


def test_inside_control_flow_jit_and_remat():
  pool = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))
  w = normal(5, (3, 3, 2, 2))
  conv = lambda x: lax.conv_general_dilated(
    x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  up = lambda y: jnp.repeat(jnp.repeat(y, 2, 1), 2, 2)

  def f(x):
    x = jax.jit(lambda x: up(pool(conv(x))))(x)
    x = jax.checkpoint(lambda x: up(pool(x)) * 1.5)(x)
    x, _ = lax.scan(lambda c, _: (up(pool(conv(c))), None), x, None, length=2)
    x = lax.fori_loop(0, 2, lambda i, c: up(pool(c)) + 0.1 * c, x)
    return lax.cond(x.sum() > 0, lambda x: up(pool(x)), lambda x: -x, x)

  x = normal(0, (2, 8, 8, 2))
  assert_fast_is_exact(f, x)
  g = fastpath.fast(jax.grad(lambda x: f(x).sum()))
  assert "select_and_scatter" not in jax.jit(g).lower(x).as_text()


def test_flax_nnx_model():
  nnx = pytest.importorskip("flax.nnx")

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
      self.norm = nnx.BatchNorm(8, use_running_average=True, rngs=rngs)
      self.dense = nnx.Linear(8 * 4 * 4, 4, rngs=rngs)

    def __call__(self, x):
      x = nnx.max_pool(nnx.relu(self.norm(self.conv(x))), (2, 2), strides=(2, 2))
      x = nnx.avg_pool(x, (2, 2), strides=(2, 2))
      return self.dense(x.reshape(x.shape[0], -1))

  graphdef, state = nnx.split(Net(nnx.Rngs(0)))
  f = lambda x: nnx.merge(graphdef, state)(x)
  assert_fast_is_exact(f, normal(0, (2, 16, 16, 3)))


def test_small_channel_convolutions_get_channels_up_to_a_multiple_of_8():
  w = normal(1, (5, 5, 3, 6)) * 0.2
  for padding, strides in (("VALID", (1, 1)), ("SAME", (2, 1))):
    f = lambda x, strides=strides, padding=padding: lax.conv_general_dilated(
      x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    x = normal(0, (2, 12, 11, 3))
    assert_fast_is_exact(f, x, rtol=1e-4, atol=1e-5)
    for g in (f, jax.grad(lambda x, f=f: jnp.sum(jnp.sin(f(x))))):
      convs = [
        e
        for e in jax.make_jaxpr(fastpath.fast(g))(x).jaxpr.eqns
        if e.primitive.name == "conv_general_dilated"
      ]
      assert convs
      for e in convs:  # canonical: input [..., C], kernel [..., I, O]
        assert e.invars[0].aval.shape[-1] % 8 == 0
        assert e.invars[1].aval.shape[-2:] == (8, 8)
  wide = normal(1, (3, 3, 3, 32))
  f = lambda x: lax.conv_general_dilated(
    x, wide, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  (conv,) = [
    e
    for e in jax.make_jaxpr(fastpath.fast(f))(normal(0, (2, 8, 8, 3))).jaxpr.eqns
    if e.primitive.name == "conv_general_dilated"
  ]
  assert conv.invars[1].aval.shape[-2:] == (3, 32)  # a wide layer is left alone


def test_identity_off_cpu():
  f = lambda x: x
  with mock.patch.object(jax, "default_backend", return_value="gpu"):
    assert fastpath.fast(f) is f
  assert fastpath.fast(f) is not f


def test_disabled_is_part_of_the_jit_cache_key():
  # One jitted function called outside, inside, then outside `disabled()`:
  # the rewritten program (3->6 channels padded to 8->8), then the plain one,
  # then the rewritten one again from the cache. Both a `fast` function made
  # outside the trace and one made while it traces obey the switch.
  w = normal(1, (3, 3, 3, 6))
  conv = lambda x: lax.conv_general_dilated(
    x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  made_before = fastpath.fast(conv)
  traces = []

  def f(x):
    traces.append(fastpath.enabled())
    return made_before(x), fastpath.fast(conv)(x)

  jitted, x = jax.jit(f), normal(0, (2, 8, 8, 3))

  def padded_convolutions():
    lines = jitted.lower(x).as_text().splitlines()
    convs = [line for line in lines if "stablehlo.convolution" in line]
    assert len(convs) == 2
    return sum("-> tensor<2x8x8x8xf32>" in line for line in convs)

  expected = jitted(x)
  assert traces == [True] and padded_convolutions() == 2
  with fastpath.disabled():
    assert not fastpath.enabled()
    assert_same([(lambda x: expected, jitted)], x)
    assert traces == [True, False] and padded_convolutions() == 0
  assert fastpath.enabled()
  assert_same([(lambda x: expected, jitted)], x)
  assert traces == [True, False] and padded_convolutions() == 2


def test_training_step_gradient_has_no_select_and_scatter():
  import optax
  from jaxrobust import parallel
  from jaxrobust.training import step as training
  from jaxrobust.training import objectives

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      del train
      x = nn.max_pool(nn.relu(nn.Conv(4, (3, 3))(x)), (2, 2), strides=(2, 2))
      return nn.Dense(3)(x.reshape(x.shape[0], -1))

  model, tx = Net(), optax.sgd(0.1)
  mesh = parallel.mesh(jax.devices()[:1])
  state = training.init_state(model, tx, (8, 8, 1), jax.random.key(0))
  step = training.make_train_step(model, tx, objectives.create("natural"), mesh)
  x, y = jax.random.uniform(jax.random.key(1), (4, 8, 8, 1)), jnp.arange(4) % 3
  assert "select_and_scatter" not in step.lower(state, x, y, jax.random.key(2)).as_text()


# ----------------------------------------------------------------------------
# The JAX internals the transform reads (pinned: fails loudly on an upgrade).


def test_pinned_jax_primitives_and_params():
  x = normal(0, (2, 8, 8, 3))
  (eqn,) = jax.make_jaxpr(lambda x: nn.max_pool(x, (2, 2), strides=(2, 2)))(x).eqns
  assert eqn.primitive is lax.reduce_window_max_p and eqn.primitive.name == "reduce_window_max"
  assert set(eqn.params) == {
    "window_dimensions",
    "window_strides",
    "padding",
    "base_dilation",
    "window_dilation",
  }
  assert eqn.params["window_dimensions"] == (1, 2, 2, 1)
  names = [
    e.primitive.name
    for e in jax.make_jaxpr(lambda x: nn.avg_pool(x, (2, 2), strides=(2, 2)))(x).eqns
  ]
  assert names[0] == "reduce_window_sum"

  grad = jax.make_jaxpr(jax.grad(lambda x: nn.max_pool(x, (2, 2), strides=(2, 2)).sum()))(x)
  (scatter,) = [e for e in grad.eqns if e.primitive.name == "select_and_scatter_add"]
  assert scatter.params["select_prim"] is lax.ge_p
  assert set(scatter.params) == {"select_prim", "window_dimensions", "window_strides", "padding"}
  # The gradient of average-pooling: pad (k - 1 everywhere), then a stride-1 window sum.
  grad = jax.make_jaxpr(jax.grad(lambda x: nn.avg_pool(x, (2, 2), strides=(2, 2)).sum()))(x)
  pads = [e for e in grad.eqns if e.primitive.name == "pad"]
  assert [tuple(c) for c in pads[0].params["padding_config"]] == [
    (0, 0, 0),
    (1, 1, 1),
    (1, 1, 1),
    (0, 0, 0),
  ]
  assert grad.eqns[-1].primitive.name == "reduce_window_sum"
  assert grad.eqns[-1].invars[0] is pads[0].outvars[0]

  conv = jax.make_jaxpr(lambda x: nn.Conv(4, (3, 3)).init_with_output(jax.random.key(0), x)[0])(x)
  (c,) = [e for e in conv.eqns if e.primitive is lax.conv_general_dilated_p]
  assert set(c.params) <= {
    "window_strides",
    "padding",
    "lhs_dilation",
    "rhs_dilation",
    "dimension_numbers",
    "feature_group_count",
    "batch_group_count",
    "precision",
    "preferred_element_type",
    "out_sharding",
  }
  sub = jax.make_jaxpr(lambda x: jax.jit(jnp.sin)(x))(x).eqns[0]
  assert sub.primitive.name in fastpath._RULES and "jaxpr" in sub.params
  remat = jax.make_jaxpr(jax.checkpoint(jnp.sin))(x).eqns[0]
  assert remat.primitive.name in fastpath._RULES
  assert {"jaxpr", "prevent_cse", "policy"} <= set(remat.params)
  scan = jax.make_jaxpr(lambda x: lax.scan(lambda c, _: (c, c), x, None, length=2))(x).eqns[0]
  assert {"jaxpr", "num_consts", "num_carry", "length", "reverse", "unroll"} <= set(scan.params)
  loop = jax.make_jaxpr(lambda x: lax.while_loop(lambda c: c.sum() > 0, jnp.sin, x))(x).eqns[0]
  assert {"cond_jaxpr", "body_jaxpr", "cond_nconsts", "body_nconsts"} <= set(loop.params)
  cond = jax.make_jaxpr(lambda x: lax.cond(x.sum() > 0, jnp.sin, jnp.cos, x))(x).eqns[-1]
  assert cond.primitive.name == "cond" and "branches" in cond.params
