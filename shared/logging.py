"""Structured logging for every service: key=value text for people, JSON lines for log pipelines.

    log = get_logger(__name__)
    log.info("swapped weights", extra={"fields": {"version": "policy-0002", "pause_ms": 23.1}})

or, shorter, ``log_event(log, "swapped weights", version="policy-0002", pause_ms=23.1)``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from shared.config import LoggingConfig

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class _Formatter(logging.Formatter):
    def __init__(self, service: str, as_json: bool):
        super().__init__()
        self.service = service
        self.as_json = as_json

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = dict(getattr(record, "fields", {}) or {})
        fields.update({k: v for k, v in record.__dict__.items() if k not in _RESERVED and k != "fields"})
        if self.as_json:
            doc = {
                "ts": round(record.created, 3),
                "level": record.levelname.lower(),
                "service": self.service,
                "logger": record.name,
                "msg": record.getMessage(),
                **fields,
            }
            if record.exc_info:
                doc["exc"] = self.formatException(record.exc_info)
            return json.dumps(doc, default=str)
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created)) + f".{int(record.msecs):03d}"
        kv = " ".join(f"{k}={_text(v)}" for k, v in fields.items())
        line = f"{stamp} {record.levelname[0]} {self.service:<9} {record.getMessage()}" + (f"  {kv}" if kv else "")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    s = str(value)
    return json.dumps(s) if (" " in s or not s) else s


def setup_logging(service: str, config: LoggingConfig | None = None) -> None:
    """Route every logger of this process through one formatter on stderr."""
    config = config or LoggingConfig()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(service, as_json=config.format == "json"))
    # On the handler, not only as logger levels: a library's logging.config.dictConfig resets the
    # levels of existing loggers (httpx's per-request lines then drowned the demo's progress line).
    handler.addFilter(_quiet_chatty_libraries)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.level.upper())
    for noisy in CHATTY_LIBRARIES:
        logging.getLogger(noisy).setLevel(logging.WARNING)


CHATTY_LIBRARIES = ("kafka", "uvicorn.access", "httpx")
"""Libraries whose per-request info lines are dropped; their warnings and errors are kept."""


def _quiet_chatty_libraries(record: logging.LogRecord) -> bool:
    if record.levelno >= logging.WARNING:
        return True
    return not any(record.name == lib or record.name.startswith(lib + ".") for lib in CHATTY_LIBRARIES)


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)


def log_event(logger: logging.Logger, msg: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log ``msg`` with structured ``fields`` (rendered key=value or as JSON keys)."""
    logger.log(level, msg, extra={"fields": fields})
