"""Count XLA compilations by function name (JAX logs each lowering of a jitted function), so tests can
assert that nothing recompiles across iterations without instrumenting library code."""

from __future__ import annotations

import collections
import contextlib
import logging
import re

_LOGGER = "jax._src.interpreters.pxla"
_PATTERN = re.compile(r"^Compiling (\S+) with global shapes")


class _Counter(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.counts: collections.Counter = collections.Counter()

    def emit(self, record: logging.LogRecord) -> None:
        m = _PATTERN.match(record.getMessage())
        if m:
            self.counts[m.group(1)] += 1


@contextlib.contextmanager
def count_compiles():
    """``with count_compiles() as counts: ...`` → ``counts[name]`` = compilations of jitted ``name``."""
    logger = logging.getLogger(_LOGGER)
    handler, level = _Counter(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler.counts
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
