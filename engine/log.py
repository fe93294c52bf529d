"""The engine's logger: one-line ``[engine] ...`` messages on stderr for the facts a user needs to see.

Recipes run as scripts and configure no logging, so INFO records would be dropped; the first call adds a
stderr handler to the ``engine`` logger unless the application (or pytest) already put a handler on the root
logger, in which case records propagate there as usual.
"""

from __future__ import annotations

import logging
import sys

LOGGER_NAME = "engine"


def get_logger() -> logging.Logger:
    logger = logging.getLogger(LOGGER_NAME)
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[engine] %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    return logger


#: third-party loggers whose import-time warnings say nothing about a run: bitsandbytes (imported by peft)
#: warns on every import on AVX512-BF16 CPUs that it could not fetch an optional kernel from a hub
QUIET_LOGGERS = ("bitsandbytes.backends.cpu.ops",)


def quiet_third_party_imports() -> None:
    """Raise the named loggers to ERROR so their import-time warnings do not open every recipe's output."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
