#!/usr/bin/env bash
# The JAX peer's environment for the benchmarks: Google's Tunix (`google-tunix`, JAX/Flax NNX) in its own
# virtualenv, because it pins its own jax/flax versions, which need not match rlhf_jax's. CPU jax only.
# Also torch (CPU) and transformers/safetensors: bench_tunix.py loads the same safetensors into Tunix's Llama.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
VERSION="${TUNIX_VERSION:-0.1.7}"
[ -x "$ROOT/.venv-tunix/bin/python" ] || "$PY" -m venv "$ROOT/.venv-tunix"
"$ROOT/.venv-tunix/bin/python" -m pip install -q -U pip
"$ROOT/.venv-tunix/bin/python" -m pip install -q "google-tunix==$VERSION" safetensors
"$ROOT/.venv-tunix/bin/python" -c "import tunix, jax, flax; print('[rlhf_jax] tunix env ready:', '$ROOT/.venv-tunix', 'jax', jax.__version__, 'flax', flax.__version__)"
