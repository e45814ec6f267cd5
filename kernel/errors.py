"""Domain errors: each carries a wire code, mapped to a reply in one place
(``realtime.errors``). Domain code raises these and never imports the edge."""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    code = "internal"

    def __init__(self, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class Invalid(DomainError):
    code = "invalid"


class Unauthorized(DomainError):
    code = "unauthorized"


class Forbidden(DomainError):
    code = "forbidden"


class NotFound(DomainError):
    code = "not_found"


class Conflict(DomainError):
    code = "conflict"


class Unavailable(DomainError):
    """A backing store is down: nothing was stored; the client may retry."""

    code = "unavailable"


class RateLimited(DomainError):
    code = "rate_limited"

    def __init__(self, message: str, retry_after_ms: int) -> None:
        super().__init__(message, {"retry_after_ms": retry_after_ms})
        self.retry_after_ms = retry_after_ms
