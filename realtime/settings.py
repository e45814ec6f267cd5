"""The one configuration object, read from environment variables.

Names are fixed: operators and acceptance checks use them.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import secrets
from pathlib import Path
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from outbox.records import check_pattern
from outbox.retry import DEFAULT_SCHEDULE_S, parse_schedule
from storage.redis.client import is_cluster, parse_cluster_url

log = logging.getLogger(__name__)

Algorithm = Literal["HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256"]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# HS* keys shorter than this are refused, configured or read from the data dir.
MIN_SECRET_CHARS = 16
# A rate in events per second (0: no limit), and a burst (bucket size).
Rate = Annotated[float, Field(ge=0, le=1_000_000, allow_inf_nan=False)]
Burst = Annotated[float, Field(ge=1, le=10_000_000, allow_inf_nan=False)]


class WebhookConfig(BaseModel):
    """One endpoint of REALTIME_WEBHOOKS."""

    model_config = ConfigDict(extra="forbid")
    url: Annotated[str, Field(min_length=8, max_length=2048, pattern=r"^https?://[^\s]+$")]
    secret: Annotated[str, Field(min_length=10, max_length=200, pattern=r"^whsec_[A-Za-z0-9+/=]+$")]
    types: Annotated[list[str], Field(min_length=1, max_length=30, default_factory=lambda: ["*"])]
    description: str | None = None

    @field_validator("types")
    @classmethod
    def _types(cls, value: list[str]) -> list[str]:
        for p in value:
            why = check_pattern(p)
            if why:
                raise ValueError(f"{p[:64]!r}: {why}")
        return value


class ConfigError(ValueError):
    """A setting the server refuses to start with (the CLI prints it and exits 2)."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="REALTIME_", extra="ignore", populate_by_name=True)

    host: str = "0.0.0.0"
    port: int = Field(default=8080, ge=0, le=65535)
    # On SIGTERM, /readyz answers 503 `draining` for this long while everything
    # else is served as before, so that load balancers (which check /readyz)
    # send new clients to other nodes; then the sockets are closed and the
    # process exits (docs/operations.md, Draining). 0: close at once.
    drain_s: float = Field(default=5.0, ge=0, le=300)
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
    # The deadline of every store operation (storage/gate.py), its wait for a
    # turn, server selection, every round trip and a whole transaction
    # included, before the client gets `unavailable`; short, because the
    # client retries and a hung ack is worse than a clear error.
    mongo_timeout_ms: int = Field(default=2500, ge=100, le=60_000)
    # Store operations per node running at once, and waiting for a turn; past
    # both a call gets `unavailable` with `retry_after_ms` at once. 64 leaves
    # PyMongo's pool of 100 connections room for the trail writer and health
    # checks, and is far above a healthy node's need (at ~2 ms an operation,
    # 64 at once is ~30,000 operations/s). 256 waiting take a healthy store
    # ~20 ms to drain, and cap what a stalled store holds on a node at 320
    # calls, each answered within mongo_timeout_ms.
    store_max_inflight: int = Field(default=64, ge=1, le=10_000)
    store_max_waiting: int = Field(default=256, ge=0, le=100_000)
    # Of those places, one user (a token's sub; the backend's `service` role
    # is not counted) holds at most this many: half the running places, so
    # one user pipelining requests over several sockets cannot take the node.
    store_max_per_user: int = Field(default=32, ge=1, le=100_000)
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
    # A session that has joined no namespace this long after its handshake is
    # closed (clients join with their first frame; Node socket.io's
    # connectTimeout is the same idea at 45 s).
    join_timeout_s: float = Field(default=10.0, gt=0, le=300)

    # Tracking (docs/tracking.md).
    max_speed_mps: float = Field(default=70.0, gt=0)
    max_accuracy_m: float = Field(default=200.0, gt=0)
    location_rate: float = Field(default=5.0, gt=0)  # messages per second per technician
    location_burst: float = Field(default=10.0, ge=1)
    arrival_radius_m: float = Field(default=100.0, gt=0)
    road_factor: float = Field(default=1.35, ge=1.0, le=3.0)
    default_speed_kmh: float = Field(default=25.0, gt=0)
    # Lateness (docs/scheduling.md): an order is flagged `late_risk` when its
    # projected arrival passes its window's start by more than this many
    # minutes; every technician's day is projected this often.
    late_grace_min: int = Field(default=10, ge=1, le=240)
    project_interval_s: float = Field(default=5.0, ge=0.05, le=300)
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
    # How much earlier arrival a top rating is worth in dispatch's ranking
    # (docs/dispatch.md, Ranking): a 5-star Bayesian rating earns this many
    # seconds over a 1-star one, in proportion between; a candidate arriving
    # later than that is never ranked first by its rating.
    dispatch_rating_margin_s: float = Field(default=300.0, ge=0, le=3600)

    # Feedback (docs/feedback.md): the first response is due this many
    # minutes after an item is created; past it the item is overdue.
    feedback_sla_min: float = Field(default=240.0, gt=0, le=60 * 24 * 30)
    # The days of the statistics and of CSAT weeks (an IANA zone).
    report_tz: str = "Asia/Shanghai"

    # Bookings (docs/scheduling.md): how long a hold keeps its slot while the
    # customer pays, and how many live holds one customer may have.
    hold_ttl_s: float = Field(default=300.0, gt=0, le=3600)
    max_holds: int = Field(default=2, ge=1, le=20)

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

    # /metrics (docs/operations.md). metrics_port > 0: also served on its own
    # listener at metrics_host (loopback by default: bind it to the internal
    # interface Prometheus scrapes). On the main port /metrics answers only
    # client addresses in metrics_allow (empty: nobody; the host itself by default).
    metrics_port: int = Field(default=0, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    metrics_allow: Annotated[list[Network], NoDecode] = Field(
        default_factory=lambda: [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1")])
    # Peers whose X-Forwarded-For is believed (the load balancers); from any
    # other peer the header is ignored and the client is the peer itself.
    trusted_proxies: Annotated[list[Network], NoDecode] = Field(default_factory=list)

    # Rate limits at the edge, per node (realtime/limits.py, docs/operations.md).
    # HTTP without a valid token (pages, health, refused tokens), per client
    # address: a page load is ~10 requests, so a burst of 100 lets a NAT'd
    # office load ten pages at once; 50/s stops id probing and floods.
    http_ip_rate: Rate = 50.0
    http_ip_burst: Burst = 100.0
    # HTTP with a valid token, per principal (sub + role): far above what a
    # person's console or app sends, and what stops one token probing ids.
    http_user_rate: Rate = 100.0
    http_user_burst: Burst = 200.0
    # The business backend (role `service`) pushes every order change: its
    # own bucket, ten times larger, only there to stop a runaway loop.
    http_service_rate: Rate = 1000.0
    http_service_burst: Burst = 2000.0
    # New Engine.IO sessions per client address. One app or tab is one
    # session (namespaces share it); a NAT'd office reconnecting after a blip
    # gets 50 at once and 20 more every second (clients retry with backoff).
    handshake_rate: Rate = 20.0
    handshake_burst: Burst = 50.0
    # Live sockets of one user per namespace on this node (phones, tabs, the
    # console's namespaces each count once per namespace); `service` exempt.
    max_sockets_per_user: int = Field(default=20, ge=1, le=100_000)
    # Chat sends (token buckets, docs/protocol.md). Per user, from all their
    # connections: 2/s with a burst of 20 lets a fast typist, or an outbox of 20
    # flushed after a reconnect, through at once. Per conversation, all senders
    # together: more than any conversation of people needs, far below a flood.
    chat_send_rate: float = Field(default=2.0, gt=0, le=1000)  # messages per second per user
    chat_send_burst: float = Field(default=20.0, ge=1, le=10_000)
    chat_conversation_rate: float = Field(default=10.0, gt=0, le=10_000)  # per conversation
    chat_conversation_burst: float = Field(default=50.0, ge=1, le=100_000)

    # The outbox (docs/webhooks.md, docs/notifications.md). Endpoints from the
    # environment: a JSON list of {"url", "secret" (whsec_...), "types"}.
    webhooks: Annotated[list[WebhookConfig], NoDecode] = Field(default_factory=list)
    # Waits after the 1st, 2nd, ... failed try (seconds, jittered by 20%);
    # after the last, the delivery is a dead letter.
    webhook_retry_s: Annotated[tuple[float, ...], NoDecode] = DEFAULT_SCHEDULE_S
    webhook_timeout_s: float = Field(default=10.0, gt=0, le=60)
    # Sends in flight per endpoint per node (as many more wait their turn).
    webhook_concurrency: int = Field(default=8, ge=1, le=256)
    outbox_lease_s: float = Field(default=10.0, ge=0.5, le=300)
    outbox_poll_s: float = Field(default=0.25, ge=0.01, le=10)
    # Web Push (VAPID): PEM text or a path; none: generated into the data dir.
    vapid_private_key: str | None = None
    vapid_subject: str = "mailto:ops@localhost"

    @field_validator("webhooks", mode="before")
    @classmethod
    def _webhooks(cls, value: object) -> object:
        if isinstance(value, str):
            try:
                value = json.loads(value) if value.strip() else []
            except ValueError:
                raise ValueError("REALTIME_WEBHOOKS must be a JSON list of {url, secret, types}") from None
        return value

    @field_validator("webhook_retry_s", mode="before")
    @classmethod
    def _retry(cls, value: object) -> object:
        if isinstance(value, str):
            return parse_schedule(value)
        return value

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [o.strip().rstrip("/") for o in value.split(",") if o.strip()]
        return value

    @field_validator("metrics_allow", "trusted_proxies", mode="before")
    @classmethod
    def _split_networks(cls, value: object) -> object:
        """Comma-separated addresses or CIDR blocks (an address is a /32 or /128)."""
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list):
            return value
        networks = []
        for item in value:
            try:
                networks.append(item if isinstance(item, ipaddress.IPv4Network | ipaddress.IPv6Network)
                                else ipaddress.ip_network(str(item), strict=False))
            except ValueError:
                raise ValueError(f"{str(item)[:64]!r} is not an IP address or CIDR block") from None
        return networks

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        """One Redis (redis://, rediss://, unix://) or a Redis Cluster
        (redis+cluster://host:port[,host:port...]; docs/scaling.md)."""
        if not value:
            return None
        scheme = value.split("://", 1)[0].lower() if "://" in value else ""
        if is_cluster(value):
            parse_cluster_url(value)  # its ValueError says what is wrong
        elif scheme not in ("redis", "rediss", "unix"):
            raise ValueError("REDIS_URL must start with redis://, rediss://, unix:// "
                             "or redis+cluster:// (a Redis Cluster)")
        return value

    @field_validator("report_tz")
    @classmethod
    def _report_tz(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"REALTIME_REPORT_TZ: {value[:64]!r} is not an IANA time zone") from None
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
            if self.jwt_secret is not None and len(self.jwt_secret) < MIN_SECRET_CHARS:
                raise ValueError(f"REALTIME_JWT_SECRET must be at least {MIN_SECRET_CHARS} characters")
        elif not self.jwt_public_key:
            raise ValueError(f"REALTIME_JWT_PUBLIC_KEY is required for {self.jwt_algorithm}")
        if self.metrics_port and self.metrics_port == self.port:
            raise ValueError("REALTIME_METRICS_PORT must differ from REALTIME_PORT "
                             "(0 serves /metrics on the main port only)")
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
            secret = path.read_text().strip()
            if len(secret) < MIN_SECRET_CHARS:
                # A short key is guessable offline from any one token.
                raise ConfigError(
                    f"the JWT secret in {path} has {len(secret)} characters; at least "
                    f"{MIN_SECRET_CHARS} are required (delete the file to generate one, "
                    "or set REALTIME_JWT_SECRET)")
            private_data_dir(self.data_dir)
            make_private(path, 0o600)
            self.jwt_secret = secret
            return
        private_data_dir(self.data_dir)
        secret = secrets.token_urlsafe(48)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secret + "\n")
        self.jwt_secret = secret
        log.warning("no REALTIME_JWT_SECRET set: generated one and stored it in %s", path)


def private_data_dir(path: Path) -> None:
    """The data dir holds the secret and stored chats: its owner's only (0700)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    make_private(path, 0o700)


def make_private(path: Path, mode: int) -> None:
    """chmod, or say why not (a path we do not own): the server still starts."""
    try:
        path.chmod(mode)
    except OSError as exc:
        log.warning("could not make %s private (mode %o): %s", path, mode, exc.strerror)


def read_key(value: str) -> str:
    """A PEM key given inline or as a path."""
    if value.lstrip().startswith("-----BEGIN"):
        return value
    return Path(value).read_text()
