"""One wire error type: code + message + details, to an ack or an HTTP body.

Every failure a client can see goes through ``to_error``; nothing else builds
error replies.
"""

from __future__ import annotations

import logging
from typing import Any, Literal, Required, TypedDict

from pydantic import ValidationError
from pymongo.errors import ConnectionFailure, PyMongoError
from redis.exceptions import RedisError

from kernel.errors import DomainError

log = logging.getLogger(__name__)

# A timed-out write may still be applied by the store (docs/protocol.md,
# Replies): the reply says to retry, not that nothing was stored.
STORE_UNAVAILABLE = "the store is unreachable or too slow; retry"

HTTP_STATUS = {
    "invalid": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "conflict": 409,
    "too_large": 413,
    "rate_limited": 429,
    "internal": 500,
    "unavailable": 503,
}


class ErrorBody(TypedDict, total=False):
    code: Required[str]  # invalid | unauthorized | forbidden | not_found | conflict | ...
    message: Required[str]
    details: Any
    retry_after_ms: int  # rate_limited, and unavailable when shed: when to come back


class OkReply(TypedDict):
    """Every ack and HTTP body that succeeded: {"ok": true, "data": ...}."""

    ok: Literal[True]
    data: Any


class ErrorReply(TypedDict):
    """Every ack and HTTP body that failed: {"ok": false, "error": {...}}."""

    ok: Literal[False]
    error: ErrorBody


class WireError(Exception):
    def __init__(self, code: str, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details

    def body(self) -> ErrorReply:
        err: ErrorBody = {"code": self.code, "message": self.message}
        if self.details is not None:
            err["details"] = self.details
        if self.code == "rate_limited" and isinstance(self.details, dict) \
                and isinstance(self.details.get("retry_after_ms"), int):
            err["retry_after_ms"] = self.details["retry_after_ms"]
        elif self.code == "unavailable" and isinstance(self.details, dict) \
                and "retry_after_ms" in self.details:
            # Shed by the store gate: when to come back, where rate_limited says it.
            err["retry_after_ms"] = self.details["retry_after_ms"]
        return {"ok": False, "error": err}

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.code, 500)


def validation_details(exc: ValidationError) -> list[dict[str, Any]]:
    """Field paths and reasons, never the offending input (it may be huge or private)."""
    out = []
    for e in exc.errors(include_url=False, include_input=False, include_context=False):
        # Field names are input too (an unknown key may be 50 KB): bounded.
        field = ".".join(str(p)[:64] for p in e["loc"])[:200] or "(payload)"
        out.append({"field": field, "error": e["msg"]})
    return out[:20]


def to_error(exc: BaseException) -> WireError:
    if isinstance(exc, WireError):
        return exc
    if isinstance(exc, ValidationError):
        return WireError("invalid", "payload failed validation", validation_details(exc))
    if isinstance(exc, DomainError):
        return WireError(exc.code, exc.message, exc.details)
    if isinstance(exc, PyMongoError) and (
            exc.timeout or isinstance(exc, ConnectionFailure)
            or exc.has_error_label("TransientTransactionError")):
        # Expected while the store is down or slow: the client is told, the
        # operator sees it in the metrics; no log line (let alone a traceback)
        # per call. Covers every CSOT expiry: ServerSelectionTimeoutError,
        # WaitQueueTimeoutError, NetworkTimeout (ConnectionFailures) and
        # ExecutionTimeout (an OperationFailure with `timeout`).
        return WireError("unavailable", STORE_UNAVAILABLE)
    if isinstance(exc, PyMongoError):
        log.error("store error: %s", type(exc).__name__, exc_info=exc)
        return WireError("unavailable", "store error; retry")
    if isinstance(exc, RedisError):
        log.warning("Redis error: %s", type(exc).__name__)
        return WireError("unavailable", "the cluster link is unreachable; retry")
    log.error("internal error", exc_info=exc)
    return WireError("internal", "internal error")


def ok(data: Any) -> OkReply:
    return {"ok": True, "data": data}
