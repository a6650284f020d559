"""Evaluation: the report, its sanity checks, transfer, and eval.py's modes."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrobust.training import config as config_lib
from jaxrobust import attacks as attacks_lib
from jaxrobust import checks
from jaxrobust import data as data_lib
from jaxrobust import evaluation, models, parallel
from jaxrobust.training import loop as experiment
from jaxrobust.evaluation import report
from jaxrobust.evaluation import cascade, sanity
from jaxrobust.evaluation import state as state_lib
from jaxrobust.certification import lipschitz

ROOT = Path(__file__).resolve().parents[1]
SPECS = {
  "pgd_linf": dict(name="pgd", norm="linf", eps=0.1, steps=3),
  "pgd_l2": dict(name="pgd", norm="l2", eps=0.5, steps=3),
}


def linear_apply(variables, x):
  return x.reshape(x.shape[0], -1) @ variables["w"]


@pytest.fixture(scope="module")
def problem():
  w = jax.random.normal(jax.random.key(0), (16, 3))
  x = jax.random.uniform(jax.random.key(1), (10, 4, 4, 1))
  y = np.array(jnp.argmax(linear_apply({"w": w}, x), -1))
  y[:2] = (y[:2] + 1) % 3  # two examples misclassified clean
  return {"w": w}, np.asarray(x), y


def evaluate(variables, x, y, batch_size=4, mesh=None, source=None, individual=False):
  return evaluation.evaluate(
    linear_apply,
    variables,
    x,
    y,
    SPECS,
    key=jax.random.key(3),
    batch_size=batch_size,
    mesh=mesh,
    source=source,
    individual=individual,
  )


def per_example(variables, x, y, **kw):
  clean, outcomes = evaluation.run(
    linear_apply, variables, x, y, SPECS, key=jax.random.key(3), batch_size=4, **kw
  )
  return clean, {label: o.robust for label, o in outcomes.items()}


def test_results_do_not_depend_on_batch_size_or_devices(problem):
  a = evaluate(*problem, batch_size=4, mesh=parallel.mesh(jax.devices()[:1]))
  b = evaluate(*problem, batch_size=10, mesh=parallel.mesh(jax.devices()[:2]))
  for ra, rb in zip(a["results"], b["results"]):
    assert ra["accuracy"] == rb["accuracy"]
    assert ra["median_l2"] == pytest.approx(rb["median_l2"], rel=1e-5)


def test_report_counts(problem):
  clean, robust = per_example(*problem)
  rep = evaluate(*problem)
  assert rep["n_examples"] == 10 and rep["clean_accuracy"] == clean.mean() == 0.8
  for row in rep["results"]:
    assert row["accuracy"] == robust[row["attack"]].mean() <= rep["clean_accuracy"]
    assert row["attacked"] == clean.sum()  # the two threat models each start from clean
    assert row["max_perturbation"] <= SPECS[row["attack"]]["eps"] * (1 + 1e-4)
  worst = clean & robust["pgd_linf"] & robust["pgd_l2"]
  assert rep["worst_case_accuracy"] == worst.mean()
  assert rep["worst_case_accuracy"] <= min(r["accuracy"] for r in rep["results"])
  table = report.format_table(rep)
  assert "| worst case |" in table and f"{100 * worst.mean():.2f} %" in table


def test_cascade_within_a_threat_model_equals_individual_worst_case(problem):
  # Two attacks of one threat model: the second runs only on what the first
  # left robust, and the worst case is that of running both on every example.
  variables, x, y = problem
  specs = {"fgsm": dict(name="fgsm", eps=0.1), "pgd": SPECS["pgd_linf"]}
  run = lambda individual: evaluation.evaluate(
    linear_apply, variables, x, y, specs, key=jax.random.key(3), batch_size=4, individual=individual
  )
  cascade, individual = run(False), run(True)
  assert cascade["worst_case_accuracy"] == individual["worst_case_accuracy"]
  assert cascade["results"][1]["attacked"] <= individual["results"][1]["attacked"]
  assert cascade["results"][1]["accuracy"] == individual["worst_case_accuracy"]


def test_transfer_from_the_same_model_equals_white_box(problem):
  variables, x, y = problem
  white = per_example(variables, x, y)[1]
  transfer = per_example(variables, x, y, source=(linear_apply, variables))[1]
  for label in SPECS:
    np.testing.assert_array_equal(white[label], transfer[label])
  other = {"w": -variables["w"]}  # a source model that attacks the wrong way
  weak = per_example(variables, x, y, source=(linear_apply, other))[1]
  assert all(weak[l].sum() >= white[l].sum() for l in SPECS)


def fake_evaluate(accuracy_of):
  """An `evaluate_specs` whose accuracy per label suffix is given."""

  def evaluate_specs(specs, **kw):
    del kw
    return {"results": [{"attack": l, "accuracy": accuracy_of(l)} for l in specs]}

  return evaluate_specs


def row(label, accuracy, stages=()):
  return {
    "attack": label,
    "accuracy": accuracy,
    "outside_ball": 0,
    "stages": [{"stage": s, "uses_gradients": s != "square", "accuracy": a} for s, a in stages],
  }


def test_sanity_checks_pass_for_a_sane_model():
  rep = {"clean_accuracy": 0.9, "results": [row("pgd_linf", 0.5)]}
  acc = {"half": 0.7, "full": 0.5, "large": 0.02}
  checks = sanity.attack_checks(
    rep, fake_evaluate(lambda l: acc[l.split("@")[1]]), {"pgd_linf": SPECS["pgd_linf"]}, (4, 4, 1)
  )
  assert len(checks) == 3 and all(c["passed"] for c in checks)
  assert "WARNING" not in report.format_sanity(checks)


@pytest.mark.parametrize(
  "clean, acc, failed",
  [
    (0.4, {"half": 0.7, "full": 0.5, "large": 0.0}, "accuracy <= clean"),
    (0.9, {"half": 0.3, "full": 0.5, "large": 0.0}, "does not rise"),
    (0.9, {"half": 0.7, "full": 0.5, "large": 0.4}, "near 0"),
  ],
)
def test_sanity_checks_flag_gradient_masking(clean, acc, failed):
  rep = {"clean_accuracy": clean, "results": [row("pgd_l2", 0.5)]}
  checks = sanity.attack_checks(
    rep, fake_evaluate(lambda l: acc[l.split("@")[1]]), {"pgd_l2": SPECS["pgd_l2"]}, (4, 4, 1)
  )
  failures = [c["check"] for c in checks if not c["passed"]]
  assert len(failures) == 1 and failed in failures[0]
  assert "Gradient masking" in report.format_sanity(checks)


def test_certified_models_skip_the_large_eps_check():
  rep = {"clean_accuracy": 0.9, "results": [row("pgd_l2", 0.5)]}
  acc = {"half": 0.7, "full": 0.5, "large": 0.4}  # a certificate keeps it robust
  checks = sanity.attack_checks(
    rep,
    fake_evaluate(lambda l: acc[l.split("@")[1]]),
    {"pgd_l2": SPECS["pgd_l2"]},
    (4, 4, 1),
    certified=True,
  )
  assert all(c["passed"] for c in checks) and not any("near 0" in c["check"] for c in checks)


def test_square_check():
  stages = [("apgd-ce", 0.5), ("apgd-t", 0.48), ("fab-t", 0.48), ("square", 0.47)]
  rep = {"clean_accuracy": 0.9, "results": [row("aa", 0.47, stages)]}
  failed = [c for c in sanity.attack_checks(rep, None, {}, (4, 4, 1)) if not c["passed"]]
  assert len(failed) == 1 and "square" in failed[0]["check"]
  stages[-1] = ("square", 0.479)  # within AutoAttack's 0.2 %
  rep = {"clean_accuracy": 0.9, "results": [row("aa", 0.479, stages)]}
  assert all(c["passed"] for c in sanity.attack_checks(rep, None, {}, (4, 4, 1)))


def test_large_eps_reaches_grey_from_any_image():
  shape = (8, 8, 3)
  assert sanity.large_eps("linf", shape) == 0.5
  # ||x - 0.5||_2 <= 0.5 sqrt(d) for every x in [0, 1]^d.
  assert sanity.large_eps("l2", shape) == pytest.approx(0.5 * np.sqrt(192))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  from jaxrobust.configs import common  # pylint: disable=g-import-not-at-top

  config = common.base()
  config.model = dict(name="small_cnn", width=4)
  config.epochs = 2
  workdir = tmp_path_factory.mktemp("eval") / "run"
  experiment.train(config, workdir, progress=False)
  return workdir


@pytest.mark.slow  # trains or evaluates for a minute: .ci/run runs it after the fast suite
def test_sanity_checks_on_a_trained_model_pass(trained_run):
  resolved, model, state = experiment.restore(trained_run)
  specs = {
    "aa": dict(name="autoattack", norm="linf", eps=0.2, steps=10, queries=200),
    "pgd_l2": resolved["eval"]["attacks"]["pgd_l2"],
  }
  rep = experiment.evaluate(resolved, model, state, specs=specs, limit=60, sanity=True)
  # Model: 3 + 2 DLR checks (10 classes); each attack: 3; AutoAttack: 4.
  assert len(rep["sanity"]) == 5 + 3 + 4 and all(c["passed"] for c in rep["sanity"]), rep["sanity"]


def eval_cli(*args):
  return subprocess.run(
    [sys.executable, str(ROOT / "eval.py"), *map(str, args)],
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=600,
  )


@pytest.mark.slow  # trains or evaluates for a minute: .ci/run runs it after the fast suite
def test_eval_sweep_transfer_and_certify(trained_run, tmp_path):
  run = trained_run
  out = tmp_path / "sweep.json"
  r = eval_cli(
    "--workdir",
    run,
    "--limit",
    20,
    "--sweep",
    "--sanity=false",
    "--plot",
    tmp_path / "sweep.png",
    "--out",
    out,
    "--config.eval.attacks.pgd_linf.steps=2",
    "--attacks",
    "pgd_linf",
  )
  assert r.returncode == 0, r.stderr
  curve = json.loads(out.read_text())["sweep"]["pgd_linf"]
  assert [p["eps"] for p in curve] == pytest.approx([0.2 * f for f in (0.25, 0.5, 1, 1.5, 2, 3)])
  accuracies = [p["accuracy"] for p in curve]
  assert accuracies[-1] <= accuracies[0]
  assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

  r = eval_cli(
    "--workdir",
    run,
    "--transfer-from",
    run,
    "--limit",
    20,
    "--attacks",
    "pgd_linf",
    "--out",
    tmp_path / "t.json",
  )
  assert r.returncode == 0, r.stderr
  assert "Transfer" in r.stdout

  r = eval_cli(
    "--workdir",
    run,
    "--certify",
    "--sigma",
    0.25,
    "--n",
    200,
    "--n0",
    20,
    "--limit",
    10,
    "--plot",
    tmp_path / "c.png",
    "--out",
    tmp_path / "c.json",
  )
  assert r.returncode == 0, r.stderr
  rep = json.loads((tmp_path / "c.json").read_text())
  assert rep["num_examples"] == 10 and rep["radii"][0] == 0.0
  assert (tmp_path / "c.png").exists()

  r = eval_cli("--workdir", run, "--certify", "--sigma", -1)
  assert r.returncode == 2 and "sigma" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow  # trains or evaluates for a minute: .ci/run runs it after the fast suite
def test_eval_autoattack_suite_resumes_from_its_state(trained_run, tmp_path):
  state, out = tmp_path / "aa.npz", tmp_path / "aa.json"
  args = [
    "--workdir",
    trained_run,
    "--suite",
    "autoattack",
    "--limit",
    12,
    "--sanity=false",
    "--state",
    state,
    "--out",
    out,
  ]
  r = eval_cli(*args)
  assert r.returncode == 0, r.stderr
  rep = json.loads(out.read_text())
  (row,) = rep["results"]
  assert row["attack"] == "autoattack_linf" and row["eps"] == 0.2  # the run's setting
  assert [s["stage"] for s in row["stages"]] == ["apgd-ce", "apgd-t", "fab-t", "square"]
  (rb,) = rep["robustbench"]
  assert rb["threat_model"] == "Linf" and rb["n_examples"] == 12 and rb["version"] == "standard"
  assert rb["robust_acc"] == pytest.approx(100 * row["accuracy"])
  assert "| - square |" in r.stdout
  # The same command again reads the finished state: same numbers, no attack run.
  r = eval_cli(*args)
  assert r.returncode == 0, r.stderr
  again = json.loads(out.read_text())["results"][0]
  assert again["accuracy"] == row["accuracy"] and again["stages"] == row["stages"]
  # A state of another suite is refused, and left as it was.
  before = state.read_bytes()
  r = eval_cli(*args[:-4], "--norm", "l2", "--state", state)
  assert r.returncode == 2 and "belongs to another evaluation" in r.stderr
  assert state.read_bytes() == before


@pytest.fixture(scope="module")
def spectral_run(tmp_path_factory):
  """Three epochs of natural training (Adam) of a width-4 CNN, spectrally
  normalised (about 60 % test accuracy: normalised layers learn slowly)."""
  from jaxrobust.configs import common  # pylint: disable=g-import-not-at-top

  config = common.base()
  config.model = dict(
    name="small_cnn", width=4, spectral=dict(mode="operator", target=1.0, n_steps=1, rescale="clip")
  )
  config.optimizer = dict(
    name="adam", learning_rate=1e-2, schedule="cosine", warmup_steps=20, weight_decay=0.0
  )
  config.epochs = 3
  workdir = tmp_path_factory.mktemp("spectral") / "run"
  experiment.train(config, workdir, progress=False)
  return experiment.restore(workdir)


@pytest.mark.slow  # trains or evaluates for a minute: .ci/run runs it after the fast suite
def test_lipschitz_certificate_of_a_spectral_model(spectral_run):

  resolved, model, state = spectral_run
  specs = {"pgd_l2": dict(name="pgd", norm="l2", eps=0.01, steps=10)}
  rep = experiment.evaluate(resolved, model, state, specs=specs, limit=100, lipschitz=True)
  cert = rep["lipschitz"]
  # The same numbers computed directly: the bound, the margins, the radii.
  apply = lambda v, x: model.apply(v, x, train=False)
  bound = lipschitz.lipschitz_bound(apply, jax.device_get(state.variables), (8, 8, 1))
  assert cert["lipschitz_bound"] == pytest.approx(bound, rel=1e-6)
  x, y = config_lib.load_split(resolved, "test")
  logits = np.sort(np.asarray(apply(state.variables, x[:100])), axis=1)
  correct = np.asarray(apply(state.variables, x[:100])).argmax(1) == y[:100]
  radius = np.where(correct, (logits[:, -1] - logits[:, -2]) / (np.sqrt(2) * bound), 0)
  assert [c["radius"] for c in cert["certified"]] == [0.0, 0.0025, 0.005, 0.01]
  for c in cert["certified"]:
    assert c["accuracy"] == pytest.approx(np.mean(radius > c["radius"]))
  assert cert["certified"][-1]["accuracy"] > 0  # the certificate says something
  # PGD-L2 never breaks a certified example.
  assert rep["results"][0]["accuracy"] >= cert["certified"][-1]["accuracy"]
  assert all(c["passed"] for c in sanity.lipschitz_checks(rep, cert))
  table = report.format_lipschitz(cert, "the model")
  assert f"L <= {bound:.4g}" in table and "| 0.01 |" in table


def test_lipschitz_sanity_flags_an_attack_beating_the_certificate():
  rep = {"results": [{"attack": "pgd_l2", "norm": "l2", "eps": 0.5, "accuracy": 0.2}]}
  cert = {"certified": [{"radius": 0.0, "accuracy": 0.9}, {"radius": 0.5, "accuracy": 0.3}]}
  (check,) = sanity.lipschitz_checks(rep, cert)
  assert not check["passed"] and "0.2000 vs certified 0.3000" in check["detail"]


@pytest.mark.parametrize(
  "n, batch, devices, expected",
  [
    (500, 500, 2, [(500, 500)]),
    (1000, 500, 2, [(500, 500), (500, 500)]),
    (251, 500, 2, [(250, 250), (1, 16)]),
    (250, 500, 2, [(250, 250)]),
    (3, 500, 2, [(3, 16)]),
    (17, 500, 2, [(17, 32)]),
    (156, 256, 2, [(128, 128), (28, 32)]),
    (9, 40, 1, [(9, 10)]),
    (1, 16, 2, [(1, 16)]),
    (300, 501, 3, [(252, 252), (48, 63)]),
  ],
)
def test_a_stage_runs_in_batches_that_waste_little_padding(n, batch, devices, expected):
  parts = evaluation._parts(n, batch, devices)
  assert parts == expected
  assert sum(c for c, _ in parts) == n
  assert all(c <= s and s % devices == 0 for c, s in parts)


def test_adversarial_examples_come_back_with_the_stage_that_found_them(problem):
  variables, x, y = problem
  attack = attacks_lib.worst_case(
    attacks=[attacks_lib.fgsm(eps=0.02), attacks_lib.pgd(norm="linf", eps=0.3, steps=5)]
  )
  key = jax.random.key(4)
  rep, adv = evaluation.evaluate(
    linear_apply, variables, x, y, {"wc": attack}, key=key, batch_size=4, return_adversarial=True
  )
  found = adv["wc"]
  logits = lambda z: linear_apply(variables, z)
  clean = np.argmax(logits(x), -1) == y
  assert found["fooled"].sum() == clean.sum() - round(rep["results"][0]["accuracy"] * len(y))
  assert found["fooled"].any() and not found["fooled"][~clean].any()
  fooled = found["fooled"]
  np.testing.assert_array_equal(found["x_adv"][~fooled], x[~fooled])
  assert np.all(np.argmax(logits(found["x_adv"][fooled]), -1) != y[fooled])
  assert np.abs(found["x_adv"] - x).max() <= 0.3 + 1e-6
  assert set(found["stage"][fooled]) <= {"fgsm", "pgd"} and set(found["stage"][~fooled]) == {""}
  # Each is what its stage gives when run on every example with the stage's key.
  direct = attack(logits, x, y, key=jax.random.fold_in(key, 0))
  for stage in ("fgsm", "pgd"):
    at = fooled & (found["stage"] == stage)
    j = ("fgsm", "pgd").index(stage)
    by_stage = attack.stages[j](
      logits,
      x,
      y,
      evaluation.keys_lib.fold(
        evaluation.keys_lib.example_keys(jax.random.fold_in(key, 0), len(x)), j
      ),
    )
    np.testing.assert_allclose(found["x_adv"][at], by_stage[at], atol=1e-6)
  assert np.all(np.argmax(logits(direct[fooled]), -1) != y[fooled])


@pytest.mark.parametrize(
  "attack",
  [
    attacks_lib.fab_t(eps=0.15, steps=4, num_targets=2),
    attacks_lib.apgd(eps=0.12, steps=3, restarts=2),
  ],
  ids=["fab_t targets", "apgd restarts"],
)
def test_an_attack_made_of_rounds_drops_examples_and_equals_running_everything(problem, attack):
  """FAB-T's targets and APGD's restarts are rounds: each runs on what the
  rounds before it left robust, one compiled program for all, with the same
  per-example result as the attack called on every example."""
  variables, x, y = problem
  assert attack.rounds == 2
  assert [(j, m) for j, _, m in evaluation.rounds(attack)] == [(0, 0), (0, 1)]
  key = jax.random.key(5)
  evaluator = evaluation.Evaluator(linear_apply, batch_size=4)
  clean, outcomes = evaluator.run(variables, x, y, {"f": attack}, key=key)
  assert len(evaluator._attack_programs) == 1
  o = outcomes["f"]
  logits = lambda z: linear_apply(variables, z)
  everything = attack(logits, x, y, jax.random.fold_in(key, 0))
  expected = clean & (np.argmax(logits(everything), -1) == y)
  np.testing.assert_array_equal(o.robust, expected)
  assert 0 < o.robust.sum() < clean.sum()
  # The second target ran only on what the first left robust.
  assert o.attacked[1].sum() < o.attacked[0].sum()


def test_a_randomized_model_is_judged_by_its_draws_under_eot_attacks(problem):
  """AutoAttack's "rand": clean and attacked, a stochastic attack's
  examples are classified by draws of the randomized model, not by its
  deterministic apply function."""
  variables, x, y = problem
  x = np.repeat(x, 8, 0)
  y = np.repeat(y, 8, 0)
  # Draws so noisy that each is a uniform guess among the 3 classes.
  noisy = lambda v, xb, key: linear_apply(v, xb) + 1e4 * jax.random.normal(key, (len(xb), 3))
  eot = attacks_lib.apgd(norm="linf", eps=1e-6, steps=1, eot_samples=2)
  rep = evaluation.evaluate(
    linear_apply, variables, x, y, {"eot": eot}, key=jax.random.key(0), stochastic_apply_fn=noisy
  )
  deterministic = evaluation.evaluate(
    linear_apply, variables, x, y, {"eot": eot}, key=jax.random.key(0)
  )
  # eps 1e-6 breaks nothing: the deterministic model stays at its clean accuracy.
  assert deterministic["results"][0]["accuracy"] == deterministic["clean_accuracy"] == 0.8
  # Two uniform guesses both right: 1/9 of the clean-correct examples (64 of 80 here).
  assert rep["results"][0]["accuracy"] == pytest.approx(0.8 / 9, abs=0.06)


def test_the_randomized_defence_check_fires_on_draws_that_differ_only(problem):
  """AutoAttack's check: 5 passes of the model; a randomized model's draws
  (each with its own key) differ, a deterministic model's never do."""
  variables, x, y = problem
  (deterministic,) = [
    c for c in sanity.model_checks(linear_apply, variables, x, y) if "passes agree" in c["check"]
  ]
  assert deterministic["passed"]
  noisy = lambda v, xb, key: linear_apply(v, xb) + 0.5 * jax.random.normal(key, (len(xb), 3))
  (randomized,) = [
    c
    for c in sanity.model_checks(linear_apply, variables, x, y, stochastic_apply_fn=noisy)
    if "passes agree" in c["check"]
  ]
  assert not randomized["passed"] and "version rand" in randomized["detail"]
  # Draws that are all the same (no noise) are not a randomized defence.
  quiet = lambda v, xb, key: linear_apply(v, xb) + 0.0 * jax.random.normal(key, (len(xb), 3))
  assert all(
    c["passed"]
    for c in sanity.model_checks(linear_apply, variables, x, y, stochastic_apply_fn=quiet)
    if "passes agree" in c["check"]
  )


def test_eval_saves_the_adversarial_examples(trained_run, tmp_path):
  saved, out = tmp_path / "adv.npz", tmp_path / "r.json"
  r = eval_cli(
    "--workdir",
    trained_run,
    "--attacks",
    "pgd_linf",
    "--limit",
    24,
    "--sanity=false",
    "--save-adversarial",
    saved,
    "--out",
    out,
  )
  assert r.returncode == 0, r.stderr
  rep = json.loads(out.read_text())
  with np.load(saved) as found:
    x_adv, fooled = found["pgd_linf/x_adv"], found["pgd_linf/fooled"]
    stage, y = found["pgd_linf/stage"], found["y"]
  resolved, model, state = experiment.restore(trained_run)
  x = data_lib.load("digits", "test")[0][:24]
  assert x_adv.shape == x.shape and len(y) == 24
  clean = rep["clean_accuracy"] * 24
  assert fooled.sum() == round(clean - rep["results"][0]["accuracy"] * 24) > 0
  np.testing.assert_array_equal(x_adv[~fooled], x[~fooled])
  assert np.abs(x_adv - x).max() <= resolved["eval"]["attacks"]["pgd_linf"]["eps"] + 1e-6
  logits = models.inference_fn(model)(state.variables, x_adv[fooled])
  assert np.all(np.argmax(logits, -1) != y[fooled])
  assert set(stage[fooled]) == {"pgd"} and set(stage[~fooled]) == {""}


def test_a_targeted_attack_is_refused_by_the_evaluation(problem):
  variables, x, y = problem
  targeted = {"t": attacks_lib.pgd(eps=0.1, steps=2, targeted=True)}
  with pytest.raises(checks.InputError, match="'t' is targeted.*true labels"):
    evaluation.evaluate(linear_apply, variables, x, y, targeted, key=jax.random.key(0))


def test_the_dlr_zero_gradient_check_fires_where_dlr_has_no_gradient(problem):
  """AutoAttack's check at APGD-DLR's and APGD-T's starts: a model whose
  logits are flat in the input (rounded) has zero DLR gradients."""
  variables, x, y = problem
  apply4 = lambda v, xb: jnp.concatenate([linear_apply(v, xb), jnp.zeros((len(xb), 1))], -1)
  smooth = [c for c in sanity.model_checks(apply4, variables, x, y) if "DLR" in c["check"]]
  assert len(smooth) == 2 and all(c["passed"] for c in smooth)
  rounded = lambda v, xb: apply4(v, jnp.round(xb * 4) / 4)
  flat = [c for c in sanity.model_checks(rounded, variables, x, y) if "DLR" in c["check"]]
  assert len(flat) == 2 and not any(c["passed"] for c in flat)
  correct = int(np.sum(np.argmax(apply4(variables, x), -1) == y))
  assert flat[0]["detail"] == f"{correct} zero of {correct} correctly classified"


def counting(apply_fn):
  """`apply_fn`, and the list of the shapes it was traced with."""
  traced = []

  def counted(variables, x):
    traced.append(x.shape)
    return apply_fn(variables, x)

  return counted, traced


def test_one_evaluator_compiles_once_and_two_evaluators_share_nothing(problem):
  variables, x, y = problem
  apply_fn, traced = counting(linear_apply)
  evaluator = evaluation.Evaluator(apply_fn, batch_size=4)
  specs = lambda eps: {"pgd": dict(name="pgd", eps=eps, steps=2)}
  first = evaluator.evaluate(variables, x, y, specs(0.1), key=jax.random.key(0))
  compiled = len(traced)
  assert compiled > 0
  # Other variables (another epoch's), another eps, another key: nothing traced.
  other = {"w": variables["w"] * 1.5}
  again = evaluator.evaluate(other, x, y, specs(0.2), key=jax.random.key(1))
  assert len(traced) == compiled and again["results"][0]["eps"] == 0.2
  # The same evaluation again gives the same report.
  same = evaluator.evaluate(variables, x, y, specs(0.1), key=jax.random.key(0))
  assert same["results"][0]["accuracy"] == first["results"][0]["accuracy"]
  assert len(traced) == compiled
  # Another evaluator of the same function compiles its own programs.
  fresh = evaluation.Evaluator(apply_fn, batch_size=4)
  assert not fresh._attack_programs
  fresh.evaluate(variables, x, y, specs(0.1), key=jax.random.key(0))
  assert len(traced) > compiled  # (the input check's shape evaluation is cached by JAX)
  assert all(
    fresh._attack_programs[k] is not evaluator._attack_programs[k] for k in fresh._attack_programs
  )


def test_evaluate_reuses_a_recent_evaluator_of_the_same_functions(problem):
  variables, x, y = problem
  apply_fn, _ = counting(linear_apply)
  one = evaluation.evaluator_for(apply_fn, batch_size=4)
  assert evaluation.evaluator_for(apply_fn, batch_size=4) is one
  assert evaluation.evaluator_for(apply_fn, batch_size=8) is not one
  for _ in range(evaluation.RECENT_EVALUATORS):
    evaluation.evaluator_for(counting(linear_apply)[0])
  assert evaluation.evaluator_for(apply_fn, batch_size=4) is not one  # dropped: bounded


def test_the_next_batch_is_dispatched_before_the_current_one_is_read():
  events = []
  cascade.pipelined(
    range(3),
    lambda i: events.append(f"dispatch {i}") or i * 10,
    lambda i, pending: events.append(f"read {i}: {pending}"),
  )
  assert events == [
    "dispatch 0",
    "dispatch 1",
    "read 0: 0",
    "dispatch 2",
    "read 1: 10",
    "read 2: 20",
  ]


def test_the_state_is_written_at_most_every_save_seconds_and_at_the_end(
  problem, tmp_path, monkeypatch
):
  variables, x, y = problem
  x, y = np.repeat(x, 3, 0), np.repeat(y, 3, 0)  # 30 examples, each its own batch
  writes = []
  write = state_lib.State._write
  monkeypatch.setattr(state_lib.State, "_write", lambda self: writes.append(1) or write(self))
  evaluator = evaluation.Evaluator(
    linear_apply, batch_size=1, mesh=parallel.mesh(jax.devices()[:1])
  )
  evaluate = lambda path: evaluator.evaluate(
    variables, x, y, SPECS, key=jax.random.key(3), state_path=path
  )
  whole = evaluate(None)
  assert not writes  # no file, nothing written
  # Every batch due: a write after each of the 2 x 24 batches (and the clean ones).
  monkeypatch.setattr(state_lib, "SAVE_SECONDS", 0.0)
  evaluate(tmp_path / "every.npz")
  assert len(writes) > 48
  # 48 batches within SAVE_SECONDS: one write, at the end, of the whole result.
  writes.clear()
  monkeypatch.setattr(state_lib, "SAVE_SECONDS", 3600.0)
  path = tmp_path / "state.npz"
  final = evaluate(path)
  assert [r["accuracy"] for r in final["results"]] == [r["accuracy"] for r in whole["results"]]
  assert len(writes) == 1
  resumed = evaluate(path)  # reads the finished state: nothing to run or write
  assert len(writes) == 1
  for a, b in zip(whole["results"], resumed["results"]):
    assert a["accuracy"] == b["accuracy"] and a["attacked"] == b["attacked"]
  assert resumed["worst_case_accuracy"] == whole["worst_case_accuracy"]


class Interrupt(Exception):
  pass


def test_an_interruption_in_the_middle_of_a_change_keeps_the_last_consistent_file(tmp_path):
  path = tmp_path / "state.npz"
  state = state_lib.State(path, {"format": state_lib.STATE_FORMAT})
  outcome = evaluation.Outcome.start(np.ones(4, bool), rounds=1)
  state.save("a", outcome)
  state.flush()
  assert state.writes == 1
  before = path.read_bytes()
  with pytest.raises(Interrupt), state.changing():
    outcome.robust[0] = False
    raise Interrupt  # fooled_by and attacked not recorded yet
  state.flush()
  assert state.writes == 1 and path.read_bytes() == before
  with state.changing():
    outcome.fooled_by[0] = 0
    outcome.attacked[0, 0] = True
  state.save("a", outcome)
  state.flush()
  assert state.writes == 2
  with np.load(path) as saved:
    np.testing.assert_array_equal(saved["a/robust"], [False, True, True, True])
    np.testing.assert_array_equal(saved["a/attacked"], [[True, False, False, False]])
