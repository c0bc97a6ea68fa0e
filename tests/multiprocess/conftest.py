"""The multi-process tests' shared helpers live in the sibling module ``_compare.py``; under
``--import-mode=importlib`` this folder goes on ``sys.path`` so each test file can ``import _compare``. The
``assets`` fixture (tiny model and task data) is registered here for every file of the folder (one build
per test session and worker)."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))

from _compare import assets  # noqa: E402,F401  (the session-scoped fixture)
