"""JWT -> Principal. The algorithm is pinned by configuration; `none` and
every other algorithm are refused, and `exp`, `sub` and `role` are required.

Claims are typed, not coerced: times are JSON numbers (PyJWT alone takes
`"9999999999"` for `exp`), and `sub` and `skills` follow the same id rule as
every id in a payload (`Id`, realtime/namespaces/models.py), because they
become room names, index keys and the `actor` of stored events."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import jwt
from pydantic import TypeAdapter, ValidationError

from kernel.errors import Unauthorized
from realtime.namespaces.models import Id
from realtime.settings import Settings, read_key

ROLES = frozenset({"customer", "technician", "agent", "admin", "service"})
MAX_TOKEN_CHARS = 8192
MAX_NAME_CHARS = 128
MAX_SKILLS = 64
TIME_CLAIMS = ("exp", "nbf", "iat")
ID_RULE = "1..64 characters of A-Z a-z 0-9 _ . : @ -"
_ID = TypeAdapter(Id)


def is_id(value: object) -> bool:
    """True when `value` passes the payload id rule (the one `Id` type)."""
    try:
        _ID.validate_python(value, strict=True)
    except ValidationError:
        return False
    return True


def is_time(value: object) -> bool:
    """A NumericDate: a finite JSON number (not a bool, not a numeric string)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return math.isfinite(value)


@dataclass(frozen=True, slots=True)
class Principal:
    id: str
    role: str
    name: str | None = None
    skills: tuple[str, ...] = field(default=())

    def actor(self) -> dict[str, str]:
        return {"id": self.id, "role": self.role}


class TokenVerifier:
    def __init__(self, settings: Settings) -> None:
        self._algorithms = [settings.jwt_algorithm]
        if settings.jwt_algorithm.startswith("HS"):
            if not settings.jwt_secret:
                raise ValueError("no JWT secret configured")
            self._key: Any = settings.jwt_secret
        else:
            assert settings.jwt_public_key
            self._key = read_key(settings.jwt_public_key)
        self._audience = settings.jwt_audience
        self._issuer = settings.jwt_issuer
        self._leeway = settings.jwt_leeway_s

    def verify(self, token: object) -> Principal:
        if not isinstance(token, str) or not token:
            raise Unauthorized("a token is required")
        if len(token) > MAX_TOKEN_CHARS:
            raise Unauthorized("token too long")
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options={
                    "require": ["exp", "sub", "role"],
                    "verify_aud": self._audience is not None,
                    "verify_iss": self._issuer is not None,
                },
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("token expired") from None
        except jwt.InvalidTokenError as exc:
            raise Unauthorized(f"invalid token: {type(exc).__name__}") from None
        return principal_from_claims(claims)


def principal_from_claims(claims: dict[str, Any]) -> Principal:
    for claim in TIME_CLAIMS:
        if claim in claims and not is_time(claims[claim]):
            raise Unauthorized(f"claim {claim!r} must be a number (seconds since the epoch)")
    sub, role = claims.get("sub"), claims.get("role")
    if not isinstance(sub, str) or not is_id(sub):
        raise Unauthorized(f"claim 'sub' must be an id: {ID_RULE}")
    if not isinstance(role, str) or role not in ROLES:
        raise Unauthorized(f"claim 'role' must be one of {sorted(ROLES)}")
    name = claims.get("name")
    if name is not None and (not isinstance(name, str) or len(name) > MAX_NAME_CHARS):
        raise Unauthorized(f"claim 'name' must be a string of at most {MAX_NAME_CHARS} characters")
    skills = claims.get("skills") or []
    if not isinstance(skills, list) or len(skills) > MAX_SKILLS or not all(map(is_id, skills)):
        raise Unauthorized(f"claim 'skills' must be a list of at most {MAX_SKILLS} ids ({ID_RULE})")
    return Principal(id=sub, role=role, name=name, skills=tuple(skills))


def mint_token(
    settings: Settings,
    *,
    sub: str,
    role: str,
    name: str | None = None,
    skills: list[str] | None = None,
    ttl_s: int = 3600,
) -> str:
    if not isinstance(role, str) or role not in ROLES:
        raise ValueError(f"role must be one of {sorted(ROLES)}")
    if not is_id(sub):
        raise ValueError(f"sub must be an id: {ID_RULE}")
    now = int(time.time())
    claims: dict[str, Any] = {"sub": sub, "role": role, "iat": now, "exp": now + ttl_s}
    if name:
        claims["name"] = name
    if skills:
        claims["skills"] = skills
    if settings.jwt_audience:
        claims["aud"] = settings.jwt_audience
    if settings.jwt_issuer:
        claims["iss"] = settings.jwt_issuer
    if settings.jwt_algorithm.startswith("HS"):
        key: Any = settings.jwt_secret
    else:
        if not settings.jwt_private_key:
            raise ValueError(f"REALTIME_JWT_PRIVATE_KEY is needed to mint {settings.jwt_algorithm}")
        key = read_key(settings.jwt_private_key)
    return jwt.encode(claims, key, algorithm=settings.jwt_algorithm)
