"""AutoAttack's attacks (APGD-T, FAB, FAB-T, Square), the suite as a cascade,
and minimal-norm attacks reaching the minimum.

Ground truth: losses by hand, exact minimal distances to a linear
classifier's decision regions (scipy's LP and QP solvers, independent of the
attacks' own projections), the sign-vertex optimum of a linear model, the
cascade against every attack run on every example, an interrupted evaluation
against an uninterrupted one.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

import jaxrobust as jr
from jaxrobust import checks, evaluation
from jaxrobust.evaluation import sanity
from jaxrobust.attacks.fab import project_onto_hyperplane
from jaxrobust.attacks.square import _eta

A = jr.attacks
TOL = 1e-5


KEY = jax.random.key(1)


def run(attack, logits_fn, x, y, key=KEY):
  return jax.jit(attack, static_argnums=0)(logits_fn, x, y, key)


def uniform(seed, shape, low=0.0, high=1.0):
  return np.random.default_rng(seed).uniform(low, high, shape).astype(np.float32)


def linear(w, b):
  """Logits x . w + b: w [d, K], b [K]."""
  w, b = jnp.asarray(w), jnp.asarray(b)
  return lambda x: x.reshape(x.shape[0], -1) @ w + b


def mlp(num_classes=5, inputs=48, seed=0):
  rng = np.random.default_rng(seed)
  w1 = jnp.asarray(4 * rng.standard_normal((inputs, 16)) / np.sqrt(inputs), jnp.float32)
  w2 = jnp.asarray(rng.standard_normal((16, num_classes)), jnp.float32)
  return lambda x: jnp.tanh(x.reshape(x.shape[0], -1) @ w1 - 1) @ w2


def size(x_adv, x, norm):
  d = np.asarray(x_adv - x).reshape(len(x), -1)
  return np.abs(d).max(1) if norm == "linf" else np.linalg.norm(d, axis=1)


def minimal_distance(w, b, x, y, norm):
  """The exact smallest perturbation (in `norm`) that makes a linear
  classifier misclassify x inside the box: the closest of the half-spaces
  {z_j >= z_y}, each by scipy (an LP for L-inf, a QP for L2)."""
  out = []
  for xi, yi in zip(x.reshape(len(x), -1).astype(np.float64), y):
    best = np.inf
    for j in range(w.shape[1]):
      if j == yi:
        continue
      v = (w[:, j] - w[:, yi]).astype(np.float64)
      c = -(v @ xi + b[j] - b[yi])  # need v . d >= c
      bounds = [(-t, 1 - t) for t in xi]
      n = len(xi)
      if norm == "linf":
        res = scipy.optimize.linprog(
          np.r_[np.zeros(n), 1.0],
          A_ub=np.vstack(
            [
              np.hstack([np.eye(n), -np.ones((n, 1))]),
              np.hstack([-np.eye(n), -np.ones((n, 1))]),
              np.r_[-v, 0.0][None],
            ]
          ),
          b_ub=np.r_[np.zeros(2 * n), -c],
          bounds=bounds + [(0, None)],
        )
        if res.status == 0:
          best = min(best, res.x[-1])
      else:
        res = scipy.optimize.minimize(
          lambda d: d @ d,
          np.zeros(n),
          jac=lambda d: 2 * d,
          bounds=bounds,
          constraints=[
            {"type": "ineq", "fun": lambda d, v=v, c=c: v @ d - c, "jac": lambda d, v=v: v}
          ],
          method="SLSQP",
          options={"ftol": 1e-14, "maxiter": 500},
        )
        if res.success and v @ res.x >= c - 1e-7 * abs(c):
          best = min(best, np.linalg.norm(res.x))
    out.append(best)
  return np.array(out)


@pytest.fixture(scope="module")
def near_boundary():
  """A 48-pixel, 5-class linear model and 40 images at most 0.1 (L2) from
  misclassification, with their exact minimal L2 and L-inf distances."""
  rng = np.random.default_rng(1)
  w = rng.standard_normal((48, 5)).astype(np.float32)
  b = rng.standard_normal(5).astype(np.float32)
  x = rng.uniform(0.2, 0.8, (400, 48)).astype(np.float32)
  y = np.asarray(jnp.argmax(linear(w, b)(x), -1))
  l2 = minimal_distance(w, b, x, y, "l2")
  near = np.flatnonzero(l2 < 0.1)[:40]
  x, y = x[near].reshape(-1, 4, 4, 3), y[near]
  return w, b, x, y, {"l2": l2[near], "linf": minimal_distance(w, b, x, y, "linf")}


# --- losses and APGD-T ---------------------------------------------------------


def test_targeted_dlr_by_hand():
  z = jnp.array([3.0, 1.0, 0.0, -1.0])
  # y = 0, t = 1: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)
  np.testing.assert_allclose(A.losses.dlr_t(z, 0, 1), -(3 - 1) / (3 - (0 - 1) / 2), rtol=1e-6)
  np.testing.assert_allclose(A.losses.dlr_t(z, 2, 3), -(0 + 1) / 3.5, rtol=1e-6)
  np.testing.assert_allclose(
    A.losses.dlr_t(7 * z - 2, 0, 1), A.losses.dlr_t(z, 0, 1), rtol=1e-6
  )  # shift and scale invariant


def test_apgd_t_targets_and_success_rule():
  # Four classes on 16 pixels, only pixel 0 matters: z = (0, x0 - 0.6,
  # 2 x0 - 1.15, -5). At x0 = 0.5 class 0 wins and the targets, by clean
  # logit, are 1, 2, 3. Towards target 1 the attack raises x0, and at
  # x0 = 0.6 class 2 wins: a success (misclassified), though not the target.
  w = np.zeros((16, 4), np.float32)
  w[0, 1], w[0, 2] = 1.0, 2.0
  b = np.array([0.0, -0.6, -1.15, -5.0], np.float32)
  logits_fn = linear(w, b)
  x = uniform(0, (6, 4, 4, 1))
  x[:, 0, 0, 0] = 0.5
  y = np.zeros(6, np.int32)
  np.testing.assert_array_equal(np.argsort(-np.asarray(logits_fn(x)), -1)[:, :3], [[0, 1, 2]] * 6)
  key = jax.random.key(3)
  one = np.asarray(run(A.apgd_t(eps=0.1, steps=10, num_targets=1), logits_fn, x, y, key))
  np.testing.assert_array_equal(np.asarray(jnp.argmax(logits_fn(one), -1)), 2)
  np.testing.assert_allclose(one[:, 0, 0, 0], 0.6, atol=TOL)
  # The first success stays: more targets change nothing here.
  three = run(A.apgd_t(eps=0.1, steps=10, num_targets=3), logits_fn, x, y, key)
  np.testing.assert_array_equal(three, one)
  # Where no target succeeds (eps too small), the ball and the box still hold.
  none = run(A.apgd_t(eps=0.02, steps=10, num_targets=3), logits_fn, x, y, key)
  assert np.all(np.asarray(jnp.argmax(logits_fn(none), -1)) == 0)
  assert np.all(size(none, x, "linf") <= 0.02 + TOL)


def test_apgd_t_needs_four_classes():
  with pytest.raises(checks.InputError, match="apgd_t needs >= 4 classes, the model has 3"):
    A.apgd_t(eps=0.1)(
      mlp(num_classes=3), uniform(0, (2, 4, 4, 3)), np.array([0, 1]), jax.random.key(0)
    )


# --- FAB -----------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_hyperplane_projection_is_the_exact_optimum(norm):
  rng = np.random.default_rng(0)
  for trial in range(30):
    t = rng.uniform(0, 1, 8)
    w = rng.standard_normal(8)
    w[trial % 8] = 0.0 if trial % 3 == 0 else w[trial % 8]
    b = w @ t + rng.standard_normal() * 0.5
    d = np.asarray(
      project_onto_hyperplane(
        jnp.asarray(t, jnp.float32), jnp.asarray(w, jnp.float32), jnp.float32(b), norm
      )
    )
    assert np.all(t + d >= -1e-6) and np.all(t + d <= 1 + 1e-6)
    side = np.sign(b - w @ t)  # the half-space beyond the hyperplane, seen from t
    exact = minimal_distance(
      side * w[:, None] * np.array([[0.0, 1.0]]),
      np.array([0.0, -side * b]),
      t[None],
      np.array([0]),
      norm,
    )[0]
    reachable = np.isfinite(exact)
    if reachable:  # on the hyperplane, at the minimal distance
      np.testing.assert_allclose(w @ (t + d), b, atol=1e-4)
      np.testing.assert_allclose(
        np.abs(d).max() if norm == "linf" else np.linalg.norm(d), exact, rtol=1e-4, atol=1e-6
      )
    else:  # the box's point on the hyperplane's side that is closest to it
      np.testing.assert_allclose(
        d, np.where(w * np.sign(b - w @ t) > 0, 1 - t, np.where(w != 0, -t, 0.0)), atol=1e-6
      )


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_minimal_norm_attacks_reach_the_minimum(near_boundary, norm):
  w, b, x, y, minimal = near_boundary
  logits_fn = linear(w, b)
  attacks = {"fab": A.fab(norm=norm, steps=100), "fab_t": A.fab_t(norm=norm, steps=100)}
  if norm == "l2":
    attacks["cw_l2"] = A.cw_l2()  # the defaults
  for name, attack in attacks.items():
    x_adv = run(attack, logits_fn, x, y)
    assert not np.any(np.asarray(jnp.argmax(logits_fn(x_adv), -1)) == y), name
    ratio = size(x_adv, x, norm) / minimal[norm]
    assert ratio.min() >= 1 - 1e-4, name  # nothing beats the optimum
    assert np.median(ratio) <= 1.01 and np.percentile(ratio, 90) <= 1.05, (
      name,
      np.median(ratio),
      np.percentile(ratio, 90),
    )


def test_cw_paper_schedule_oscillates(near_boundary):
  # The paper's constant learning rate: the same model, far from the minimum.
  w, b, x, y, minimal = near_boundary
  x_adv = run(A.cw_l2(schedule="constant", overshoot=0.0), linear(w, b), x, y)
  assert np.percentile(size(x_adv, x, "l2") / minimal["l2"], 90) > 1.05


@pytest.mark.parametrize("norm, eps", [("linf", 0.05), ("l2", 0.3)])
def test_fab_with_eps_keeps_ball_and_box(norm, eps):
  logits_fn = mlp()
  x = np.round(uniform(2, (6, 4, 4, 3)) * 2) / 2  # pixels at the box's faces
  y = np.asarray(jnp.argmax(logits_fn(x), -1))
  for attack in (
    A.fab(norm=norm, eps=eps, steps=20, restarts=2),
    A.fab_t(norm=norm, eps=eps, steps=20, num_targets=2),
  ):
    x_adv = np.asarray(run(attack, logits_fn, x, y))
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert np.all(size(x_adv, x, norm) <= eps * (1 + TOL))
    moved = size(x_adv, x, norm) > 0
    assert np.all(np.asarray(jnp.argmax(logits_fn(x_adv), -1))[moved] != y[moved])


# --- Square --------------------------------------------------------------------


def test_square_eta_pattern():
  for s in (1, 2, 5, 6, 9):
    eta = _eta(s)
    np.testing.assert_allclose(np.linalg.norm(eta), 1.0, rtol=1e-6)
    if s > 1:  # opposite signs in the two halves, nested rectangles in each
      assert np.all(eta[: s // 2] >= 0) and np.all(eta[s // 2 :] <= 0)
      assert eta[s // 4, s // 2] == eta[: s // 2].max()


def test_square_with_no_queries_returns_its_start():
  # queries counts the candidates after the start (as the authors' n_queries):
  # with none, the L-inf start, vertical stripes x + eps s, s = +-1 per
  # column and channel.
  logits_fn = mlp()
  x = uniform(0, (4, 4, 4, 3), 0.3, 0.7)
  y = np.asarray(jnp.argmax(logits_fn(x), -1))
  d = np.asarray(run(A.square(eps=0.1, queries=0), logits_fn, x, y)) - x
  np.testing.assert_allclose(np.abs(d), 0.1, rtol=1e-5)
  np.testing.assert_array_equal(np.sign(d), np.sign(d[:, :1]) * np.ones((1, 4, 1, 1)))


def test_square_finds_the_sign_vertex_of_a_linear_model():
  # Logits [0, w . x - 100]: never fooled, so the search keeps lowering the
  # margin, whose minimum over the L-inf ball is at x + eps sign(w). The
  # model reads the pixels the squares reach (the authors' corners leave the
  # last row and column to squares that fill the image).
  w = np.random.default_rng(0).standard_normal((4, 4, 3)).astype(np.float32)
  w[-1, :] = w[:, -1] = 0
  w = w.reshape(48, 1)
  logits_fn = linear(np.hstack([np.zeros_like(w), w]), np.array([0.0, -100.0], np.float32))
  x = uniform(1, (4, 4, 4, 3), 0.3, 0.7)
  y = np.zeros(4, np.int32)
  x_adv = run(A.square(eps=0.1, queries=1500), logits_fn, x, y)
  vertex = x + 0.1 * np.sign(w).reshape(4, 4, 3)
  np.testing.assert_allclose(x_adv[:, :-1, :-1], vertex[:, :-1, :-1], atol=TOL)


@pytest.mark.parametrize("norm, eps", [("linf", 0.05), ("l2", 0.5)])
def test_square_keeps_ball_and_box(norm, eps):
  logits_fn = mlp()
  x = np.round(uniform(2, (6, 8, 8, 3)) * 2) / 2
  y = np.asarray(jnp.argmax(logits_fn(x[:, :4, :4]), -1))
  model = lambda x: logits_fn(x[:, :4, :4])
  x_adv = np.asarray(run(A.square(norm=norm, eps=eps, queries=100, restarts=2), model, x, y))
  assert x_adv.min() >= 0 and x_adv.max() <= 1
  assert np.all(size(x_adv, x, norm) <= eps * (1 + TOL))
  assert size(x_adv, x, norm).min() > 0


# --- the suite as a cascade -------------------------------------------------------


def tiny_suite(norm="linf", eps=0.04, version="standard"):
  return A.autoattack(norm=norm, eps=eps, version=version, steps=5, queries=30, num_targets=3)


def test_autoattack_versions_and_spec():
  assert [s.label for s in tiny_suite().stages] == ["apgd-ce", "apgd-t", "fab-t", "square"]
  assert [s.label for s in tiny_suite(version="plus").stages] == [
    "apgd-ce",
    "apgd-dlr",
    "fab",
    "square",
    "apgd-t",
    "fab-t",
  ]
  rand = tiny_suite(version="rand")
  assert [s.label for s in rand.stages] == ["apgd-ce", "apgd-dlr"] and rand.stochastic
  standard = A.autoattack(eps=8 / 255)
  assert [
    (s.options.get("steps"), s.options.get("num_targets"), s.options.get("queries"))
    for s in standard.stages
  ] == [(100, None, None), (100, 9, None), (100, 9, None), (None, None, 5000)]
  assert A.create(**standard.spec) == standard
  assert standard.norm == "linf" and standard.eps == pytest.approx(8 / 255)


MLP = mlp(seed=3)


def apply_mlp(variables, x):
  return MLP(x) * variables["scale"]


@pytest.fixture(scope="module")
def problem():
  x = uniform(5, (24, 4, 4, 3))
  variables = {"scale": jnp.float32(1.0)}
  y = np.array(jnp.argmax(apply_mlp(variables, x), -1))
  y[:3] = (y[:3] + 1) % 5  # three examples misclassified clean
  return variables, x, y


def test_cascade_equals_every_attack_on_every_example(problem):
  variables, x, y = problem
  suite = tiny_suite()
  key = jax.random.key(7)
  clean, outcomes = evaluation.run(apply_mlp, variables, x, y, {"aa": suite}, key=key, batch_size=8)
  # Every stage on every example: the suite called as one attack.
  keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.fold_in(key, 0), jnp.arange(24))
  x_all = run(suite, lambda xb: apply_mlp(variables, xb), x, y, keys)
  robust_all = clean & (np.asarray(jnp.argmax(apply_mlp(variables, x_all), -1)) == y)
  o = outcomes["aa"]
  np.testing.assert_array_equal(o.robust, robust_all)
  assert 0 < o.robust.sum() < clean.sum()  # the attacks broke some, not all
  first_rounds = [[j for j, *_ in evaluation.rounds(suite)].index(j) for j in range(4)]
  assert o.attacked[first_rounds].sum() < 4 * clean.sum()  # later stages skipped broken ones
  assert np.all(o.attacked[1:].sum(1) <= o.attacked[:-1].sum(1))
  # APGD-T and FAB-T ran target by target, each on what the targets before it
  # left robust.
  for stage in (1, 2):
    stage_rounds = [r for r, (j, *_) in enumerate(evaluation.rounds(suite)) if j == stage]
    assert len(stage_rounds) == suite.stages[stage].options["num_targets"] > 1


def test_report_of_a_cascade(problem):
  variables, x, y = problem
  rep = evaluation.evaluate(
    apply_mlp,
    variables,
    x,
    y,
    {"aa": tiny_suite(), "pgd_l2": dict(name="pgd", norm="l2", eps=0.3, steps=3)},
    key=jax.random.key(7),
    batch_size=8,
  )
  aa, pgd = rep["results"]
  assert [s["stage"] for s in aa["stages"]] == ["apgd-ce", "apgd-t", "fab-t", "square"]
  accuracies = [s["accuracy"] for s in aa["stages"]]
  assert accuracies == sorted(accuracies, reverse=True) and accuracies[-1] == aa["accuracy"]
  assert aa["max_perturbation"] <= 0.04 * (1 + 1e-4) and aa["outside_ball"] == 0
  assert pgd["attacked"] == round(rep["clean_accuracy"] * 24)  # its own threat model
  assert {(t["norm"], t["eps"]) for t in rep["threat_models"]} == {("linf", 0.04), ("l2", 0.3)}
  assert rep["worst_case_accuracy"] <= min(aa["accuracy"], pgd["accuracy"])
  rb = evaluation.robustbench_report(rep, "aa")
  assert rb["threat_model"] == "Linf" and rb["robust_acc"] == pytest.approx(100 * aa["accuracy"])
  assert list(rb["stages"]) == ["apgd-ce", "apgd-t", "fab-t", "square"]


@pytest.mark.slow  # a minute's equivalence run: .ci/run runs it after the fast suite
def test_results_do_not_depend_on_batch_size_or_devices(problem):
  variables, x, y = problem
  attacks = {"aa": tiny_suite()}
  a = evaluation.run(
    apply_mlp,
    variables,
    x,
    y,
    attacks,
    key=jax.random.key(1),
    batch_size=4,
    mesh=jr.parallel.mesh(jax.devices()[:1]),
  )[1]["aa"]
  b = evaluation.run(
    apply_mlp,
    variables,
    x,
    y,
    attacks,
    key=jax.random.key(1),
    batch_size=24,
    mesh=jr.parallel.mesh(jax.devices()[:2]),
  )[1]["aa"]
  np.testing.assert_array_equal(a.robust, b.robust)
  np.testing.assert_array_equal(a.fooled_by, b.fooled_by)


class Interrupt(Exception):
  pass


def test_resumed_evaluation_equals_an_uninterrupted_one(problem, tmp_path):
  variables, x, y = problem
  attacks = {"aa": tiny_suite(), "pgd": dict(name="pgd", eps=0.05, steps=2)}
  evaluate = lambda **kw: evaluation.evaluate(
    apply_mlp, variables, x, y, attacks, key=jax.random.key(2), batch_size=4, **kw
  )
  whole = evaluate()
  state = tmp_path / "eval_state.npz"
  calls = []

  def stop_after_two(message):
    calls.append(message)
    if len(calls) == 2:  # after the second stage
      raise Interrupt

  with pytest.raises(Interrupt):
    evaluate(state_path=state, log=stop_after_two)
  assert state.exists()
  resumed = evaluate(state_path=state)
  for a, b in zip(whole["results"], resumed["results"]):
    assert a["accuracy"] == b["accuracy"] and a["stages"][-1] == {
      **b["stages"][-1],
      "seconds": a["stages"][-1]["seconds"],
    }
  assert whole["worst_case_accuracy"] == resumed["worst_case_accuracy"]
  # A state file belongs to its evaluation: another model is refused, and the
  # file is left as it was.
  before = state.read_bytes()
  with pytest.raises(checks.InputError, match="belongs to another evaluation.*model"):
    evaluation.evaluate(
      apply_mlp,
      {**variables, "scale": jnp.float32(2.0)},
      x,
      y,
      attacks,
      key=jax.random.key(2),
      batch_size=4,
      state_path=state,
    )
  assert state.read_bytes() == before


def test_evaluation_compiles_each_attack_once(problem):
  # One compiled program per (attack, batch shape): other eps values (a
  # sweep, the sanity checks) and repeated calls reuse it.
  variables, x, y = problem
  chex.clear_trace_counter()
  traced = []

  @jax.custom_jvp
  def counted(z):
    return z

  counted.defjvp(lambda primals, tangents: (primals[0], tangents[0]))

  def apply_counted(variables, xb):
    traced.append(xb.shape)
    return apply_mlp(variables, counted(xb))

  for eps in (0.05, 0.1, 0.2):
    evaluation.evaluate(
      apply_counted,
      variables,
      x,
      y,
      {"pgd": dict(name="pgd", eps=eps, steps=2)},
      key=jax.random.key(0),
      batch_size=8,
    )
  first = len(traced)
  evaluation.evaluate(
    apply_counted,
    variables,
    x,
    y,
    {"pgd": dict(name="pgd", eps=0.3, steps=2)},
    key=jax.random.key(0),
    batch_size=8,
  )
  assert first > 0 and len(traced) == first


# --- gradient masking ------------------------------------------------------------

MASKED_W = np.random.default_rng(0).standard_normal((48, 4)).astype(np.float32)


def masked(variables, x):
  """A linear model behind `round`, whose gradient is 0 everywhere."""
  rounded = jnp.round(x.reshape(x.shape[0], -1) * 255) / 255
  return (rounded - 0.5) @ MASKED_W * variables["scale"]


def test_masked_gradients_are_flagged_and_square_breaks_them():
  variables = {"scale": jnp.float32(1.0)}
  x = uniform(3, (400, 4, 4, 3), 0.2, 0.8)
  logits = np.asarray(masked(variables, x))
  y = logits.argmax(1)
  runner_up = np.argsort(-logits, 1)[:, 1]
  margin = logits[np.arange(400), y] - logits[np.arange(400), runner_up]
  reach = 0.05 * np.abs(MASKED_W[:, y] - MASKED_W[:, runner_up]).sum(0)  # the sign vertex
  keep = margin < 0.5 * reach  # the vertex breaks them; a random start rarely does
  x, y = x[keep][:24], y[keep][:24]
  assert len(x) == 24
  model = sanity.model_checks(masked, variables, x, y)
  assert not next(c for c in model if "gradients" in c["check"])["passed"]
  suite = A.autoattack(eps=0.05, steps=10, queries=300, num_targets=3)
  rep = evaluation.evaluate(
    masked, variables, x, y, {"aa": suite}, key=jax.random.key(0), batch_size=24
  )
  stages = {s["stage"]: s["accuracy"] for s in rep["results"][0]["stages"]}
  assert stages["fab-t"] > 0.5  # the gradient attacks see nothing ...
  assert stages["square"] < stages["fab-t"] - 0.3  # ... Square breaks the model
  flagged = sanity.attack_checks(rep, None, {}, x.shape[1:])
  assert not next(c for c in flagged if "square" in c["check"])["passed"]


def test_model_checks_flag_probabilities():
  softmax = lambda v, x: jax.nn.softmax(x.reshape(x.shape[0], -1)[:, :3] * v)
  x = uniform(0, (8, 4, 4, 1))
  y = np.zeros(8, np.int32)
  results = sanity.model_checks(softmax, 2.0, x, y)
  assert not next(c for c in results if "probabilities" in c["check"])["passed"]
  assert next(c for c in results if "agree" in c["check"])["passed"]


# --- bad input ---------------------------------------------------------------------


@pytest.mark.parametrize(
  "build, message",
  [
    (lambda: A.autoattack(eps=0.1, version="strong"), "unknown version 'strong'"),
    (lambda: A.autoattack(eps=-0.1), "eps must be a finite number > 0, got -0.1"),
    (lambda: A.autoattack(eps=float("nan")), "eps must be a finite number > 0, got nan"),
    (lambda: A.autoattack(eps=0.1, norm="l3"), "unknown norm 'l3'"),
    (lambda: A.square(eps=0.1, queries=-1), "queries must be an integer >= 0, got -1"),
    (lambda: A.square(eps=0.1, p_init=0.0), r"p_init must lie in \(0.0, 1.0\]"),
    (lambda: A.fab(eta=0.5), "eta must be a number >= 1, got 0.5"),
    (lambda: A.fab(beta=1.5), r"beta must lie in \[0.0, 1.0\]"),
    (lambda: A.fab_t(num_targets=0), "num_targets must be an integer >= 1, got 0"),
    (lambda: A.apgd_t(eps=0.1, num_targets=0), "num_targets"),
    (lambda: A.cw_l2(schedule="linear"), "unknown schedule 'linear'"),
    (lambda: A.cw_l2(overshoot=-1.0), "overshoot must be a finite number >= 0"),
  ],
)
def test_bad_settings(build, message):
  with pytest.raises(checks.InputError, match=message):
    build()


def test_loop_until_gives_the_full_loop_result_and_stops_when_every_example_is_done():
  from jaxrobust.attacks import core

  calls = []

  def body(i, carry):  # adds i until the total reaches 10; a done carry stays
    jax.debug.callback(lambda: calls.append(1))
    return jnp.where(carry >= 10, carry, carry + i)

  start = jnp.array([0, 7, 3, 12])
  full = jax.vmap(lambda c: core.loop(0, 50, body, c, like=c))(start)
  calls.clear()
  early = jax.jit(jax.vmap(lambda c: core.loop_until(lambda s: s >= 10, 0, 50, body, c, like=c)))
  np.testing.assert_array_equal(early(start), full)
  np.testing.assert_array_equal(full, [10, 10, 13, 12])
  assert len(calls) == 5  # 0 + 1 + 2 + 3 + 4 = 10: the slowest example is done after 5 steps


@pytest.mark.slow  # a minute's equivalence run: .ci/run runs it after the fast suite
def test_the_l1_version_is_the_authors(problem):
  """AutoAttack standard in L1, as the reference's `_set_version` sets it:
  APGD-CE with 5 restarts and APGD-T with 5 targets, both with
  `use_largereps`, then FAB-T (9 targets) and Square, all in L1; and it
  evaluates within the L1 ball."""
  suite = A.autoattack(norm="L1", eps=1.0)
  assert [(s.label, s.norm) for s in suite.stages] == [
    ("apgd-ce", "l1"),
    ("apgd-t", "l1"),
    ("fab-t", "l1"),
    ("square", "l1"),
  ]
  apgd_ce, apgd_t, fab_t, _ = (s.options for s in suite.stages)
  assert apgd_ce["restarts"] == 5 and apgd_ce["use_largereps"]
  assert apgd_t["num_targets"] == 5 and apgd_t["use_largereps"]
  assert fab_t["num_targets"] == 9 and A.create(**suite.spec) == suite
  variables, x, y = problem
  tiny = A.autoattack(norm="l1", eps=1.0, steps=4, queries=20, num_targets=3)
  rep = evaluation.evaluate(apply_mlp, variables, x, y, {"aa": tiny}, key=jax.random.key(0))
  (row,) = rep["results"]
  assert row["norm"] == "l1" and row["outside_ball"] == 0
  assert row["max_perturbation"] is None or row["max_perturbation"] <= 1.0 * (1 + 1e-4)
  assert row["accuracy"] < rep["clean_accuracy"]
  assert evaluation.robustbench_report(rep, "aa")["threat_model"] == "L1"
