#!/usr/bin/env bash
# The benchmarks on a GPU: jaxrobust against torchattacks, side by side, on
# one machine with an NVIDIA GPU, JAX with CUDA and a CUDA build of PyTorch.
#
#   pip install "jax[cuda12]" && pip install -r requirements-bench.txt  # torch: a CUDA build
#   pip install --no-deps torchattacks==3.5.1
#   bash benchmarks/gpu.sh [OUT]          # OUT defaults to runs/gpu
#
# Writes OUT/<name>.json and OUT/<name>.txt (the printed tables) for
#   preact      PreAct ResNet-18, batch 512: PGD-10, the PGD-7 training step,
#               smoothing's noise draws, AutoAttack on 512 images, each in
#               float32 and again in bfloat16 (mixed precision on both sides),
#               with a second table: bfloat16's speed-up over float32 and
#               whether the agreement column holds (neither side's accuracy
#               moves by more than a point);
#   wrn         WideResNet-28-10, batch 512: the same rows;
#   autoattack  benchmarks/autoattack.py on 1,000 CIFAR-10 test images.
# Each model is first trained briefly by benchmarks/run.py (cached).
# Each JAX program runs on every local GPU (the batch split over them), each
# PyTorch one on the first. It stops before running anything, exit code 2,
# when JAX or PyTorch does not see a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/gpu}

python - <<'EOF' || exit 2
import sys
try:
  import jax
  import torch
except ImportError as e:
  sys.exit(f"benchmarks/gpu.sh needs jax and torch: {e}")
problems = []
if jax.default_backend() != "gpu":
  problems.append(f"JAX runs on {jax.default_backend()!r}: install jax with CUDA")
if not torch.cuda.is_available():
  problems.append(f"PyTorch {torch.__version__} sees no CUDA device: install a CUDA build")
if problems:
  sys.exit("benchmarks/gpu.sh needs a GPU: " + "; ".join(problems))
print(f"jax {jax.__version__} on {jax.devices()}; torch {torch.__version__} on "
      f"{torch.cuda.get_device_name(0)}")
EOF

mkdir -p "$out"
run() {  # run NAME ARGS...: one benchmark, its JSON and its printed table in OUT
  local name=$1
  shift
  echo "== $name: $*"
  python "$@" --json "$out/$name.json" | tee "$out/$name.txt"
}
rows=pgd_linf,pgd_at_step,smoothing,autoattack
at512="--batch-size 512 --rows $rows --dtypes float32,bfloat16 --autoattack-images 512"
run preact benchmarks/run.py --model preact_resnet18 $at512
run wrn benchmarks/run.py --model wide_resnet $at512
run autoattack benchmarks/autoattack.py --images 1000
echo "wrote $out"
