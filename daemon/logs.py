"""Logging for every knitwatch process: structlog, console on a terminal, JSON lines otherwise.

Each process calls :func:`setup_logging` once with its stage name (``cli``, ``supervisor``,
``capture.cam0``, ``infer.0`` ...); every record then carries ``stage`` and ``pid``. Library code
only does ``structlog.get_logger(__name__)`` and never configures anything itself.

Exceptions are logged with their traceback (file, line, function, the source line) but never with the
frames' local variables: structlog's structured tracebacks and rich's would add them, and they can hold
tokens, PLC addresses and settings that must not end up in journald.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Literal, TextIO

import structlog
import structlog.tracebacks

LogFormat = Literal["auto", "console", "json"]


def _resolve_format(fmt: str, stream: TextIO) -> str:
    if fmt != "auto":
        return fmt
    isatty = getattr(stream, "isatty", None)
    return "console" if isatty is not None and isatty() else "json"


def setup_logging(
    stage: str, *, level: str = "INFO", fmt: str = "auto", stream: TextIO | None = None
) -> None:
    """Configure structlog (and the stdlib root logger, for third-party libraries) for this process."""
    stream = stream if stream is not None else sys.stderr
    resolved = _resolve_format(fmt, stream)
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")

    def add_stage(_logger: object, _name: str, event: dict) -> dict:
        event.setdefault("stage", stage)
        event.setdefault("pid", os.getpid())
        return event

    shared: list = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        add_stage,
    ]
    if resolved == "json":
        renderer: structlog.typing.Processor = structlog.processors.JSONRenderer()
        shared += [structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False, use_rich=False))]
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=getattr(stream, "isatty", lambda: False)(),
                                                 exception_formatter=structlog.dev.plain_traceback)
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    # Route the standard library's logging (warnings of torch, pymodbus, uvicorn ...) through the same renderer.
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(processor=renderer, foreign_pre_chain=shared)
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
