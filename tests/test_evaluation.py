"""Evaluation: the report, its sanity checks, transfer, and eval.py's modes."""
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrobust import evaluation, experiment, parallel

ROOT = Path(__file__).resolve().parents[1]
SPECS = {"pgd_linf": dict(name="pgd", norm="linf", eps=0.1, steps=3),
         "pgd_l2": dict(name="pgd", norm="l2", eps=0.5, steps=3)}


def linear_apply(variables, x):
  return x.reshape(x.shape[0], -1) @ variables["w"]


@pytest.fixture(scope="module")
def problem():
  w = jax.random.normal(jax.random.key(0), (16, 3))
  x = jax.random.uniform(jax.random.key(1), (10, 4, 4, 1))
  y = np.array(jnp.argmax(linear_apply({"w": w}, x), -1))
  y[:2] = (y[:2] + 1) % 3  # two examples misclassified clean
  return {"w": w}, np.asarray(x), y


def results_of(variables, x, y, batch_size=4, mesh=None, source=None):
  return evaluation.per_example_results(
      linear_apply, variables, x, y, evaluation.build_attacks(SPECS),
      key=jax.random.key(3), batch_size=batch_size, mesh=mesh, source=source)


def test_results_do_not_depend_on_batch_size_or_devices(problem):
  a = results_of(*problem, batch_size=4, mesh=parallel.mesh(jax.devices()[:1]))
  b = results_of(*problem, batch_size=10, mesh=parallel.mesh(jax.devices()[:2]))
  for label in SPECS:
    np.testing.assert_array_equal(a[label]["correct"], b[label]["correct"])
    np.testing.assert_allclose(a[label]["l2"], b[label]["l2"], rtol=1e-5)


def test_report_counts(problem):
  res = results_of(*problem)
  rep = evaluation.report(res, SPECS)
  clean = res["clean"]["correct"]
  assert rep["n_examples"] == 10 and rep["clean_accuracy"] == clean.mean() == 0.8
  for row in rep["results"]:
    r = res[row["attack"]]
    assert row["accuracy"] == r["correct"].mean() <= rep["clean_accuracy"]
    fooled = clean & ~r["correct"]
    assert row["median_l2"] == pytest.approx(float(np.median(r["l2"][fooled])))
    assert row["median_l2"] <= SPECS[row["attack"]]["eps"] * (1 + 1e-5) or row["norm"] == "linf"
  worst = clean & res["pgd_linf"]["correct"] & res["pgd_l2"]["correct"]
  assert rep["worst_case_accuracy"] == worst.mean()
  assert rep["worst_case_accuracy"] <= min(r["accuracy"] for r in rep["results"])
  table = evaluation.format_table(rep)
  assert "| worst case |" in table and f"{100 * worst.mean():.2f} %" in table


def test_transfer_from_the_same_model_equals_white_box(problem):
  variables, x, y = problem
  white = results_of(variables, x, y)
  transfer = results_of(variables, x, y, source=(linear_apply, variables))
  for label in SPECS:
    np.testing.assert_array_equal(white[label]["correct"], transfer[label]["correct"])
  other = {"w": -variables["w"]}  # a source model that attacks the wrong way
  weak = results_of(variables, x, y, source=(linear_apply, other))
  assert all(weak[l]["correct"].sum() >= white[l]["correct"].sum() for l in SPECS)


def fake_evaluate(accuracy_of):
  """An `evaluate_specs` whose accuracy per label suffix is given."""
  def evaluate_specs(specs):
    return {"results": [{"attack": l, "accuracy": accuracy_of(l)} for l in specs]}
  return evaluate_specs


def test_sanity_checks_pass_for_a_sane_model():
  rep = {"clean_accuracy": 0.9, "results": [{"attack": "pgd_linf", "accuracy": 0.5}]}
  acc = {"half": 0.7, "full": 0.5, "large": 0.02}
  checks = evaluation.sanity_checks(
      rep, fake_evaluate(lambda l: acc[l.split("@")[1]]), {"pgd_linf": SPECS["pgd_linf"]},
      (4, 4, 1))
  assert len(checks) == 3 and all(c["passed"] for c in checks)
  assert "WARNING" not in evaluation.format_sanity(checks)


@pytest.mark.parametrize("clean, acc, failed", [
    (0.4, {"half": 0.7, "full": 0.5, "large": 0.0}, "accuracy <= clean"),
    (0.9, {"half": 0.3, "full": 0.5, "large": 0.0}, "does not rise"),
    (0.9, {"half": 0.7, "full": 0.5, "large": 0.4}, "near 0"),
])
def test_sanity_checks_flag_gradient_masking(clean, acc, failed):
  rep = {"clean_accuracy": clean, "results": [{"attack": "pgd_l2", "accuracy": 0.5}]}
  checks = evaluation.sanity_checks(
      rep, fake_evaluate(lambda l: acc[l.split("@")[1]]), {"pgd_l2": SPECS["pgd_l2"]},
      (4, 4, 1))
  failures = [c["check"] for c in checks if not c["passed"]]
  assert len(failures) == 1 and failed in failures[0]
  assert "Gradient masking" in evaluation.format_sanity(checks)


def test_large_eps_reaches_grey_from_any_image():
  shape = (8, 8, 3)
  assert evaluation.large_eps("linf", shape) == 0.5
  # ||x - 0.5||_2 <= 0.5 sqrt(d) for every x in [0, 1]^d.
  assert evaluation.large_eps("l2", shape) == pytest.approx(0.5 * np.sqrt(192))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  from configs import common  # pylint: disable=g-import-not-at-top
  config = common.base()
  config.model = dict(name="small_cnn", width=4)
  config.epochs = 2
  workdir = tmp_path_factory.mktemp("eval") / "run"
  experiment.train(config, workdir, progress=False)
  return workdir


def test_sanity_checks_on_a_trained_model_pass(trained_run):
  resolved, model, state = experiment.restore(trained_run)
  rep = experiment.evaluate(resolved, model, state, limit=60, sanity=True)
  assert rep["sanity"] and all(c["passed"] for c in rep["sanity"]), rep["sanity"]


def eval_cli(*args):
  return subprocess.run([sys.executable, str(ROOT / "eval.py"), *map(str, args)],
                        capture_output=True, text=True, cwd=ROOT, timeout=600)


def test_eval_sweep_transfer_and_certify(trained_run, tmp_path):
  run = trained_run
  out = tmp_path / "sweep.json"
  r = eval_cli("--workdir", run, "--limit", 20, "--sweep", "--sanity=false",
               "--plot", tmp_path / "sweep.png", "--out", out,
               "--config.eval.attacks.pgd_linf.steps=2", "--attacks", "pgd_linf")
  assert r.returncode == 0, r.stderr
  curve = json.loads(out.read_text())["sweep"]["pgd_linf"]
  assert [p["eps"] for p in curve] == pytest.approx(
      [0.2 * f for f in evaluation.SWEEP_FACTORS])
  accuracies = [p["accuracy"] for p in curve]
  assert accuracies[-1] <= accuracies[0]
  assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

  r = eval_cli("--workdir", run, "--transfer-from", run, "--limit", 20,
               "--attacks", "pgd_linf", "--out", tmp_path / "t.json")
  assert r.returncode == 0, r.stderr
  assert "Transfer" in r.stdout

  r = eval_cli("--workdir", run, "--certify", "--sigma", 0.25, "--n", 200,
               "--n0", 20, "--limit", 10, "--plot", tmp_path / "c.png",
               "--out", tmp_path / "c.json")
  assert r.returncode == 0, r.stderr
  rep = json.loads((tmp_path / "c.json").read_text())
  assert rep["num_examples"] == 10 and rep["radii"][0] == 0.0
  assert (tmp_path / "c.png").exists()

  r = eval_cli("--workdir", run, "--certify", "--sigma", -1)
  assert r.returncode == 2 and "sigma" in r.stderr and "Traceback" not in r.stderr


@pytest.fixture(scope="module")
def spectral_run(tmp_path_factory):
  """Three epochs of natural training (Adam) of a width-4 CNN, spectrally
  normalised (about 60 % test accuracy: normalised layers learn slowly)."""
  from configs import common  # pylint: disable=g-import-not-at-top
  config = common.base()
  config.model = dict(name="small_cnn", width=4,
                      spectral=dict(mode="operator", target=1.0, n_steps=1, rescale="clip"))
  config.optimizer = dict(name="adam", learning_rate=1e-2, schedule="cosine",
                          warmup_steps=20, weight_decay=0.0)
  config.epochs = 3
  workdir = tmp_path_factory.mktemp("spectral") / "run"
  experiment.train(config, workdir, progress=False)
  return experiment.restore(workdir)


def test_lipschitz_certificate_of_a_spectral_model(spectral_run):
  from jaxrobust import spectral  # pylint: disable=g-import-not-at-top
  resolved, model, state = spectral_run
  specs = {"pgd_l2": dict(name="pgd", norm="l2", eps=0.01, steps=10)}
  rep = experiment.evaluate(resolved, model, state, specs=specs, limit=100, lipschitz=True)
  cert = rep["lipschitz"]
  # The same numbers computed directly: the bound, the margins, the radii.
  apply = lambda v, x: model.apply(v, x, train=False)
  bound = spectral.lipschitz_bound(apply, jax.device_get(state.variables), (8, 8, 1))
  assert cert["lipschitz_bound"] == pytest.approx(bound, rel=1e-6)
  x, y = experiment.load_split(resolved, "test")
  logits = np.sort(np.asarray(apply(state.variables, x[:100])), axis=1)
  correct = np.asarray(apply(state.variables, x[:100])).argmax(1) == y[:100]
  radius = np.where(correct, (logits[:, -1] - logits[:, -2]) / (np.sqrt(2) * bound), 0)
  assert [c["radius"] for c in cert["certified"]] == [0.0, 0.0025, 0.005, 0.01]
  for c in cert["certified"]:
    assert c["accuracy"] == pytest.approx(np.mean(radius > c["radius"]))
  assert cert["certified"][-1]["accuracy"] > 0  # the certificate says something
  # PGD-L2 never breaks a certified example.
  assert rep["results"][0]["accuracy"] >= cert["certified"][-1]["accuracy"]
  assert all(c["passed"] for c in evaluation.lipschitz_sanity(rep, cert))
  table = evaluation.format_lipschitz(cert, "the model")
  assert f"L <= {bound:.4g}" in table and "| 0.01 |" in table


def test_lipschitz_sanity_flags_an_attack_beating_the_certificate():
  rep = {"results": [{"attack": "pgd_l2", "norm": "l2", "eps": 0.5, "accuracy": 0.2}]}
  cert = {"certified": [{"radius": 0.0, "accuracy": 0.9}, {"radius": 0.5, "accuracy": 0.3}]}
  (check,) = evaluation.lipschitz_sanity(rep, cert)
  assert not check["passed"] and "0.2000 vs certified 0.3000" in check["detail"]
