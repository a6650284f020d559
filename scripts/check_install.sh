#!/usr/bin/env bash
# Installs jaxrobust as a user would and runs it from outside the repository:
# builds the wheel and the sdist, installs the wheel with the pinned
# requirements into a fresh virtual environment, then, from an empty
# directory, runs an attack from Python and the two console commands on the
# bundled digits. Needs only the package registry (the pins usually come
# from pip's cache). Usage: bash scripts/check_install.sh [python]
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
python="${1:-python3}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

"$python" -m venv "$work/build-env"
"$work/build-env/bin/pip" install --quiet build
"$work/build-env/bin/python" -m build --outdir "$work/dist" "$repo" > "$work/build.log"
ls "$work"/dist/jaxrobust-*.whl "$work"/dist/jaxrobust-*.tar.gz

"$python" -m venv "$work/env"
"$work/env/bin/pip" install --quiet -r "$repo/requirements.txt" "$work"/dist/jaxrobust-*.whl
mkdir "$work/elsewhere" && cd "$work/elsewhere"
"$work/env/bin/python" - <<'PY'
import jax, jax.numpy as jnp
import jaxrobust as jr
w = jax.random.normal(jax.random.key(0), (64, 10))
logits_fn = lambda x: x.reshape(len(x), -1) @ w
x, y = jr.data.load("digits", "test")
x, y = x[:32], y[:32]
attack = jr.attacks.pgd(norm="linf", eps=0.1, steps=5)
x_adv = attack(logits_fn, x, y, jax.random.key(1))
assert float(jnp.max(jnp.abs(x_adv - x))) <= 0.1 + 1e-6
print("jaxrobust", jr.__version__, "from", jr.__file__)
print("clean", float(jnp.mean(logits_fn(x).argmax(-1) == y)),
      "attacked", float(jnp.mean(logits_fn(x_adv).argmax(-1) == y)))
PY
"$work/env/bin/jaxrobust-train" --config natural --config.epochs=1 --workdir run --progress=false
"$work/env/bin/jaxrobust-eval" --workdir run --attacks pgd_linf --limit 100 --nosanity
echo "install check passed"
