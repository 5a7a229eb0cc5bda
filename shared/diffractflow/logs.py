"""Structured JSON logging with job and run ids (one line per record, on stderr)."""
from __future__ import annotations

import contextvars
import json
import logging
import sys
from datetime import datetime, timezone

job_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("job_id", default=None)
run_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("run_id", default=None)
_RESERVED = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str):
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        job, run = job_id_var.get(), run_id_var.get()
        if job:
            out["job_id"] = job
        if run:
            out["run_id"] = run
        for k, v in record.__dict__.items():
            if k not in _RESERVED and not k.startswith("_"):
                out[k] = v if isinstance(v, (str, int, float, bool, type(None))) else str(v)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(service: str, level: str = "INFO") -> logging.Logger:
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_diffractflow", False):
            root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    handler._diffractflow = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in ("nats", "asyncio"):
        logging.getLogger(noisy).setLevel("WARNING")
    return logging.getLogger(service)
