#!/usr/bin/env bash
# The whole test suite (slow end-to-end tests included), one pytest worker per core (pytest-xdist; a test
# file stays on one worker so its module-scoped compiled fixtures are built once). Extra args go to pytest,
# e.g. `bash launch/test.sh tests/ops -n 0`.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
workers="${RLHF_JAX_TEST_WORKERS:-$(python -c 'import os; print(max(1, min(4, os.cpu_count() or 1)))')}"
exec python -m pytest -q -p no:cacheprovider -n "$workers" --dist loadfile --durations=25 "$@"
