#!/usr/bin/env bash
# The whole test suite (slow end-to-end tests included). Extra args go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
exec python -m pytest -q -p no:cacheprovider "$@"
