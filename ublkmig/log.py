"""Structured logs: structlog to stderr, logfmt (``key=value``) or JSON lines.

One event per state change, named ``<thing>.<state>`` (``device.added``,
``device.started``, ``device.stopping``...), with the device id and whatever
else identifies it.  Nothing here writes to stdout: ``serve`` keeps stdout for
the device path.

structlog is imported on the first get_logger(), not by configure(): commands
that never log (list, stop) start faster, which shows in emulated kernel VMs.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

LEVELS = ("debug", "info", "warning", "error")
ENV_LEVEL = "UBLKMIG_LOG_LEVEL"
DEFAULT_LEVEL = "info"

_settings: dict[str, Any] = {"level": None, "json": False}
_configured = False


def configure(level: str | None = None, json: bool = False) -> None:
    """Choose the level (default: $UBLKMIG_LOG_LEVEL, then ``info``) and the format."""
    global _configured
    _settings.update(level=level, json=json)
    _configured = False


def _apply() -> None:
    import structlog

    name = (_settings["level"] or os.environ.get(ENV_LEVEL) or DEFAULT_LEVEL).lower()
    if name not in LEVELS:
        name = DEFAULT_LEVEL
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if _settings["json"]
        else structlog.processors.LogfmtRenderer(
            key_order=["timestamp", "level", "event"], bool_as_flag=False
        )
    )

    def stderr_logger(*_args: Any) -> Any:
        # sys.stderr looked up per logger, so redirections (pytest's capsys) apply
        return structlog.PrintLogger(file=sys.stderr)

    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(name.upper())),
        logger_factory=stderr_logger,
        cache_logger_on_first_use=False,
    )


def get_logger(**initial: Any) -> Any:
    """A bound logger (``log.info("device.added", id=0, ...)``)."""
    global _configured
    import structlog

    if not _configured:
        _apply()
        _configured = True
    return structlog.get_logger(**initial)
