"""Mixed precision (`jaxrobust.models.precision`, config `precision`, eval.py --precision).

The model computes in bfloat16; what is stored (parameters, optimizer
state, batch statistics), the loss, the logits and an attack's iterates stay
float32. Each claim is checked on the computation itself (its jaxpr) or on
values computed the plain float32 way.
"""

import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxrobust import checks, models, parallel
from jaxrobust.models import precision
from jaxrobust.training import step as training

MEAN, STD = (0.5,) * 3, (0.25,) * 3
PGD: dict[str, Any] = dict(name="pgd", norm="linf", eps=0.1, step_size=0.05, steps=2)


def _wrn():
  """A small wide ResNet: convolutions, BatchNorm and a dense head."""
  return models.create("wide_resnet", num_classes=3, mean=MEAN, std=STD, depth=10, width=1)


class _ConvBatchNorm(nn.Module):
  """A convolution, BatchNorm and a dense head: every kind of state, quick to compile."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.BatchNorm(use_running_average=not train)(nn.Conv(4, (3, 3))(x))
    return nn.Dense(3)(nn.relu(x).mean(axis=(1, 2)))


def _subjaxprs(value):
  if isinstance(value, jax.extend.core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jax.extend.core.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _subjaxprs(v)


def _equations(jaxpr, inside_loop=False):
  """(equation, whether it lies inside a loop) of `jaxpr` and its sub-jaxprs."""
  for eqn in jaxpr.eqns:
    yield eqn, inside_loop
    for value in eqn.params.values():
      for sub in _subjaxprs(value):
        yield from _equations(sub, inside_loop or eqn.primitive.name in ("while", "scan"))


def _operand_dtypes(eqn):
  return [jnp.dtype(v.aval.dtype) for v in eqn.invars]


def test_with_precision_keeps_the_class_the_fields_and_the_variables() -> None:
  model = _wrn()
  mixed = precision.with_precision(model, precision="bfloat16")
  assert isinstance(mixed, type(model)) and mixed.depth == 1 * 10 and mixed.width == 1
  assert precision.precision_of(mixed) == "bfloat16" and precision.precision_of(model) == "float32"
  assert mixed == precision.with_precision(model, precision="bfloat16")
  assert hash(mixed) == hash(precision.with_precision(model, precision="bfloat16"))
  assert precision.float32_model(mixed) == model
  assert precision.with_precision(mixed, precision="float32") == model
  x = jnp.zeros((2, 8, 8, 3))
  shapes = lambda m: jax.eval_shape(lambda: m.init(jax.random.key(0), x, train=False))
  assert shapes(mixed) == shapes(model)  # same tree, float32 leaves
  noisy = models.create("small_cnn", num_classes=3, mean=MEAN, std=STD, width=2, noise={"sigma": 1})
  assert models.is_randomized(precision.with_precision(noisy, precision="bfloat16"))


def test_bfloat16_logits_are_float32s_within_bfloat16_rounding() -> None:
  model, x = _ConvBatchNorm(), jax.random.uniform(jax.random.key(1), (8, 16, 16, 3))
  variables = model.init(jax.random.key(0), x, train=False)
  mixed = precision.with_precision(model, precision="bfloat16")
  exact = models.inference_fn(model)(variables, x)
  logits = models.inference_fn(mixed)(variables, x)
  assert logits.dtype == jnp.float32
  # bfloat16 keeps 8 significant bits (relative rounding 2^-9 per operation).
  assert jnp.allclose(logits, exact, atol=0.05 * float(jnp.abs(exact).max()))
  assert not jnp.array_equal(logits, exact)  # rounded: it did compute in bfloat16


@pytest.mark.parametrize(
  "name",
  # The ResNet-50-sized ones compile for seconds: with the slow tests.
  [
    pytest.param(
      n, marks=[pytest.mark.slow] * (n in ("ra_wide_resnet", "preact_resnet50_ensemble"))
    )
    for n in sorted(models.MODELS)
  ],
)
def test_every_convolution_and_matrix_product_of_a_model_takes_bfloat16(name: Any) -> None:
  settings: dict[str, Any] = {"width": 2} if name == "small_cnn" else {}
  model = models.create(name, num_classes=3, mean=MEAN, std=STD, **settings)
  mixed = precision.with_precision(model, precision="bfloat16")
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape), train=False))
  jaxpr = jax.make_jaxpr(models.inference_fn(mixed))(variables, x).jaxpr
  products = [
    eqn
    for eqn, _ in _equations(jaxpr)
    if eqn.primitive.name in ("conv_general_dilated", "dot_general")
  ]
  assert products
  for eqn in products:
    assert _operand_dtypes(eqn) == [jnp.dtype(jnp.bfloat16)] * 2, eqn


def test_a_bfloat16_train_step_computes_in_bfloat16_and_stores_float32() -> None:
  model, mesh = _ConvBatchNorm(), parallel.mesh()
  mixed = precision.with_precision(model, precision="bfloat16")
  x = jax.random.uniform(jax.random.key(1), (4, 16, 16, 3))
  y = jnp.arange(4) % 3
  tx = training.make_optimizer(dict(name="sgd", learning_rate=0.1, momentum=0.9), 10)
  objective = training.make_input_fn("pgd_at", PGD)
  start = jax.device_get(training.init_state(model, tx, x.shape[1:], jax.random.key(0)))
  dtypes = lambda tree: jax.tree.map(lambda a: jnp.dtype(a.dtype), tree)

  def one_step(m):
    state = jax.device_put(start, parallel.replicated(mesh))
    step = training.make_train_step(m, tx, objective, mesh)
    batch = jax.device_put((x, y), parallel.batch_sharding(mesh))
    key = jax.random.key(2)
    jaxpr = jax.make_jaxpr(step)(state, *batch, key).jaxpr
    return step(state, *batch, key), jaxpr

  (state, metrics), jaxpr = one_step(mixed)
  (exact, _), _ = one_step(model)
  # What is stored keeps its float32 (parameters, momentum, batch statistics).
  assert dtypes(state) == dtypes(start)
  assert {a.dtype for a in jax.tree.leaves(state.variables)} == {jnp.dtype(jnp.float32)}
  assert metrics["loss"].dtype == jnp.float32
  # The model's convolutions, in the attack's loop and in the loss's
  # forward and backward passes, take bfloat16 operands.
  convolutions = [
    (eqn, looped)
    for eqn, looped in _equations(jaxpr)
    if eqn.primitive.name == "conv_general_dilated"
  ]
  assert any(looped for _, looped in convolutions) and any(not looped for _, looped in convolutions)
  for eqn, _ in convolutions:
    assert _operand_dtypes(eqn) == [jnp.dtype(jnp.bfloat16)] * 2, eqn
  # The attack's loop carries its iterate (an image batch) in float32.
  loops = [eqn for eqn, _ in _equations(jaxpr) if eqn.primitive.name in ("while", "scan")]
  carried = [v.aval for eqn in loops for v in eqn.outvars if v.aval.shape[1:] == x.shape[1:]]
  assert carried and {jnp.dtype(a.dtype) for a in carried} == {jnp.dtype(jnp.float32)}
  # The step moved the parameters as float32's does, within bfloat16 rounding.
  for a, b, s in zip(*(jax.tree.leaves(t.params) for t in (state, exact, start))):
    moved = float(jnp.linalg.norm(b - s))
    if moved > 1e-6:
      assert float(jnp.linalg.norm(a - b)) < 0.2 * moved
  assert not all(
    jnp.array_equal(a, b) for a, b in zip(*(jax.tree.leaves(t) for t in (state, exact)))
  )


def test_an_attack_on_the_bfloat16_model_keeps_its_iterates_float32() -> None:
  from jaxrobust import attacks

  model, x = _ConvBatchNorm(), jax.random.uniform(jax.random.key(1), (4, 16, 16, 3))
  variables = model.init(jax.random.key(0), x, train=False)
  mixed = precision.with_precision(model, precision="bfloat16")
  logits_fn = lambda xb: models.inference_fn(mixed)(variables, xb)
  attack = attacks.create(**PGD)
  keys = jax.random.split(jax.random.key(3), 4)
  x_adv = attack(logits_fn, x, jnp.arange(4) % 3, keys)
  assert x_adv.dtype == jnp.float32
  assert float(jnp.abs(x_adv - x).max()) <= PGD["eps"] + 1e-6
  assert float(jnp.abs(x_adv - x).max()) > 0  # the bfloat16 gradient moved it


def test_the_config_refuses_an_unknown_precision(tiny_config: Any) -> None:
  from jaxrobust.training import config as config_lib

  with pytest.raises(checks.InputError, match="unknown precision 'float16'"):
    config_lib.check_config(tiny_config(precision="float16"), parallel.mesh())
  with pytest.raises(checks.InputError, match="unknown precision 'float16'"):
    precision.with_precision(_wrn(), precision="float16")


def _computed_accuracy(model, state, resolved, n, dtype):
  """The clean accuracy of `model` in `dtype` on the first `n` test examples, computed here."""
  from jaxrobust import data
  from jaxrobust.training import config as config_lib

  test_set = config_lib.load_split(resolved, "test")
  x, y = data.host_float(test_set.x[:n]), np.asarray(test_set.y[:n])
  mixed = precision.with_precision(model, precision=dtype)
  logits = models.inference_fn(mixed)(state.variables, x)
  return float(np.mean(np.argmax(logits, -1) == y))


def _eval(cli, workdir, out, n, *flags):
  args = ["--workdir", workdir, "--attacks", "pgd_linf", "--limit", n, "--out", out, *flags]
  result = cli("eval.py", *args, "--nosanity", "--config.eval.attacks.pgd_linf.steps=2")
  assert result.returncode == 0, result.stderr
  return result, json.loads(out.read_text())


@pytest.mark.slow  # trains, then eval.py in a process of its own
def test_eval_precision_flag_runs_the_model_in_bfloat16(
  cli: Any, trained: Any, tmp_path: Any
) -> None:
  from jaxrobust.training import loop as experiment

  resolved, model, state = experiment.restore(trained)
  assert resolved.get("precision", "float32") == "float32"
  result, report = _eval(cli, trained, tmp_path / "r.json", 16, "--precision", "bfloat16")
  assert "computes in bfloat16" in result.stdout and report["precision"] == "bfloat16"
  expected = _computed_accuracy(model, state, resolved, 16, "bfloat16")
  assert report["clean_accuracy"] == pytest.approx(expected)


def test_build_model_computes_in_the_runs_precision(tiny_config: Any) -> None:
  from jaxrobust.training import config as config_lib

  resolved = {
    **tiny_config(precision="bfloat16").to_dict(),
    "dataset": {"num_classes": 3, "mean": MEAN, "std": STD},
  }
  assert precision.precision_of(config_lib.build_model(resolved)) == "bfloat16"
  del resolved["precision"]  # a run trained before the setting existed
  assert precision.precision_of(config_lib.build_model(resolved)) == "float32"


@pytest.mark.slow
def test_train_and_eval_in_bfloat16(cli: Any, tiny_config: Any, tmp_path: Any) -> None:
  """train.py records the precision, eval.py evaluates in it by default and
  in --precision's when given: each report's clean accuracy is the model's
  computed here in that precision."""
  from jaxrobust.training import loop as experiment

  workdir, n = tmp_path / "run", 16
  experiment.train(tiny_config(precision="bfloat16"), workdir, max_steps=3, progress=False)
  resolved, model, state = experiment.restore(workdir)
  assert resolved["precision"] == "bfloat16" and precision.precision_of(model) == "bfloat16"
  assert {a.dtype for a in jax.tree.leaves(state.variables)} == {jnp.dtype(jnp.float32)}
  for flags, dtype in (([], "bfloat16"), (["--precision", "float32"], "float32")):
    result, report = _eval(cli, workdir, tmp_path / f"{dtype}.json", n, *flags)
    assert ("computes in bfloat16" in result.stdout) == (dtype == "bfloat16")
    assert report["precision"] == dtype
    expected = _computed_accuracy(model, state, resolved, n, dtype)
    assert report["clean_accuracy"] == pytest.approx(expected)
