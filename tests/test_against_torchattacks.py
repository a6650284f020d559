"""Opt-in (`-m slow`): jaxrobust's AutoAttack against torchattacks' on the same
weights and the same 1,000 CIFAR-10 test images (`benchmarks/autoattack.py`):
robust accuracies within 0.5 percentage points, for a naturally and an
adversarially trained `seed_cnn`, in L-infinity and L2. Trains both models
(cached under runs/bench/) on first use: about 10 minutes on 2 CPU cores,
then about half an hour for the attacks."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CIFAR10 = ROOT.parent / "shared" / "data" / "cifar10"

torch = pytest.importorskip("torch")
pytest.importorskip("torchattacks")


@pytest.mark.slow
@pytest.mark.shared_data
@pytest.mark.skipif(not CIFAR10.is_dir(), reason="no shared/data/cifar10")
def test_autoattack_agrees_with_torchattacks():
  from benchmarks import autoattack  # pylint: disable=g-import-not-at-top

  results = autoattack.main(["--images", "1000"])
  assert len(results) == 4
  for r in results:
    assert r["logit_gap"] < 1e-4
    assert abs(r["difference"]) <= 0.005, r
