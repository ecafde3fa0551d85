"""Structured logs: one JSON object a line on stderr, with the component and an event name.

Every process of the platform logs the same way, so `plexus run` output can be read by a
person and parsed by a machine alike.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any


class JsonFormatter(logging.Formatter):
    """Formats a record as {"ts", "level", "component", "event", ...fields}."""

    def __init__(self, component: str) -> None:
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "component": self.component,
            "event": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            data.update(fields)
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


def configure(component: str, level: int = logging.INFO) -> logging.Logger:
    """Route the `plexus` logger tree to stderr as JSON lines tagged with `component`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(component))
    root = logging.getLogger("plexus")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    return root


def event(logger: logging.Logger, name: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log event `name` with structured `fields`."""
    logger.log(level, name, extra={"fields": fields})


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
