"""Training recipes: TRADES and MART losses by hand, their inner attacks, Fast-AT."""

import argparse
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from jaxrobust import attacks, checks, data, parallel
from jaxrobust.training import loop as experiment
from jaxrobust.training import objectives
from jaxrobust.training import step as training
from jaxrobust import keys as keys_lib


def softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def trades_by_hand(clean, adv, y, beta):
  p, q = softmax(clean), softmax(adv)
  ce = -np.log(p[np.arange(len(y)), y])
  kl = np.sum(p * (np.log(p) - np.log(q)), -1)
  return ce + beta * kl


def mart_by_hand(clean, adv, y, lam):
  p, q = softmax(clean), softmax(adv)
  rows = np.arange(len(y))
  wrong = np.array([max(q[i, k] for k in range(q.shape[1]) if k != y[i]) for i in rows])
  bce = -np.log(q[rows, y]) - np.log(1 - wrong)
  kl = np.sum(p * (np.log(p) - np.log(q)), -1)
  return bce + lam * kl * (1 - p[rows, y])


def logits(seed, shape=(6, 4)):
  return np.random.default_rng(seed).normal(0, 2, shape).astype(np.float64)


@pytest.mark.parametrize("weight", [0.0, 6.0])
def test_trades_and_mart_losses_equal_their_formulas(weight):
  clean, adv, y = logits(0), logits(1), np.array([0, 1, 2, 3, 0, 1])
  np.testing.assert_allclose(
    objectives.trades_loss(jnp.asarray(clean), jnp.asarray(adv), jnp.asarray(y), beta=weight),
    trades_by_hand(clean, adv, y, weight),
    rtol=1e-5,
  )
  np.testing.assert_allclose(
    objectives.mart_loss(jnp.asarray(clean), jnp.asarray(adv), jnp.asarray(y), lam=weight),
    mart_by_hand(clean, adv, y, weight),
    rtol=1e-3,
  )  # the code's 1e-4 guard in log(1 - p)


class Mlp(nn.Module):
  """A 64-16-10 tanh network: a Flax model that compiles in a blink."""

  @nn.compact
  def __call__(self, x, train=False):
    del train
    return nn.Dense(10)(jnp.tanh(nn.Dense(16)(x.reshape(x.shape[0], -1))))


def tiny_model():
  x, y = data.load("digits", "train")
  return Mlp(), jnp.asarray(x[:8]), jnp.asarray(y[:8])


@pytest.mark.parametrize(
  "name, settings, by_hand",
  [
    ("trades", dict(beta=6.0), lambda c, a, y: trades_by_hand(c, a, y, 6.0)),
    ("mart", dict(lam=5.0), lambda c, a, y: mart_by_hand(c, a, y, 5.0)),
  ],
)
def test_training_step_minimises_the_objectives_loss(name, settings, by_hand):
  model, x, y = tiny_model()
  spec = dict(name="pgd", norm="linf", eps=0.2, step_size=0.05, steps=2, random_start=0.001)
  objective = training.make_input_fn(name, spec, settings=settings)
  tx = optax.sgd(0.1)
  mesh = parallel.mesh(jax.devices()[:1])
  state = training.init_state(model, tx, x.shape[1:], jax.random.key(0))
  # The step's attack keys (training module docstring): step 0, key 1.
  attack_key = jax.random.split(jax.random.fold_in(jax.random.key(1), 0), 3)[0]
  logits_fn = lambda xb: model.apply(state.variables, xb, train=False)
  x_adv = jax.jit(lambda x, y, k: objective(logits_fn, x, y, k))(
    x, y, keys_lib.example_keys(attack_key, 8)
  )
  assert float(jnp.abs(x_adv - x).max()) <= 0.2 + 1e-6
  expected = by_hand(
    np.asarray(logits_fn(x), np.float64), np.asarray(logits_fn(x_adv), np.float64), np.asarray(y)
  ).mean()
  step = training.make_train_step(model, tx, objective, mesh)
  _, metrics = step(jax.device_put(state, parallel.replicated(mesh)), x, y, jax.random.key(1))
  np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-4)


def test_trades_attack_maximises_the_kl_from_the_clean_prediction():
  model, x, y = tiny_model()
  variables = model.init(jax.random.key(0), x[:1])
  logits_fn = lambda xb: model.apply(variables, xb)
  objective = training.make_input_fn(
    "trades", dict(name="pgd", norm="linf", eps=0.2, step_size=0.05, steps=5, random_start=0.001)
  )
  keys = keys_lib.example_keys(jax.random.key(2), 8)
  x_adv = jax.jit(lambda x, y, k: objective(logits_fn, x, y, k))(x, y, keys)
  p = jax.nn.softmax(logits_fn(x))
  kl = lambda xa: jax.vmap(attacks.losses.kl_divergence)(logits_fn(xa), p)
  # Larger than at the 0.001 start and than any corner of the ball drawn at random.
  assert (np.asarray(kl(x_adv)) > 10 * np.asarray(kl(x + 0.001))).all()
  corners = jnp.clip(x + 0.2 * jnp.sign(jax.random.normal(jax.random.key(3), x.shape)), 0, 1)
  assert (np.asarray(kl(x_adv)) > np.asarray(kl(corners))).all()


@pytest.mark.parametrize(
  "name, spec, settings, match",
  [
    ("trades", dict(name="pgd", eps=0.1), dict(beta=-1.0), "objective_settings.beta.*-1.0"),
    ("mart", dict(name="pgd", eps=0.1), dict(lam=-0.5), "objective_settings.lam.*-0.5"),
    ("trades", dict(name="pgd", eps=0.1), dict(lam=1.0), "no setting 'lam'"),
    ("pgd_at", dict(name="pgd", eps=0.1), dict(beta=1.0), "'pgd_at' takes no objective_settings"),
    ("trades", dict(name="fgsm", eps=0.1), None, "'trades' takes a 'pgd' attack"),
    ("trades", dict(name="pgd", eps=0.1, loss="cw"), None, "without a loss"),
    ("fast_at", dict(name="pgd", eps=0.1), None, "'fast_at' takes an 'fgsm' attack"),
    ("pgd_at", dict(name="pgd", eps=0.1, random_start=-0.1), None, "random_start.*-0.1"),
  ],
)
def test_bad_recipe_settings(name, spec, settings, match):
  with pytest.raises(checks.InputError, match=match):
    training.make_input_fn(name, spec, settings=settings)


def test_ema_follows_its_recursion_exactly():
  model, x, y = tiny_model()
  decay = 0.75
  tx = optax.sgd(0.5)
  mesh = parallel.mesh(jax.devices()[:1])
  state = training.init_state(model, tx, x.shape[1:], jax.random.key(0), ema=True)
  state = jax.device_put(state, parallel.replicated(mesh))
  step = training.make_train_step(model, tx, training.make_input_fn("natural"), mesh, ema=decay)
  recorded = [jax.tree.map(np.asarray, state.params)]
  for _ in range(4):
    state, _ = step(state, x, y, jax.random.key(1))
    recorded.append(jax.tree.map(np.asarray, state.params))
  # By hand: e_0 = p_0, e_t = d e_{t-1} + (1 - d) p_t; in closed form
  # e_n = d^n p_0 + sum_{t=1..n} (1 - d) d^(n-t) p_t.
  n = len(recorded) - 1
  expected = jax.tree.map(
    lambda *p: (
      decay**n * p[0] + sum((1 - decay) * decay ** (n - t) * p[t] for t in range(1, n + 1))
    ),
    *recorded,
  )
  for got, want, last in zip(
    jax.tree.leaves(state.ema_params), jax.tree.leaves(expected), jax.tree.leaves(recorded[-1])
  ):
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-7)
    assert not np.allclose(want, last)  # the average is not the last parameters
  assert training.for_evaluation(state).params is state.ema_params


@pytest.mark.parametrize("decay", [1.0, -0.1, 1.5])
def test_bad_ema_decay(tiny_config, tmp_path, decay, snapshot):
  before = snapshot(tmp_path)
  with pytest.raises(checks.InputError, match=f"ema must lie in \\[0.0, 1.0\\), got {decay}"):
    experiment.train(tiny_config(ema=decay), tmp_path / "run", progress=False)
  assert snapshot(tmp_path) == before


def guarded(tiny_config, jump):
  """Two epochs (46 steps each) of Adam on digits with the overfitting guard
  (PGD-5 at eps 0.02 on 64 training images); with `jump`, the learning rate
  jumps 300-fold after the first epoch, which wrecks the model."""
  optimizer = dict(
    name="adam",
    learning_rate=1e-2,
    schedule="piecewise" if jump else "constant",
    decay_at=[0.5],
    decay_factor=300.0,
  )
  return tiny_config(
    epochs=2,
    optimizer=optimizer,
    checkpoint_every_steps=10,
    overfit_guard=dict(examples=64, steps=5, max_drop=0.2, eps=0.02),
  )


def test_overfitting_guard_stops_a_collapsing_run_and_keeps_the_last_good_checkpoint(
  tiny_config, tmp_path, capsys
):
  state = experiment.train(guarded(tiny_config, jump=True), tmp_path, progress=False)
  record = json.loads((tmp_path / "overfit_guard.json").read_text())
  first = record["checks"][0]
  assert first["step"] == 46 and first["robust_accuracy"] > 0.4
  stopped = record["stopped"]
  assert stopped["step"] == 92 and stopped["last_good_step"] == 46
  assert stopped["robust_accuracy"] < first["robust_accuracy"] - 0.2
  assert "training stopped, keeping the last good checkpoint (step 46)" in capsys.readouterr().out
  assert int(state.step) == 46
  # The newest checkpoint is the last good one; the later ones were moved aside.
  names = {p.name for p in (tmp_path / "checkpoints").iterdir()}
  assert {"overfit-70", "overfit-80", "overfit-90"} <= names  # the 3 kept (keep_checkpoints)
  assert max(int(n) for n in names if n.isdigit()) == 46
  assert int(experiment.restore(tmp_path)[2].step) == 46
  # Rerunning the command does not train past the stop.
  again = experiment.train(guarded(tiny_config, jump=True), tmp_path, progress=False)
  assert int(again.step) == 46 and "stopped this run at step 92" in capsys.readouterr().out


def test_overfitting_guard_lets_a_healthy_run_finish(tiny_config, tmp_path):
  state = experiment.train(guarded(tiny_config, jump=False), tmp_path, progress=False)
  record = json.loads((tmp_path / "overfit_guard.json").read_text())
  assert int(state.step) == 92 and "stopped" not in record
  assert [c["step"] for c in record["checks"]] == [46, 92]
  logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
  assert [m["step"] for m in logged if "guard_robust_accuracy" in m] == [46, 92]


def test_awp_perturbation_has_the_relative_norm_gamma_per_layer():
  model, x, y = tiny_model()
  params = model.init(jax.random.key(0), x[:1])["params"]
  loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
    model.apply({"params": p}, x), y
  ).mean()
  v = training.awp_perturbation(params, jax.grad(loss)(params), gamma=5e-3)
  for layer in ("Dense_0", "Dense_1"):
    w, vw = params[layer]["kernel"], v[layer]["kernel"]
    assert float(jnp.linalg.norm(vw) / jnp.linalg.norm(w)) == pytest.approx(5e-3, rel=1e-5)
    np.testing.assert_array_equal(v[layer]["bias"], 0.0)
  # An ascent direction: the loss rises at w + v.
  assert float(loss(jax.tree.map(jnp.add, params, v))) > float(loss(params))


def test_awp_step_applies_the_gradient_at_w_plus_v_to_w():
  model, x, y = tiny_model()
  lr, gamma = 0.5, 0.05
  tx = optax.sgd(lr)
  mesh = parallel.mesh(jax.devices()[:1])
  state = training.init_state(model, tx, x.shape[1:], jax.random.key(0))
  w = jax.tree.map(np.asarray, state.params)
  loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
    model.apply({"params": p}, x), y
  ).mean()
  # By hand: v from the gradient at w, then w - lr * grad at (w + v).
  v = training.awp_perturbation(w, jax.grad(loss)(w), gamma=gamma)
  expected = jax.tree.map(lambda p, g: p - lr * g, w, jax.grad(loss)(jax.tree.map(jnp.add, w, v)))
  step = training.make_train_step(model, tx, training.make_input_fn("natural"), mesh, awp=gamma)
  new, _ = step(jax.device_put(state, parallel.replicated(mesh)), x, y, jax.random.key(1))
  plain = jax.tree.map(lambda p, g: p - lr * g, w, jax.grad(loss)(w))  # without AWP
  for got, want, without in zip(
    jax.tree.leaves(new.params), jax.tree.leaves(expected), jax.tree.leaves(plain)
  ):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-7)
    assert not np.allclose(np.asarray(want), np.asarray(without), atol=1e-7)  # AWP mattered


def test_awp_warmup_steps_are_plain_steps_then_awp_steps():
  model, x, y = tiny_model()
  tx = optax.sgd(0.5)
  mesh = parallel.mesh(jax.devices()[:1])
  natural = training.make_input_fn("natural")
  warm = training.make_train_step(model, tx, natural, mesh, awp=0.05, awp_from_step=1)
  plain = training.make_train_step(model, tx, natural, mesh)
  awp = training.make_train_step(model, tx, natural, mesh, awp=0.05)
  state = training.init_state(model, tx, x.shape[1:], jax.random.key(0))
  state = jax.device_put(state, parallel.replicated(mesh))
  key = jax.random.key(1)

  def run(step_fn, s):  # the steps donate their state: give them a copy
    return jax.tree.map(np.asarray, step_fn(jax.tree.map(jnp.copy, s), x, y, key)[0].params)

  def close(a, b):
    return all(
      np.allclose(p, q, rtol=1e-6, atol=1e-8) for p, q in zip(*map(jax.tree.leaves, (a, b)))
    )

  first = warm(jax.tree.map(jnp.copy, state), x, y, key)[0]  # state step 0 < 1: plain
  assert close(jax.tree.map(np.asarray, first.params), run(plain, state))
  assert not close(run(awp, state), run(plain, state))  # AWP would have changed it
  assert close(run(warm, first), run(awp, first))  # state step 1: AWP
  assert not close(run(warm, first), run(plain, first))


@pytest.mark.slow  # a minute's equivalence run: .ci/run runs it after the fast suite
def test_awp_warmup_counts_epochs(tiny_config, tmp_path):
  # One epoch with AWP after a warm-up of one epoch is one epoch of plain
  # training (with AWP from step 1 on, or from step 0, it differs:
  # test_awp_warmup_steps_are_plain_steps_then_awp_steps).
  def params(name, **settings):
    config = tiny_config(epochs=1, **settings)
    return jax.tree.leaves(experiment.train(config, tmp_path / name, progress=False).params)

  for p, w in zip(params("plain"), params("warm", awp=0.05, awp_warmup=1)):
    np.testing.assert_allclose(p, w, rtol=1e-6, atol=1e-8)


def test_evaluate_evaluates_the_ema_when_kept(validated):
  from jaxrobust.training import config as config_lib  # pylint: disable=g-import-not-at-top

  state = validated.final  # a run that keeps an EMA (decay 0.5)
  resolved = json.loads((validated.workdir / "config.json").read_text())
  model = config_lib.build_model(resolved)
  y = config_lib.load_split(resolved, "test").y[:64]

  def clean_accuracy(state):
    return experiment.evaluate(resolved, model, state, names="pgd_linf", limit=64)["clean_accuracy"]

  # An EMA of all zeros: constant logits 0, so every prediction is class 0.
  constant = state.replace(ema_params=jax.tree.map(jnp.zeros_like, state.ema_params))
  assert clean_accuracy(constant) == pytest.approx(np.mean(y == 0))
  assert clean_accuracy(constant.replace(ema_params=None)) != pytest.approx(np.mean(y == 0))


def with_validation(tiny_config, jump):
  """Two epochs of natural training with an EMA of the parameters (decay 0.5),
  PGD-10 (eps 0.02) validation of the EMA on 64 held-out training images after
  each; with `jump` the learning rate jumps 300-fold after the first epoch (so
  the first epoch's model is the best)."""
  optimizer = dict(
    name="adam",
    learning_rate=1e-2,
    schedule="piecewise" if jump else "constant",
    decay_at=[0.5],
    decay_factor=300.0,
  )
  return tiny_config(
    epochs=2,
    optimizer=optimizer,
    checkpoint_every_steps=10,
    ema=0.5,
    **{"eval.every_epochs": 1, "eval.validation_examples": 64, "eval.attacks.pgd_linf.eps": 0.02},
  )


@pytest.fixture(scope="module")
def validated(tiny_config, tmp_path_factory):
  """The run of `with_validation(jump=True)`, trained once: its workdir and
  final state. Tests only read it."""
  workdir = tmp_path_factory.mktemp("validated")
  final = experiment.train(with_validation(tiny_config, jump=True), workdir, progress=False)
  return types.SimpleNamespace(workdir=workdir, final=final)


def test_best_checkpoint_is_the_one_of_highest_validation_robust_accuracy_and_ema_kept(
  validated, cli, snapshot
):
  tmp_path, final = validated.workdir, validated.final
  before = snapshot(tmp_path)
  resolved = json.loads((tmp_path / "config.json").read_text())
  assert resolved["dataset"]["train_examples"] == 1497 - 64  # the slice is held out
  record = json.loads((tmp_path / "best.json").read_text())
  accuracies = {c["step"]: c["val_robust_accuracy"] for c in record["checks"]}
  assert sorted(accuracies) == [44, 88]
  best_step = max(accuracies, key=accuracies.get)
  assert record["best"]["step"] == best_step == 44 and accuracies[44] > accuracies[88] + 0.2
  logged = {
    m["step"]: m["val_robust_accuracy"]
    for m in map(json.loads, (tmp_path / "metrics.jsonl").open())
    if "val_robust_accuracy" in m
  }
  assert logged == accuracies
  assert [p.name for p in (tmp_path / "checkpoints/best").iterdir()] == ["44"]
  _, _, best = experiment.restore(tmp_path, checkpoint="best")
  _, _, latest = experiment.restore(tmp_path)
  assert int(best.step) == 44 and int(latest.step) == int(final.step) == 88
  # The EMA is checkpointed, and restored as the model to evaluate.
  for got, want in zip(jax.tree.leaves(latest.params), jax.tree.leaves(final.ema_params)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert not np.array_equal(jax.tree.leaves(final.ema_params)[0], jax.tree.leaves(final.params)[0])
  # eval.py takes the best by default and says so; --checkpoint latest the newest.
  for args, step in (((), 44), (("--checkpoint", "latest"), 88)):
    result = cli(
      "eval.py", "--workdir", tmp_path, "--attacks", "pgd_linf", "--limit", 8, "--nosanity", *args
    )
    assert result.returncode == 0, result.stderr
    which = "best" if not args else "latest"
    assert f"Checkpoint: {which} (step {step})" in result.stdout
    assert "exponential moving average of the parameters (decay 0.5)" in result.stdout
  assert snapshot(tmp_path) == before  # evaluation only reads the workdir


def test_eval_of_best_without_one_is_refused(trained, cli, snapshot):
  # `trained` keeps no best checkpoint (eval.every_epochs = 0).
  before = snapshot(trained)
  result = cli("eval.py", "--workdir", trained, "--checkpoint", "best")
  assert result.returncode == 2
  assert "no best checkpoint in" in result.stderr and len(result.stderr.splitlines()) == 1
  assert snapshot(trained) == before


@pytest.mark.parametrize(
  "overrides, match",
  [
    (
      {"eval.every_epochs": 1, "eval.validation_examples": 0},
      "eval.validation_examples must be >= 1 when eval.every_epochs is 1",
    ),
    (
      {"eval.every_epochs": 1, "eval.validation_examples": 5000},
      "eval.validation_examples 5000 must be smaller than the 1497",
    ),
    ({"eval.every_epochs": -1}, "eval.every_epochs must be an integer >= 0, got -1"),
    ({"data.augment": "cutout"}, "unknown data.augment 'cutout'"),
    ({"data.augment": "crop", "data.padding_mode": "edge"}, "unknown data.padding_mode 'edge'"),
    ({"awp": -0.1}, "awp must lie in"),
    ({"awp": 5e-3, "awp_warmup": -1}, "awp_warmup must be an integer >= 0, got -1"),
    (
      {
        "objective": "trades",
        "train_attack": dict(name="pgd", eps=0.1),
        "objective_settings": dict(beta=-6.0),
      },
      "objective_settings.beta.*-6.0",
    ),
  ],
)
def test_bad_recipe_configs_touch_nothing(tiny_config, tmp_path, snapshot, overrides, match):
  before = snapshot(tmp_path)
  with pytest.raises(checks.InputError, match=match):
    experiment.train(tiny_config(**overrides), tmp_path / "run", progress=False)
  assert snapshot(tmp_path) == before


@pytest.mark.parametrize("recipe", ["preact_pgd_at", "wrn_trades", "preact_fast_at"])
def test_gpu_recipe_configs_are_valid(recipe):
  from jaxrobust.configs import gpu_recipes
  from jaxrobust.training import config as config_lib

  c = gpu_recipes.get_config(recipe)
  config_lib.check_config(c, parallel.mesh())
  assert c.data.augment == "crop_flip" and c.train_attack.eps == pytest.approx(8 / 255)


@pytest.mark.parametrize("awp_from_step", [0, 1])  # AWP in both steps; in the second only
def test_awp_trades_ema_augmented_step_is_the_same_on_one_and_two_devices(awp_from_step):
  assert jax.device_count() >= 2, "tests/conftest.py asks XLA for 2 host devices"
  from jaxrobust.training import augment

  model, x, y = tiny_model()
  objective = training.make_input_fn(
    "trades",
    dict(name="pgd", norm="linf", eps=0.2, step_size=0.05, steps=2, random_start=0.001),
    settings=dict(beta=6.0),
  )
  tx = optax.sgd(0.1, momentum=0.9)
  results = []
  for devices in (1, 2):
    mesh = parallel.mesh(jax.devices()[:devices])
    state = jax.device_put(
      training.init_state(model, tx, x.shape[1:], jax.random.key(0), ema=True),
      parallel.replicated(mesh),
    )
    step = training.make_train_step(
      model,
      tx,
      objective,
      mesh,
      awp=5e-3,
      awp_from_step=awp_from_step,
      ema=0.9,
      augment=augment.create("crop", padding=2),
    )
    batch = jax.device_put((x, y), parallel.batch_sharding(mesh))
    for _ in range(2):
      state, metrics = step(state, *batch, jax.random.key(1))
    results.append(jax.tree.map(np.asarray, (state, metrics)))
  for one, two in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
    np.testing.assert_allclose(one, two, rtol=1e-5, atol=1e-6)
  assert np.isfinite(results[1][1]["loss"])


def test_cyclic_schedule_is_the_triangle_of_fast_at():
  # Wong et al.: 0 -> peak at 2/5 of training -> 0, linear in between.
  schedule = training.make_schedule(dict(learning_rate=0.2, schedule="cyclic"), 100)
  for step, lr in ((0, 0.0), (20, 0.1), (40, 0.2), (70, 0.1), (100, 0.0)):
    assert float(schedule(step)) == pytest.approx(lr, abs=1e-7)
  with pytest.raises(checks.InputError, match="optimizer.peak_at must lie in"):
    training.make_schedule(dict(learning_rate=0.2, schedule="cyclic", peak_at=1.0), 100)


def test_reproduction_training_time_ignores_pauses_resumes_and_compilation(tmp_path):
  from scripts import reproduce_seed  # pylint: disable=g-import-not-at-top

  # 0.5 s a step; the first interval compiled (30 s), one was paused for an
  # hour, and a resume logged step 150 twice.
  lines = [(50, 30.0), (100, 25.0), (150, 3600.0), (150, 1.0), (200, 25.0), (250, 25.0)]
  (tmp_path / "metrics.jsonl").write_text(
    "".join(json.dumps({"step": s, "loss": 1.0, "seconds": t}) + "\n" for s, t in lines)
  )
  assert reproduce_seed.train_seconds(tmp_path) == 250 * 0.5


def test_recipes_table_keeps_the_rows_it_does_not_rerun_of_the_same_setting():
  from scripts import reproduce_recipes  # pylint: disable=g-import-not-at-top

  def row(name, clean):
    return dict(
      row=name,
      clean=clean,
      autoattack=1.0,
      pgd_l2=2.0,
      n=2000,
      train_seconds=3.0,
      eval_seconds=4.0,
      flags=f"--config {name}:cifar10",
      workdir=f"runs/{name}",
    )

  ten = argparse.Namespace(epochs=10)
  first = reproduce_recipes.markdown([row("trades", 40.0), row("pgd_at", 30.0)], ten)
  table = lambda text: [line.split(" | ")[:2] for line in text.splitlines()[5:]]
  # Rows come in ROWS' order (pgd_at before trades), whatever the run's order.
  assert table(first) == [["| pgd_at", "30.00"], ["| trades", "40.00"]]
  # A run of one row replaces that row and keeps the other, in ROWS' order.
  second = reproduce_recipes.markdown([row("pgd_at", 31.0), row("mart", 5.0)], ten, first)
  assert table(second) == [["| pgd_at", "31.00"], ["| trades", "40.00"], ["| mart", "5.00"]]
  # A table of another setting (here 3 epochs) is not mixed in.
  three = reproduce_recipes.markdown([row("mart", 5.0)], argparse.Namespace(epochs=3), first)
  assert table(three) == [["| mart", "5.00"]]


@pytest.mark.slow  # a minute's equivalence run: .ci/run runs it after the fast suite
def test_mart_objective_of_a_constant_model_is_the_closed_form(trained, capsys):
  from scripts import mart_objective  # pylint: disable=g-import-not-at-top

  x = jax.random.uniform(jax.random.key(1), (6, 8, 8, 1))
  y = jnp.arange(6) % 10
  terms = mart_objective.mart_terms(
    lambda v: jnp.zeros((len(v), 10)), x, y, eps=0.2, lam=6.0, key=jax.random.key(0)
  )
  assert terms["kl_term"] == pytest.approx(0.0, abs=1e-6)
  assert terms["logit_spread"] == 0.0
  assert terms["objective"] == pytest.approx(mart_objective.constant_objective(10), rel=1e-5)
  assert mart_objective.constant_objective(10) == pytest.approx(2.40783, abs=1e-5)
  mart_objective.main([str(trained), "--images", "8", "--split", "test", "--eps", "0.2"])
  out = capsys.readouterr().out
  assert "run: MART" in out and "uniform prediction's MART objective 2.408" in out
