"""Structured logging: one JSON object per line, or a readable console when a person watches.

Every process of the product (daemon, workers, CLI) calls `configure` once. Records carry an
ISO 8601 UTC `timestamp`, `level` and `event`, plus fields; journald collects the JSON lines.
"""

from __future__ import annotations

import logging
import sys
from typing import Optional, TextIO

import structlog

LEVELS = ("debug", "info", "warning", "error", "critical")


def configure(json: Optional[bool] = None, level: str = "info", stream: TextIO = sys.stdout) -> None:
    """Set up structlog for this process.

    `json=None` picks JSON unless `stream` is a terminal. Standard-library loggers (apscheduler,
    onnx) are routed through the same renderer so nothing prints in another format.
    """
    if json is None:
        json = not stream.isatty()
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    renderer = (
        structlog.processors.JSONRenderer(ensure_ascii=False)
        if json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    if json:
        shared.append(structlog.processors.format_exc_info)
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processor=renderer,
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared[1:]],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.getLevelName(level.upper()))


def get(name: Optional[str] = None) -> structlog.stdlib.BoundLogger:
    """A logger bound to `component=name`."""
    log = structlog.get_logger()
    return log.bind(component=name) if name else log
