"""The library as research code uses it: a Flax Linen CNN with BatchNorm and a
`train` argument trained by a plain optax loop, an NNX module, attacks inside
a jitted step, under `lax.scan` and `vmap`, low-precision images, bad input
under jit. Each case gives the right number or a clear error."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import jaxrobust as jr


class LinenCNN(nn.Module):
  """A plain Linen CNN with BatchNorm and the usual `train` argument."""

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(8, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = nn.relu(x)
    x = nn.avg_pool(x, (2, 2), (2, 2))
    return nn.Dense(10)(x.reshape(len(x), -1))


class NNXNet(nnx.Module):
  def __init__(self, rngs):
    self.hidden = nnx.Linear(64, 32, rngs=rngs)
    self.norm = nnx.BatchNorm(32, rngs=rngs)
    self.out = nnx.Linear(32, 10, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.norm(self.hidden(x.reshape(len(x), -1)))))


@pytest.fixture(scope="module")
def digits():
  x, y = jr.data.load("digits", "train")
  xt, yt = jr.data.load("digits", "test")
  return x, y, xt[:64], yt[:64]


@pytest.fixture(scope="module")
def linen(digits):
  """(model, variables) trained for 150 steps of Adam, as a researcher would."""
  x, y, _, _ = digits
  model = LinenCNN()
  variables = model.init(jax.random.key(0), x[:2], train=False)
  optimizer = optax.adam(3e-3)
  opt_state = optimizer.init(variables["params"])

  @jax.jit
  def step(variables, opt_state, xb, yb):
    def loss(params):
      logits, updates = model.apply(
        {**variables, "params": params}, xb, train=True, mutable=["batch_stats"]
      )
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), updates

    grads, updates = jax.grad(loss, has_aux=True)(variables["params"])
    changes, opt_state = optimizer.update(grads, opt_state)
    params = optax.apply_updates(variables["params"], changes)
    return {"params": params, **updates}, opt_state

  for i in range(150):
    rows = np.random.default_rng(i).choice(len(x), 64, replace=False)
    variables, opt_state = step(variables, opt_state, x[rows], y[rows])
  return model, variables


def test_the_trained_linen_model_is_accurate(linen, digits):
  model, variables = linen
  _, _, xt, yt = digits
  logits_fn = jr.inference.logits_fn(model, variables)
  assert np.mean(np.argmax(logits_fn(xt), -1) == yt) > 0.85


def test_evaluate_with_model_apply_of_a_train_model_says_what_to_do(linen, digits):
  model, variables = linen
  _, _, xt, yt = digits
  attack = {"pgd": jr.attacks.pgd(eps=0.1, steps=2)}
  with pytest.raises(jr.InputError, match="inference.split"):
    jr.evaluation.evaluate(model.apply, variables, xt, yt, attack, key=jax.random.key(0))
  # With train=True as its default, the model would mutate batch_stats.
  mutating = lambda v, x: model.apply(v, x, train=True)
  with pytest.raises(jr.InputError, match="inference.split"):
    jr.evaluation.evaluate(mutating, variables, xt, yt, attack, key=jax.random.key(0))


def test_split_linen_model_evaluates_as_its_logits_fn(linen, digits):
  model, variables = linen
  _, _, xt, yt = digits
  apply_fn, variables = jr.inference.split(model, variables)
  attack = jr.attacks.pgd(eps=0.1, steps=5)
  key = jax.random.key(3)
  rep = jr.evaluation.evaluate(apply_fn, variables, xt, yt, {"pgd": attack}, key=key)
  one_liner = jr.evaluation.robust_accuracy(
    jr.inference.logits_fn(model, variables), xt, yt, attack, key=key
  )
  # By hand: every example attacked with evaluate's key, fold_in(key, 0) (attack 0).
  logits_fn = lambda x: model.apply(variables, x, train=False)
  x_adv = attack(logits_fn, xt, yt, jax.random.fold_in(key, 0))
  by_hand = np.mean((np.argmax(logits_fn(xt), -1) == yt) & (np.argmax(logits_fn(x_adv), -1) == yt))
  assert rep["results"][0]["accuracy"] == one_liner == pytest.approx(by_hand)
  assert 0 < by_hand < rep["clean_accuracy"]
  # Equal modules give equal apply functions: one compiled program for both.
  assert jr.inference.split(LinenCNN(), variables)[0] == apply_fn


@pytest.mark.parametrize("output", ["tuple", "dict"])
def test_a_model_returning_a_tuple_or_dict_is_refused_clearly(linen, digits, output):
  model, variables = linen
  _, _, xt, yt = digits
  wrap = (lambda z: (z, z)) if output == "tuple" else (lambda z: {"logits": z})
  apply_fn = lambda v, x: wrap(model.apply(v, x, train=False))
  with pytest.raises(jr.InputError, match="one array of logits"):
    jr.evaluation.evaluate(
      apply_fn, variables, xt, yt, {"p": jr.attacks.fgsm(eps=0.1)}, key=jax.random.key(0)
    )
  with pytest.raises(jr.InputError, match="one array of logits"):
    jr.attacks.pgd(eps=0.1)(lambda x: apply_fn(variables, x), xt, yt, jax.random.key(0))


def test_nnx_module_jit_pattern_compiles_once_and_never_goes_stale(digits):
  x, y, xt, yt = digits
  model = NNXNet(nnx.Rngs(0))
  apply_fn, _ = jr.inference.split(model)
  attack = jr.attacks.pgd(eps=0.1, steps=3)
  traces = []

  @jax.jit
  def attack_batch(state, x, y, key):
    traces.append(1)
    return attack(lambda xb: apply_fn(state, xb), x, y, key)

  key = jax.random.key(0)
  before = attack_batch(nnx.state(model), xt, yt, key)
  # Update the module's weights in place, as an NNX training loop does.
  model.hidden.kernel[...] = model.hidden.kernel[...] * -2.0
  after = attack_batch(nnx.state(model), xt, yt, key)
  fresh = jr.attacks.pgd(eps=0.1, steps=3)(jr.inference.logits_fn(model), xt, yt, key)
  assert len(traces) == 1
  np.testing.assert_allclose(after, fresh, atol=1e-6)
  assert not np.allclose(after, before)
  # The module itself was left in training mode (the copy ran in eval mode).
  assert model.norm.use_running_average is False


def test_attack_inside_a_jitted_training_step_under_scan(linen, digits):
  model, variables = linen
  x, y, _, _ = digits
  apply_fn, variables = jr.inference.split(model, variables)
  attack = jr.attacks.pgd(eps=0.1, steps=2)

  def body(carry, batch):
    xb, yb, key = batch
    x_adv = attack(lambda z: apply_fn(variables, z), xb, yb, key)
    return carry + jnp.sum(jnp.argmax(apply_fn(variables, x_adv), -1) == yb), x_adv

  xs, ys = x[:64].reshape(4, 16, 8, 8, 1), y[:64].reshape(4, 16)
  keys = jax.random.split(jax.random.key(1), 4)
  robust, x_adv = jax.jit(lambda xs, ys, ks: jax.lax.scan(body, 0, (xs, ys, ks)))(xs, ys, keys)
  # The same as calling the attack batch by batch outside any transform.
  for i in range(4):
    np.testing.assert_allclose(
      x_adv[i], attack(lambda z: apply_fn(variables, z), xs[i], ys[i], keys[i]), atol=1e-6
    )
  assert np.all(np.abs(np.asarray(x_adv) - np.asarray(xs)) <= 0.1 + 1e-6)


def test_attack_under_vmap_over_radii(linen, digits):
  model, variables = linen
  _, _, xt, yt = digits
  logits_fn = jr.inference.logits_fn(model, variables)
  attack = jr.attacks.pgd(eps=0.1, steps=3)
  radii = jnp.asarray([0.05, 0.1, 0.2])
  many = jax.jit(jax.vmap(lambda e: attack(logits_fn, xt[:8], yt[:8], jax.random.key(0), eps=e)))
  out = many(radii)
  for r, e in enumerate(radii):
    np.testing.assert_allclose(
      out[r], attack(logits_fn, xt[:8], yt[:8], jax.random.key(0), eps=e), atol=1e-6
    )
    assert float(jnp.max(jnp.abs(out[r] - xt[:8]))) <= float(e) + 1e-6


@pytest.mark.parametrize("dtype", [jnp.float16, pytest.param(jnp.bfloat16, marks=pytest.mark.slow)])
def test_evaluate_on_low_precision_images_counts_what_the_attack_finds(linen, digits, dtype):
  model, variables = linen
  _, _, xt, yt = digits
  apply_fn, variables = jr.inference.split(model, variables)
  x_low = jnp.asarray(xt, dtype)
  key = jax.random.key(0)
  attacks = {
    "apgd": jr.attacks.apgd(norm="linf", eps=0.3, steps=20),
    "pgd": jr.attacks.pgd(norm="l2", eps=2.0, steps=10),
    "fgsm": jr.attacks.fgsm(eps=0.3),
  }
  rep = jr.evaluation.evaluate(apply_fn, variables, x_low, yt, attacks, key=key, individual=True)
  logits_fn = lambda z: apply_fn(variables, z)
  clean = np.argmax(logits_fn(x_low), -1) == yt
  for index, (label, attack) in enumerate(attacks.items()):
    row = next(r for r in rep["results"] if r["attack"] == label)
    x_adv = attack(logits_fn, x_low, yt, jax.random.fold_in(key, index))
    assert x_adv.dtype == dtype
    d = np.asarray(x_adv, np.float32) - np.asarray(x_low, np.float32)
    size = np.abs(d).max((1, 2, 3)) if attack.norm == "linf" else np.sqrt((d**2).sum((1, 2, 3)))
    assert np.all(size <= attack.eps + 1e-6)  # rounded towards x: in the ball exactly
    direct = np.mean(clean & (np.argmax(logits_fn(x_adv), -1) == yt))
    assert row["outside_ball"] == 0
    assert row["accuracy"] == pytest.approx(direct, abs=1.5 / len(yt))
  assert next(r for r in rep["results"] if r["attack"] == "apgd")["accuracy"] < 0.2


def test_a_traced_float32_eps_with_bfloat16_images(linen, digits):
  model, variables = linen
  _, _, xt, yt = digits
  logits_fn = jr.inference.logits_fn(model, variables)
  x = jnp.asarray(xt[:8], jnp.bfloat16)
  for attack in (jr.attacks.pgd(eps=0.1, steps=2), jr.attacks.fgsm(eps=0.1)):
    out = jax.jit(lambda x, e, a=attack: a(logits_fn, x, yt[:8], jax.random.key(0), eps=e))(
      x, jnp.float32(0.1)
    )
    assert out.dtype == jnp.bfloat16


BAD_UNDER_JIT = {
  "images in [0, 255]": (lambda x, y: (x * 255, y), r"images must lie in \[0, 1\].*divide"),
  "NaN image": (lambda x, y: (x.at[0, 0, 0, 0].set(jnp.nan), y), "images contain NaN"),
  "label out of range": (
    lambda x, y: (x, y.at[3].set(12)),
    r"labels must lie in \[0, 10\), got \[12\]",
  ),
}


@pytest.mark.parametrize("case", list(BAD_UNDER_JIT))
def test_bad_values_raise_under_jit_as_they_do_eagerly(linen, digits, case):
  model, variables = linen
  _, _, xt, yt = digits
  apply_fn, variables = jr.inference.split(model, variables)
  attack = jr.attacks.pgd(eps=0.1, steps=2)
  spoil, message = BAD_UNDER_JIT[case]
  x, y = spoil(jnp.asarray(xt[:8]), jnp.asarray(yt[:8]))
  with pytest.raises(jr.InputError, match=message):
    attack(lambda z: apply_fn(variables, z), x, y, jax.random.key(0))
  jitted = jax.jit(lambda v, x, y: attack(lambda z: apply_fn(v, z), x, y, jax.random.key(0)))
  with pytest.raises(Exception, match=message):
    jax.block_until_ready(jitted(variables, x, y))
  # Good input under the same compiled program runs.
  jax.block_until_ready(jitted(variables, jnp.asarray(xt[:8]), jnp.asarray(yt[:8])))


def test_a_traced_per_example_eps_is_checked(linen, digits):
  model, variables = linen
  _, _, xt, yt = digits
  logits_fn = jr.inference.logits_fn(model, variables)
  attack = jr.attacks.pgd(eps=0.1, steps=2)
  run = jax.jit(lambda e: attack(logits_fn, xt[:4], yt[:4], jax.random.key(0), eps=e))
  with pytest.raises(Exception, match=r"eps must be finite and > 0, got \[-0.5\]"):
    jax.block_until_ready(run(jnp.asarray([0.1, -0.5, 0.1, 0.1])))
  with pytest.raises(jr.InputError, match=r"one per example, shape \(4,\); got shape \(3,\)"):
    run(jnp.asarray([0.1, 0.1, 0.1]))


def test_gradient_through_an_attack_is_danskins(linen, digits):
  """x_adv = x + stop_gradient(d*): d x_adv / d x = I, and the parameters'
  gradient of the adversarial loss is the loss's gradient at x_adv held fixed."""
  model, variables = linen
  _, _, xt, yt = digits
  x, y = jnp.asarray(xt[:8]), jnp.asarray(yt[:8])
  attack = jr.attacks.pgd(norm="l2", eps=1.0, steps=3)
  key = jax.random.key(0)
  grad_x = jax.grad(lambda x: attack(jr.inference.logits_fn(model, variables), x, y, key).sum())(x)
  np.testing.assert_array_equal(grad_x, np.ones_like(x))

  def adversarial_loss(params, fixed=None):
    v = {**variables, "params": params}
    logits_fn = lambda z: model.apply(v, z, train=False)
    x_adv = attack(logits_fn, x, y, key) if fixed is None else fixed
    return optax.softmax_cross_entropy_with_integer_labels(logits_fn(x_adv), y).mean()

  x_adv = attack(jr.inference.logits_fn(model, variables), x, y, key)
  through = jax.grad(adversarial_loss)(variables["params"])
  held = jax.grad(adversarial_loss)(variables["params"], x_adv)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), through, held)


@pytest.mark.parametrize(
  "alias, name", [("Linf", "linf"), ("inf", "linf"), (np.inf, "linf"), ("L2", "l2"), (2, "l2")]
)
def test_norm_aliases(alias, name):
  assert jr.attacks.pgd(norm=alias, eps=0.1) == jr.attacks.pgd(norm=name, eps=0.1)
  assert jr.attacks.apgd(norm=alias, eps=0.1).norm == name
  with pytest.raises(jr.InputError, match="unknown norm 'l3'"):
    jr.attacks.pgd(norm="l3", eps=0.1)


def test_certify_under_jit_is_refused_clearly(linen, digits):
  model, variables = linen
  _, _, xt, _ = digits
  logits_fn = jr.inference.logits_fn(model, variables)
  certify = lambda x: jr.smoothing.certify(logits_fn, x, jax.random.key(0), sigma=0.25, n=10)
  with pytest.raises(jr.InputError, match="outside jax.jit"):
    jax.jit(certify)(xt[:2])


def test_sanity_is_reachable_from_the_package():
  assert jr.sanity.attack_checks is not None


def test_library_example_runs_as_written(linen):
  """docs/library.md's first library example, with a trained Linen model."""
  import re

  from conftest import ROOT

  section = (ROOT / "docs" / "library.md").read_text().split("## Using the library", 1)[1]
  first, with_nnx, targeted = re.findall(r"```python\n(.*?)```", section, re.S)[:3]
  assert "jr.inference.split(model, variables)" in first and "@jax.jit" in first
  model, variables = linen
  namespace = {"model": model, "variables": variables}
  exec(first, namespace)  # noqa: S102
  x, y, x_adv = namespace["x"], namespace["y"], namespace["x_adv"]
  assert np.abs(np.asarray(x_adv) - x).max() <= 0.1 + 1e-6
  assert 0 <= namespace["accuracy"] < np.mean(np.argmax(namespace["logits_fn"](x), -1) == y)
  # The NNX example, with an NNX module trained not at all: x_adv in the ball.
  namespace.update(nnx=nnx, nnx_model=NNXNet(nnx.Rngs(0)))
  exec(with_nnx, namespace)  # noqa: S102
  assert np.abs(np.asarray(namespace["x_adv"]) - x).max() <= 0.1 + 1e-6
  # The targeted example, after it: the targets are other classes, mostly reached.
  assert "targets.random_other" in targeted
  exec(targeted, namespace)  # noqa: S102
  assert np.all(np.asarray(namespace["t"]) != y) and namespace["reached"] > 0.5


def test_library_programs_carry_no_check_and_user_programs_do():
  """`checks.trusted()` at trace time leaves the host callback out."""
  logits_fn = lambda x: x.reshape(len(x), -1)[:, :3]
  attack = jr.attacks.fgsm(eps=0.1)
  x, y = jnp.full((2, 2, 2, 1), 0.5), jnp.zeros(2, jnp.int32)

  def trusted(x, y):
    with jr.checks.trusted():
      return attack(logits_fn, x, y, jax.random.key(0))

  checked = jax.jit(lambda x, y: attack(logits_fn, x, y, jax.random.key(0))).lower(x, y).as_text()
  unchecked = jax.jit(trusted).lower(x, y).as_text()
  assert "callback" in checked and "callback" not in unchecked


@pytest.mark.parametrize("name", ["pgd", "fgsm", "apgd", "apgd_t", "fab_t", "square", "mi_fgsm"])
def test_an_array_eps_at_construction_names_the_call_time_form(name):
  with pytest.raises(jr.InputError, match=r"shape \(3,\).*at call time.*eps=eps_per_example"):
    jr.attacks.create(name, eps=jnp.asarray([0.1, 0.2, 0.3]))


def test_certify_with_variables_compiles_once_across_weights(linen, digits):
  model, variables = linen
  _, _, xt, _ = digits
  apply_fn, variables = jr.inference.split(model, variables)
  traces = []

  def counted(v, x):
    traces.append(1)
    return apply_fn(v, x)

  key = jax.random.key(0)
  run = lambda v: jr.smoothing.certify(
    counted, xt[:4], key, sigma=0.25, n0=8, n=32, batch_size=64, variables=v
  )
  pred, radius = run(variables)
  compiled = jr.smoothing._add_chunk_counts._cache_size()
  first = len(traces)
  run(jax.tree.map(lambda a: a * 1.5, variables))
  # New weights: no new program; the model traced only for the two shape checks.
  assert jr.smoothing._add_chunk_counts._cache_size() == compiled
  assert len(traces) - first == 2
  closed = jr.smoothing.certify(
    jr.inference.logits_fn(model, variables), xt[:4], key, sigma=0.25, n0=8, n=32, batch_size=64
  )
  np.testing.assert_array_equal(pred, closed[0])
  np.testing.assert_allclose(radius, closed[1], rtol=1e-6)
