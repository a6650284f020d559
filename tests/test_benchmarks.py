"""The benchmark scripts' own checks (the benchmarks themselves run for minutes
and are run by hand: README, Performance)."""

import json
import subprocess
import sys

import jax
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
