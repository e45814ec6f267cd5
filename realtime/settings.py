"""The one configuration object, read from environment variables.

Names are fixed: operators and acceptance checks use them.
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

log = logging.getLogger(__name__)

Algorithm = Literal["HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="REALTIME_", extra="ignore", populate_by_name=True)

    host: str = "0.0.0.0"
    port: int = Field(default=8080, ge=0, le=65535)
    # Dev mode admits `*` as a CORS origin and the pages' dev sign-in (POST /api/dev/token).
    dev: bool = False
    log_level: str = "INFO"

    jwt_secret: str | None = None
    jwt_algorithm: Algorithm = "HS256"
    # PEM text or a path to a PEM file; used instead of the secret for RS*/ES*.
    jwt_public_key: str | None = None
    # Only the `token` command needs it, and only for RS*/ES*.
    jwt_private_key: str | None = None
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    # Clock skew tolerated on exp/nbf/iat, seconds.
    jwt_leeway_s: int = Field(default=30, ge=0, le=300)

    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)

    data_dir: Path = Path("./data")
    mongo_url: str | None = Field(
        default=None, validation_alias=AliasChoices("MONGO_URL", "REALTIME_MONGO_URL")
    )
    mongo_db: str = "realtime"
    # How long a store call may wait for a reachable server before the client
    # gets `unavailable`; short, because the client retries and a hung ack is
    # worse than a clear error.
    mongo_timeout_ms: int = Field(default=2500, ge=100, le=60_000)
    redis_url: str | None = Field(
        default=None, validation_alias=AliasChoices("REDIS_URL", "REALTIME_REDIS_URL")
    )
    # Redis engine: the channel all nodes share, and how long a node's claim
    # that a user is online lasts without a heartbeat (a killed node's users
    # go offline within this).
    redis_channel: str = "realtime"
    presence_ttl_s: float = Field(default=30.0, ge=1.0, le=3600)
    # Executable of the embedded MongoDB-protocol server (SecantusDB).
    embedded_mongo_cmd: str = "secantusd-py"

    # engine.io limits. 64 KiB: OWASP's advice for websocket frames, and far
    # above our largest legitimate payload (a chat body is at most 4000 chars).
    max_message_bytes: int = Field(default=64 * 1024, ge=1024, le=16 * 1024 * 1024)
    # A websocket client that leaves this much unsent is dropped (wsdirect.py).
    max_unsent_bytes: int = Field(default=4 * 1024 * 1024, ge=16 * 1024)
    ping_interval_s: float = Field(default=25.0, gt=0)
    ping_timeout_s: float = Field(default=20.0, gt=0)

    # Tracking (docs/tracking.md).
    max_speed_mps: float = Field(default=70.0, gt=0)
    max_accuracy_m: float = Field(default=200.0, gt=0)
    location_rate: float = Field(default=5.0, gt=0)  # messages per second per technician
    location_burst: float = Field(default=10.0, ge=1)
    arrival_radius_m: float = Field(default=100.0, gt=0)
    road_factor: float = Field(default=1.35, ge=1.0, le=3.0)
    default_speed_kmh: float = Field(default=25.0, gt=0)
    # Garbage collection (realtime/gcpolicy.py): survivors frozen every
    # gc_freeze_s, one full collection every gc_full_s.
    gc_freeze_s: float = Field(default=30.0, ge=1.0)
    gc_full_s: float = Field(default=3600.0, ge=10.0)
    # A young collection at least this often (0: only CPython's own trigger).
    gc_young_ms: int = Field(default=100, ge=0, le=10_000)
    # Keep technicians' trails at all (a deployment whose backend keeps GPS
    # history, or that keeps none by policy, turns this off: positions still
    # relay, the trail endpoint answers not_found).
    trails: bool = True
    trail_ttl_days: int = Field(default=30, ge=1)
    trail_flush_s: float = Field(default=1.0, gt=0)

    # Dispatch defaults (each call may override them).
    dispatch_strategy: Literal["sequential", "broadcast"] = "sequential"
    dispatch_radius_m: float = Field(default=5000.0, gt=0)
    dispatch_count: int = Field(default=5, ge=1, le=100)
    dispatch_timeout_s: float = Field(default=20.0, gt=0, le=600)
    stale_position_s: float = Field(default=300.0, gt=0)

    # Pages (web/): the maps' tile layer, a URL template such as
    # https://tile.openstreetmap.org/{z}/{x}/{y}.png. Unset (or unreachable): the
    # maps draw on a plain background, so the pages work offline and in tests.
    tile_url: str | None = None
    tile_attribution: str | None = None
    # The tiles' coordinate system: GCJ-02 for Chinese providers (Amap, Tencent).
    tile_coord_sys: Literal["wgs84", "gcj02"] = "wgs84"

    # Support chat routing.
    agent_cap: int = Field(default=5, ge=1, le=100)  # concurrent conversations per agent
    agent_grace_s: float = Field(default=60.0, ge=0)  # keep a disconnected agent's chats this long

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [o.strip().rstrip("/") for o in value.split(",") if o.strip()]
        return value

    @field_validator("tile_url")
    @classmethod
    def _tile_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip()
        if not value.startswith(("http://", "https://", "/")) or "{z}" not in value:
            raise ValueError("REALTIME_TILE_URL must be an http(s) URL template with {z}, {x} and {y}")
        return value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if "*" in self.cors_origins and not self.dev:
            raise ValueError("REALTIME_CORS_ORIGINS='*' is refused outside dev mode (REALTIME_DEV=1)")
        if self.jwt_algorithm.startswith("HS"):
            if self.jwt_secret is not None and len(self.jwt_secret) < 16:
                raise ValueError("REALTIME_JWT_SECRET must be at least 16 characters")
        elif not self.jwt_public_key:
            raise ValueError(f"REALTIME_JWT_PUBLIC_KEY is required for {self.jwt_algorithm}")
        return self

    def ensure_secret(self) -> None:
        """Give HS* a secret: the configured one, or one kept in the data dir.

        A newcomer runs the server with no configuration; the generated secret
        survives restarts so that tokens minted earlier stay valid.
        """
        if not self.jwt_algorithm.startswith("HS") or self.jwt_secret:
            return
        path = self.data_dir / "jwt_secret"
        if path.exists():
            self.jwt_secret = path.read_text().strip()
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        secret = secrets.token_urlsafe(48)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secret + "\n")
        self.jwt_secret = secret
        log.warning("no REALTIME_JWT_SECRET set: generated one and stored it in %s", path)


def read_key(value: str) -> str:
    """A PEM key given inline or as a path."""
    if value.lstrip().startswith("-----BEGIN"):
        return value
    return Path(value).read_text()
