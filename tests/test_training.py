"""Data-parallel training: device-count equivalence, resume, optimizers, refusals."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import BAD_INPUT_SETTINGS
from jaxrobust import attacks, checks, models, parallel
from jaxrobust.configs import natural
from jaxrobust.training import augment
from jaxrobust.training import loop as experiment
from jaxrobust.training import step as training

# PGD-2 adversarial training of the tiny digits run.
ADVERSARIAL = dict(
  objective="adversarial", train_attack=dict(name="pgd", norm="linf", eps=0.2, steps=2)
)


def leaves_close(a, b, rtol):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=1e-6)


@pytest.mark.slow  # a minute's equivalence run: .ci/run runs it after the fast suite
def test_two_devices_equal_one_device_with_batchnorm_pgd_and_augmentation(two_steps):
  assert jax.device_count() >= 2, "tests/conftest.py asks XLA for 2 host devices"
  # BatchNorm statistics are synchronised over devices, and every example's
  # random start, crop and flip depend on its global index only, so the split
  # is invisible.
  model = models.WideResNet(
    num_classes=3, mean=(0.5,), std=(0.3,), depth=10, width=1, axis_name=parallel.BATCH_AXIS
  )
  input_fn = attacks.pgd(norm="linf", eps=0.1, steps=2)
  x = jax.random.uniform(jax.random.key(2), (8, 8, 8, 1))
  y = jnp.arange(8) % 3
  crop_flip = augment.create("crop_flip", padding=2, padding_mode="reflect")
  one, m1 = two_steps(parallel.mesh(jax.devices()[:1]), model, input_fn, x, y, crop_flip)
  two, m2 = two_steps(parallel.mesh(jax.devices()[:2]), model, input_fn, x, y, crop_flip)
  assert "batch_stats" in one.model_state
  leaves_close(one, two, rtol=1e-5)
  leaves_close(m1, m2, rtol=1e-5)
  # And the state did move.
  assert int(two.step) == 2


@pytest.mark.slow  # trains end to end: .ci/run runs it after the fast suite
def test_resumed_run_equals_uninterrupted_run(tiny_config, tmp_path):
  # With augmentation: the crops and flips of a resumed run are the same too.
  config = tiny_config(**ADVERSARIAL, **{"data.augment": "crop_flip"})
  straight = experiment.train(config, tmp_path / "a", max_steps=8, progress=False)
  experiment.train(config, tmp_path / "b", max_steps=5, progress=False)
  resumed = experiment.train(config, tmp_path / "b", max_steps=8, progress=False)
  assert int(resumed.step) == 8
  for u, v in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
  steps = [json.loads(l)["step"] for l in (tmp_path / "b/metrics.jsonl").open()]
  assert steps == list(range(1, 9))
  assert (tmp_path / "a/metrics.jsonl").read_text().count("\n") == 8


def test_same_seed_same_result_other_seed_differs(seeded_runs, tmp_path):
  # `seeded_runs`: PGD training, twice with seed 0 on 2 devices (a, b).
  config = seeded_runs.config()
  config.seed = 1
  c = experiment.train(config, tmp_path / "c", max_steps=seeded_runs.steps, progress=False)
  a, b = seeded_runs.states["a"], seeded_runs.states["b"]
  leaf = lambda s: np.asarray(jax.tree.leaves(s.params)[0])
  np.testing.assert_array_equal(leaf(a), leaf(b))
  assert not np.array_equal(leaf(a), leaf(c))


def test_workdir_of_another_config_is_refused_and_untouched(trained, snapshot):
  # `trained`: the natural digits run of BAD_INPUT_SETTINGS, 2 steps.
  before = snapshot(trained)
  config = natural.get_config()
  config.update_from_flattened_dict(BAD_INPUT_SETTINGS)
  config.optimizer.learning_rate = 0.5
  with pytest.raises(checks.InputError, match="different config.*learning_rate"):
    experiment.train(config, trained, max_steps=3, progress=False)
  assert snapshot(trained) == before


def test_batch_not_divisible_by_devices_is_refused(tiny_config, tmp_path):
  with pytest.raises(checks.InputError, match="batch_size 33 is not divisible by the 2"):
    experiment.train(tiny_config(**ADVERSARIAL, batch_size=33), tmp_path, progress=False)
  assert not tmp_path.joinpath("config.json").exists()


@pytest.mark.slow  # three epochs, then PGD on 100 digits
def test_natural_training_learns_digits(tiny_config, tmp_path):
  # Adam at a constant rate: SGD with momentum on this width-4 network swings
  # between 60 % and 95 % from one epoch count to the next.
  config = tiny_config(
    objective="natural",
    epochs=3,
    optimizer=dict(name="adam", learning_rate=1e-2, schedule="constant"),
    checkpoint_every_steps=1000,  # saved at the end only: the accuracy matters
    log_every_steps=1000,
  )
  experiment.train(config, tmp_path, progress=False)
  resolved, model, state = experiment.restore(tmp_path)
  report = experiment.evaluate(resolved, model, state, names="pgd_linf", limit=100)
  assert report["clean_accuracy"] >= 0.8
  assert report["results"][0]["accuracy"] < report["clean_accuracy"]


@pytest.mark.parametrize("schedule", ["constant", "cosine", "piecewise"])
@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_optimizers_and_schedules(name, schedule):
  cfg = dict(name=name, learning_rate=0.1, schedule=schedule, weight_decay=1e-4, warmup_steps=2)
  tx = training.make_optimizer(cfg, total_steps=10)
  params = {"w": jnp.ones(3)}
  updates, _ = tx.update({"w": jnp.ones(3)}, tx.init(params), params)
  assert np.all(np.asarray(updates["w"]) <= 0)  # descends
  schedule_fn = training.make_schedule(cfg, 10)
  if schedule == "piecewise":
    assert float(schedule_fn(9)) == pytest.approx(0.1 * 0.1 * 0.1)
  elif schedule == "cosine":
    assert float(schedule_fn(0)) == 0.0 and float(schedule_fn(2)) == pytest.approx(0.1)


@pytest.mark.parametrize(
  "cfg, message",
  [
    (dict(name="rmsprop", learning_rate=0.1), "'rmsprop'"),
    (dict(name="sgd", learning_rate=-0.1), "learning_rate"),
    (dict(name="sgd", learning_rate=0.1, schedule="linear"), "'linear'"),
    (dict(name="sgd", learning_rate=0.1, weight_decay=-1.0), "weight_decay"),
  ],
)
def test_bad_optimizer_settings(cfg, message):
  with pytest.raises(checks.InputError, match=message):
    training.make_optimizer(cfg, 10)


def test_unknown_objective():
  with pytest.raises(checks.InputError, match="unknown objective 'free_at'"):
    training.make_input_fn("free_at")
