# Sourced by launch/*.sh: create (once) and reuse a local virtualenv with rlhf_jax installed.
# Only Python 3 and pip are needed. RLHF_JAX_VENV overrides the location.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${RLHF_JAX_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
STAMP="$VENV/.rlhf_jax-installed"
EXTRAS="${RLHF_JAX_EXTRAS:-cpu,test}"
want="$(cat "$ROOT/pyproject.toml" "$ROOT/constraints.txt" | cksum | cut -d' ' -f1)-$EXTRAS"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[rlhf_jax] creating virtualenv at $VENV"
  "$PY" -m venv "$VENV"
fi
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
  echo "[rlhf_jax] installing rlhf_jax[$EXTRAS] (pinned by constraints.txt)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -c "$ROOT/constraints.txt" -e "$ROOT[$EXTRAS]"
  echo "$want" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
cd "$ROOT"
