"""The library's logger, ``logging.getLogger("simple_generation")``.

Messages (the initialization summary, placement decisions, notices) are INFO. When the application has
configured logging (any handler on the root logger), they go through it like any library's. When it has
not, they are shown on stderr anyway, so a user running a script sees what was loaded where. Quiet them
with ``logging.getLogger("simple_generation").setLevel(logging.WARNING)`` or the environment variable
``SIMPLE_GENERATION_LOG_LEVEL=WARNING``.
"""

from __future__ import annotations

import logging
import os

LOGGER_NAME = "simple_generation"


class _FallbackHandler(logging.StreamHandler):
    """Writes to stderr only while the root logger has no handler (else propagation shows the record)."""

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers:
            return
        super().emit(record)


def setup_library_logger() -> logging.Logger:
    logger = logging.getLogger(LOGGER_NAME)
    if not any(isinstance(h, _FallbackHandler) for h in logger.handlers):
        handler = _FallbackHandler()
        handler.setFormatter(logging.Formatter("simple_generation: %(message)s"))
        logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        level = os.environ.get("SIMPLE_GENERATION_LOG_LEVEL", "INFO").upper()
        logger.setLevel(level if level in logging.getLevelNamesMapping() else logging.INFO)
    return logger
