"""The benchmark scripts' own checks (the benchmarks themselves run for minutes
and are run by hand: docs/performance.md)."""

import json
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import ROOT, program_env


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the refusal on a CPU machine")
def test_gpu_script_refuses_a_machine_without_a_gpu_and_writes_nothing(tmp_path):
  out = tmp_path / "gpu"
  done = subprocess.run(
    ["bash", str(ROOT / "benchmarks" / "gpu.sh"), str(out)],
    capture_output=True,
    text=True,
    env=program_env(),
    timeout=120,
  )
  assert done.returncode == 2, done.stderr
  assert "needs a GPU" in done.stderr or "needs jax and torch" in done.stderr
  assert "Traceback" not in done.stderr
  assert not out.exists()


@pytest.mark.slow  # two processes that start JAX and compile: ~45 s
def test_peak_memory_probe_reports_xla_temporaries_that_do_not_grow_with_the_steps():
  def probe(steps):
    done = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "peak_memory.py"), "--side=jaxrobust"]
      + [f"--steps={steps}", "--batch=8"],
      capture_output=True,
      text=True,
      env=program_env(),
      timeout=300,
      check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])

  few, many = probe(2), probe(20)
  assert few["xla_temp_mib"] == many["xla_temp_mib"] > 0
  assert few["resident_before_mib"] > 0 and few["second_call_peak_above_mib"] >= 0


class _ConvBatchNorm(nn.Module):
  """Convolution, BatchNorm, ReLU, global average, dense: what mixed precision touches."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(8, (3, 3), use_bias=False)(x)  # before BatchNorm, as in ResNets
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    return nn.Dense(3)(nn.relu(x).mean(axis=(1, 2)))


def test_in_dtype_computes_in_bfloat16_and_keeps_everything_it_returns_float32():
  from benchmarks.run import InDtype

  model = _ConvBatchNorm()
  x = jax.random.uniform(jax.random.key(1), (8, 16, 16, 3))
  y = jnp.arange(8) % 3
  variables = model.init(jax.random.key(0), x)
  mixed = InDtype(model, jnp.bfloat16)
  # The computation itself runs in bfloat16: its convolution says so.
  hlo = jax.jit(lambda v, x: mixed.apply(v, x, train=False)).lower(variables, x).as_text()
  (convolution,) = [line for line in hlo.splitlines() if "convolution" in line]
  assert convolution.count("xbf16>") == 3  # input, kernel and output
  logits = mixed.apply(variables, x, train=False)
  exact = model.apply(variables, x, train=False)
  assert logits.dtype == jnp.float32
  assert jnp.allclose(logits, exact, atol=0.02 * float(jnp.abs(exact).max()))
  assert not jnp.array_equal(logits, exact)  # rounded: it did compute in bfloat16

  # Training: the parameters' gradient and the updated batch statistics come
  # back float32, each leaf float32's within bfloat16 rounding (the kernel's
  # gradient through BatchNorm's centring loses the most: about 7 % here).
  def loss(apply, params):
    out, updates = apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(out, y).mean(), updates

  (_, updates), grads = jax.value_and_grad(lambda p: loss(mixed.apply, p), has_aux=True)(
    variables["params"]
  )
  (_, exact_updates), exact_grads = jax.value_and_grad(
    lambda p: loss(model.apply, p), has_aux=True
  )(variables["params"])
  for tree, exact_tree in ((grads, exact_grads), (updates, exact_updates)):
    assert jax.tree.structure(tree) == jax.tree.structure(exact_tree)
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(exact_tree)):
      assert a.dtype == jnp.float32
      assert 0 < float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) < 0.1
  assert mixed.init == model.init  # everything else is the model's


def test_torch_in_dtype_runs_under_autocast_and_returns_float32():
  torch = pytest.importorskip("torch")
  import jaxrobust as jr
  from benchmarks import torch_models
  from benchmarks.run import torch_in_dtype

  model = jr.models.create("small_cnn", num_classes=3, mean=(0.5,) * 3, std=(0.25,) * 3, width=4)
  x = jax.random.uniform(jax.random.key(1), (4, 8, 8, 3))
  net = torch_models.to_torch(model, model.init(jax.random.key(0), x), (8, 8))
  mixed = torch_in_dtype(torch, net, torch.bfloat16)
  seen = []
  net.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
  x_t = torch_models.nhwc_to_nchw(jax.device_get(x))
  with torch.no_grad():
    logits, exact = mixed(x_t), net(x_t)
  assert seen == [torch.bfloat16, torch.float32] and logits.dtype == torch.float32
  assert torch.allclose(logits, exact, atol=0.02 * float(exact.abs().max()))
  assert list(mixed.parameters()) == list(net.parameters())  # one set of weights to train


def test_a_bfloat16_row_holds_when_neither_sides_accuracy_moves_more_than_a_point():
  from benchmarks.run import in_dtype_row

  def row(jr_accuracy, pt_accuracy, examples, rate=100.0):
    agreement = {"jaxrobust": jr_accuracy, "pytorch": pt_accuracy, "examples": examples}
    return {
      "row": "pgd_linf",
      "label": "PGD",
      "jaxrobust": rate,
      "pytorch": rate / 2,
      "agreement": agreement,
    }

  float32 = row(0.40, 0.41, 1000)
  held = in_dtype_row(row(0.409, 0.401, 1000, rate=300.0), "bfloat16", float32)
  assert held["row"] == "pgd_linf_bfloat16" and held["label"] == "PGD [bfloat16]"
  v = held["versus_float32"]
  assert v["agreement_holds"] and v["speedup"] == {"jaxrobust": 3.0, "pytorch": 3.0}
  assert not in_dtype_row(row(0.40, 0.39, 1000), "bfloat16", float32)["versus_float32"][
    "agreement_holds"
  ]  # PyTorch's side moved 2 points
  # Few examples: one example's worth (here 1/24, about 4 points) is within.
  few = row(10 / 24, 10 / 24, 24)
  assert in_dtype_row(row(11 / 24, 9 / 24, 24), "bfloat16", few)["versus_float32"][
    "agreement_holds"
  ]
  assert not in_dtype_row(row(12 / 24, 10 / 24, 24), "bfloat16", few)["versus_float32"][
    "agreement_holds"
  ]
  assert "versus_float32" not in in_dtype_row(few, "bfloat16", None)  # no float32 twin ran


@pytest.mark.parametrize(
  "argv, message",
  [
    (["--dtypes", "float16"], "unknown dtype 'float16'"),
    (["--dtypes", "bfloat16", "--rows", "seed_network"], "row 'seed_network' runs in float32"),
  ],
)
def test_run_refuses_a_dtype_it_cannot_run(argv, message, capsys):
  from benchmarks.run import parse_args

  with pytest.raises(SystemExit) as exit_:
    parse_args(argv)
  assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_torch_baseline_starts_from_the_weights_train_py_starts_from(tiny_config, tmp_path):
  from benchmarks import torch_pgd_at  # pylint: disable=g-import-not-at-top
  from jaxrobust.training import config as config_lib  # pylint: disable=g-import-not-at-top
  from jaxrobust.training import checkpoints  # pylint: disable=g-import-not-at-top
  from jaxrobust.training import loop as experiment

  config = tiny_config(seed=3)
  state = experiment.train(config, tmp_path / "run", max_steps=0, progress=False)
  model, variables = torch_pgd_at.initial_model(config, config_lib.load_split(config, "train"))
  assert model == config_lib.build_model(checkpoints.load_config(tmp_path / "run"))
  leaves = jax.tree.leaves(variables["params"])
  assert len(leaves) == len(jax.tree.leaves(state.params))
  for ours, trained in zip(leaves, jax.tree.leaves(state.params), strict=True):
    assert np.array_equal(ours, trained)
  # Another seed starts elsewhere: the seed reaches the initialisation.
  config.seed = 4
  _, other = torch_pgd_at.initial_model(config, config_lib.load_split(config, "train"))
  assert not all(map(np.array_equal, jax.tree.leaves(other["params"]), leaves))


def test_reference_autoattack_reports_its_stages_and_agrees_with_jaxrobust():
  """benchmarks/autoattack.py's adapter of the authors' code (pyautoattack),
  on a linear model both implementations break the same way."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("pyautoattack")
  import jax
  import numpy as np

  from benchmarks import autoattack as bench
  from jaxrobust import attacks, evaluation

  rng = np.random.default_rng(0)
  w = rng.normal(size=(16, 10)).astype(np.float32)
  x = rng.uniform(size=(24, 1, 4, 4)).astype(np.float32)  # NCHW for PyTorch
  y = (x.reshape(24, -1) @ w).argmax(1)
  net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 10, bias=False))
  with torch.no_grad():
    net[1].weight.copy_(torch.from_numpy(w.T))
  robust, after, seconds = bench.reference_autoattack(
    torch, net, "linf", 0.05, torch.from_numpy(x), torch.from_numpy(y), 24, steps=10, queries=50
  )
  assert seconds > 0 and 1 <= len(after) <= 4
  assert after == sorted(after, reverse=True) and robust.mean() == pytest.approx(after[-1])
  rep = evaluation.evaluate(
    lambda v, xb: xb.reshape(len(xb), -1) @ v,
    w,
    x.transpose(0, 2, 3, 1),
    y,
    {"aa": attacks.autoattack(norm="linf", eps=0.05, steps=10, queries=50)},
    key=jax.random.key(0),
  )
  # Some examples survive eps 0.05, and the two agree on how many.
  assert 0 < robust.mean() < 1
  assert rep["results"][0]["accuracy"] == pytest.approx(robust.mean(), abs=1 / 24)
  table = bench.format_table(
    [
      {
        "model": "m",
        "norm": "linf",
        "eps": 0.3,
        "images": 24,
        "logit_gap": 0.0,
        "clean": 1.0,
        "jaxrobust": rep["results"][0]["accuracy"],
        "reference": float(robust.mean()),
        "jaxrobust_stages": [s["accuracy"] for s in rep["results"][0]["stages"]],
        "reference_stages": after,
        "jaxrobust_seconds": 2.0,
        "jaxrobust_compile_seconds": 1.0,
        "reference_seconds": seconds,
        "difference": 0.0,
        "speedup": seconds,
      }
    ]
  )
  assert "| n/a |" in table and "pyautoattack" in table


class _Ceiling:
  def sample(self):
    return 4.0


def test_time_in_turn_rotates_the_first_side_and_times_no_warm_up():
  from benchmarks.harness import time_in_turn

  calls = []
  sides = {k: (lambda i, k=k: calls.append((k, i)) or f"{k}{i}") for k in "abc"}
  first, times, outputs, ceilings = time_in_turn(sides, 3, _Ceiling())
  # The warm-up (run 0) of each side, then each round starts one side later.
  assert calls == [("a", 0), ("b", 0), ("c", 0)] + [
    ("b", 1), ("c", 1), ("a", 1), ("c", 2), ("a", 2), ("b", 2), ("a", 3), ("b", 3), ("c", 3)
  ]  # fmt: skip
  assert set(first) == set(times) == set("abc") and all(len(t) == 3 for t in times.values())
  assert outputs == {"a": "a0", "b": "b0", "c": "c0"} and ceilings == [4.0] * 3


def test_a_row_is_the_ratio_of_median_rates_with_compile_time_apart():
  from benchmarks.harness import make_row, time_alternately

  jax_times, torch_times, ceilings, jax_out, torch_out, compile_seconds = time_alternately(
    lambda i: i, lambda i: -i, 4, _Ceiling()
  )
  assert jax_out == [0, 1, 2, 3, 4] and torch_out == [0, -1, -2, -3, -4] and ceilings == [4.0] * 4
  assert len(jax_times) == len(torch_times) == 4
  row = make_row("r", "R", [1.0, 9.0, 2.0], [4.0, 4.0, 100.0], [4.0, 2.0, 8.0], 8, "images/s", 16, 32,
                 compile_seconds=3.0)  # fmt: skip
  assert row["jaxrobust"] == 4.0 and row["pytorch"] == 2.0 and row["ratio"] == 2.0
  assert row["compile_seconds"] == 3.0 and row["matmul_ceiling_flops"] == 4.0
  # FLOP/s over the median ceiling: 16 FLOP in 2 s, 32 in 4 s, against 4 FLOP/s.
  assert row["jaxrobust_ceiling_fraction"] == row["pytorch_ceiling_fraction"] == 2.0


def test_every_row_has_a_runner_and_the_dtype_rows_are_rows():
  from benchmarks import run
  from benchmarks.rows import RUNNERS

  assert tuple(RUNNERS) == run.ROWS and set(run.DTYPE_ROWS) <= set(run.ROWS)
  assert run.parse_args(["--rows", "pgd_linf, smoothing"]).rows == ("pgd_linf", "smoothing")


@pytest.mark.slow  # trains a model for 3 steps and times one row: a minute or two
def test_run_prints_the_table_and_writes_its_json(tmp_path):
  done = subprocess.run(
    [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--rows", "pgd_linf,smoothing"]
    + ["--repeats", "1", "--batch-size", "8", "--train-steps", "3", "--smoothing-draws", "16"]
    + ["--smoothing-images", "2", "--smoothing-batch", "8", "--data", str(tmp_path)]
    + ["--cache", str(tmp_path / "cache"), "--json", str(tmp_path / "bench.json")],
    capture_output=True,
    text=True,
    env=program_env(),
    timeout=900,
    check=True,
  )
  results = json.loads((tmp_path / "bench.json").read_text())
  assert [r["row"] for r in results["rows"]] == ["pgd_linf", "smoothing"]
  for r in results["rows"]:
    assert r["ratio"] == pytest.approx(r["jaxrobust"] / r["pytorch"])
    assert len(r["jaxrobust_seconds"]) == len(r["pytorch_seconds"]) == 1
    assert 0 <= r["agreement"]["jaxrobust"] <= 1 and 0 <= r["agreement"]["pytorch"] <= 1
  assert "| row | jaxrobust | PyTorch | ratio | jaxrobust compile (s) |" in done.stdout
  assert "| PGD-10 L-inf (eps 8/255, step 2/255, random start) |" in done.stdout
