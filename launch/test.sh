#!/usr/bin/env bash
# The whole test suite (slow end-to-end tests included), one pytest worker per core (pytest-xdist; a test
# file stays on one worker so its module-scoped compiled fixtures are built once). Extra args go to pytest,
# e.g. `bash launch/test.sh tests/ops -n 0`.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
# libtpu for `rlhf-jax plan`'s TPU-topology test, in its own folder (found through RLHF_JAX_LIBTPU_DIR by the
# plan's compile process only): no other test process imports it. Pinned by constraints.txt.
export RLHF_JAX_LIBTPU_DIR="${RLHF_JAX_LIBTPU_DIR:-$PWD/.libtpu}"
if [ ! -d "$RLHF_JAX_LIBTPU_DIR/libtpu" ]; then
  echo "[rlhf_jax] installing libtpu into $RLHF_JAX_LIBTPU_DIR (for the plan tests)"
  python -m pip install -q --no-deps --target "$RLHF_JAX_LIBTPU_DIR" "$(grep -E '^libtpu==' constraints.txt)" \
    || echo "[rlhf_jax] WARNING: libtpu could not be installed: the v5e plan test will be skipped" >&2
fi
workers="${RLHF_JAX_TEST_WORKERS:-$(python -c 'import os; print(max(1, min(4, os.cpu_count() or 1)))')}"
exec python -m pytest -q -p no:cacheprovider -n "$workers" --dist loadfile --durations=25 "$@"
