"""Versioned bus messages: job requests, results, data events and dead letters.

Messages carry references to artifacts on the shared volume, never bulk data
(NATS' default max payload is 1 MB). Every message names its schema version;
a reader refuses versions it does not know instead of guessing.
"""
from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

SCHEMA_VERSION = 1
MAX_MESSAGE_BYTES = 512 * 1024  # stay well inside NATS' 1 MB payload limit

Status = Literal["ok", "failed", "rejected"]


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_id(prefix: str = "") -> str:
    return f"{prefix}{uuid.uuid4().hex[:16]}"


class MessageError(ValueError):
    """A message that cannot be parsed, has an unknown schema version or is too large."""


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)
    schema_version: int = SCHEMA_VERSION

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v != SCHEMA_VERSION:
            raise ValueError(f"unknown message schema version {v} (this build speaks {SCHEMA_VERSION})")
        return v

    def to_bytes(self) -> bytes:
        data = self.model_dump_json().encode()
        if len(data) > MAX_MESSAGE_BYTES:
            raise MessageError(f"{type(self).__name__} is {len(data)} bytes, over the {MAX_MESSAGE_BYTES}-byte limit")
        return data

    @classmethod
    def from_bytes(cls, data: bytes):
        if len(data) > MAX_MESSAGE_BYTES:
            raise MessageError(f"message of {len(data)} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")
        try:
            return cls.model_validate_json(data)
        except ValidationError as exc:
            raise MessageError(f"invalid {cls.__name__}: {_short_errors(exc)}") from exc


def _short_errors(exc: ValidationError) -> str:
    parts = []
    for e in exc.errors()[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ())) or "<message>"
        parts.append(f"{loc}: {e.get('msg')}")
    return "; ".join(parts)


class ArtifactRef(BaseModel):
    """A file on the shared volume: path relative to the volume root, and its sha256 when known."""

    model_config = ConfigDict(extra="forbid")
    path: str
    sha256: str | None = None

    @field_validator("path")
    @classmethod
    def _relative(cls, v: str) -> str:
        if not v or v.startswith("/") or "\x00" in v:
            raise ValueError(f"artifact path must be relative to the volume root: {v!r}")
        return v


class JobRequest(_Message):
    """One unit of work for one service."""

    job_id: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.:-]+$")
    run_id: str = Field(default="adhoc", min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.:-]+$")
    service: str
    attempt: int = Field(default=1, ge=1)
    inputs: dict[str, ArtifactRef] = Field(default_factory=dict)
    params: dict[str, Any] = Field(default_factory=dict)
    submitted_at: datetime = Field(default_factory=utcnow)


class JobErrorInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: str  # "bad_input", "bad_params", "bad_message", "failure", "timeout"
    message: str
    detail: str | None = None


class JobResult(_Message):
    """What a service reports for a job: status, outputs, metrics, structured error."""

    job_id: str
    run_id: str
    service: str
    attempt: int = 1
    status: Status
    outputs: dict[str, ArtifactRef] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    error: JobErrorInfo | None = None
    worker: str | None = None
    reused: bool = False  # outputs already existed with matching hashes (idempotent re-delivery)
    started_at: datetime | None = None
    finished_at: datetime = Field(default_factory=utcnow)


class DataEvent(_Message):
    """New data landed on disk (published by the watcher, consumed by the dispatcher)."""

    event_id: str = Field(default_factory=lambda: new_id("ev-"))
    run_id: str
    kind: Literal["file", "end_of_run"] = "file"
    path: str  # relative to the volume root
    size: int | None = None
    seen_at: datetime = Field(default_factory=utcnow)


class DeadLetter(_Message):
    """A job that will not be processed: the raw message, who gave up on it and why."""

    service: str
    reason: str
    kind: str
    job_id: str | None = None
    run_id: str | None = None
    deliveries: int | None = None
    raw: str  # the original message text (truncated to keep the letter small)
    at: datetime = Field(default_factory=utcnow)


def peek_ids(data: bytes) -> tuple[str | None, str | None]:
    """Best-effort job_id/run_id from a message that failed validation (for dead letters)."""
    try:
        obj = json.loads(data[:MAX_MESSAGE_BYTES])
        if isinstance(obj, dict):
            j, r = obj.get("job_id"), obj.get("run_id")
            return (str(j)[:200] if j is not None else None, str(r)[:200] if r is not None else None)
    except Exception:
        pass
    return None, None
