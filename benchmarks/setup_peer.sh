#!/usr/bin/env bash
# The peer's environment for the benchmarks: TRL on PyTorch (CPU), in its own virtualenv so that it never
# touches rlhf_jax's. TRL 1.12 (the last release with PPOTrainer) goes to .trl112 for benchmarks/ppo.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
[ -x "$ROOT/.venv-trl/bin/python" ] || "$PY" -m venv "$ROOT/.venv-trl"
"$ROOT/.venv-trl/bin/python" -m pip install -q torch==2.13.0 trl==1.16.0 transformers datasets tokenizers peft==0.21.2
"$ROOT/.venv-trl/bin/python" -m pip install -q --no-deps --target "$ROOT/.trl112" trl==1.12.0
echo "[rlhf_jax] peer env ready: $ROOT/.venv-trl (trl 1.16), $ROOT/.trl112 (trl 1.12, PPO only)"
