"""Webhooks, notifications and push subscriptions over HTTP
(docs/webhooks.md, docs/notifications.md, docs/protocol.md).

    POST   /api/webhooks                         admin, service
    GET    /api/webhooks                         admin, service
    GET    /api/webhooks/{id}                    admin, service
    DELETE /api/webhooks/{id}                    admin, service
    POST   /api/webhooks/{id}/replay             admin, service
    GET    /api/webhooks/{id}/deliveries         admin, service
    GET    /api/notifications                    any signed-in user (their own)
    POST   /api/notifications/read               any signed-in user
    GET    /api/notifications/preferences        any signed-in user
    PUT    /api/notifications/preferences        any signed-in user
    GET    /api/push/key                         any signed-in user (the VAPID application server key)
    POST   /api/push/subscriptions               any signed-in user
    DELETE /api/push/subscriptions               any signed-in user
"""

from __future__ import annotations

import base64
import binascii
import secrets
import uuid
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from aiohttp import web
from pydantic import Field, StrictBool, StringConstraints, field_validator, model_validator

from kernel.clock import now_ms
from kernel.errors import Conflict, NotFound
from outbox.notices import LANGS, check_clock
from outbox.records import check_pattern
from outbox.relay import notification_out
from realtime.api import CTX, SERVICES, QueryIn, json_response, parse, parse_query, principal, require_role
from realtime.errors import WireError, ok
from realtime.namespaces.models import Id, Inbound, Ts
from realtime.outbound import url_problem
from realtime.services import WEBHOOKS_CHANGED
from storage.outbox import MAX_INBOX

WEBHOOK_ID = "{webhook_id:[A-Za-z0-9_]{1,64}}"
# Endpoints at most (an endpoint is a cost on every record).
MAX_ENDPOINTS = 50
# Push subscriptions one user keeps (browsers and devices); the oldest go.
MAX_SUBSCRIPTIONS = 10
MAX_MUTED = 200

Url = Annotated[str, StringConstraints(min_length=8, max_length=2048)]
Pattern = Annotated[str, StringConstraints(min_length=1, max_length=64)]
Secret = Annotated[str, StringConstraints(min_length=10, max_length=200)]


def check_secret(value: str) -> str:
    """`whsec_` + base64 of 24 to 64 random bytes (Standard Webhooks)."""
    if not value.startswith("whsec_"):
        raise ValueError("must start with whsec_")
    try:
        raw = base64.b64decode(value[6:], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("must be whsec_ followed by base64") from None
    if not 24 <= len(raw) <= 64:
        raise ValueError("must hold 24 to 64 bytes")
    return value


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def check_types(value: list[str]) -> list[str]:
    for p in value:
        why = check_pattern(p)
        if why:
            raise ValueError(f"{p[:64]!r}: {why}")
    return sorted(set(value))


class WebhookIn(Inbound):
    url: Url
    types: Annotated[list[Pattern], Field(min_length=1, max_length=30,
                                          default_factory=lambda: ["*"])]
    description: Annotated[str, StringConstraints(max_length=200)] | None = None
    secret: Secret | None = None

    _types = field_validator("types")(classmethod(lambda cls, v: check_types(v)))
    _secret = field_validator("secret")(classmethod(lambda cls, v: v if v is None else check_secret(v)))


class ReplayIn(Inbound):
    since_ts: Ts | None = None
    event_ids: Annotated[list[Annotated[str, StringConstraints(min_length=1, max_length=64)]],
                         Field(min_length=1, max_length=1000)] | None = None

    @model_validator(mode="after")
    def _one(self) -> ReplayIn:
        if (self.since_ts is None) == (self.event_ids is None):
            raise ValueError("give exactly one of since_ts and event_ids")
        return self


class DeliveriesQuery(QueryIn):
    status: Literal["pending", "waiting", "delivered", "dead", "dropped"] | None = None
    before_ts: Annotated[int, Field(ge=0, le=2**53)] | None = None
    limit: Annotated[int, Field(ge=1, le=200)] = 50


class InboxQuery(QueryIn):
    unread: bool = False
    before_ts: Annotated[int, Field(ge=0, le=2**53)] | None = None
    limit: Annotated[int, Field(ge=1, le=200)] = 50


class ReadIn(Inbound):
    ids: Annotated[list[Annotated[str, StringConstraints(min_length=1, max_length=64)]],
                   Field(min_length=1, max_length=500)] | None = None
    all: StrictBool | None = None

    @field_validator("all")
    @classmethod
    def _true(cls, v: bool | None) -> bool | None:
        if v is False:
            raise ValueError("only true (or leave it out and give ids)")
        return v

    @model_validator(mode="after")
    def _one(self) -> ReadIn:
        if (self.ids is None) == (self.all is None):
            raise ValueError("give exactly one of ids and all: true")
        return self


class QuietIn(Inbound):
    start: Annotated[str, StringConstraints(min_length=5, max_length=5)]
    end: Annotated[str, StringConstraints(min_length=5, max_length=5)]
    tz: Annotated[str, StringConstraints(min_length=1, max_length=64)] = "Asia/Shanghai"

    @field_validator("start", "end")
    @classmethod
    def _clock(cls, v: str) -> str:
        if not check_clock(v):
            raise ValueError("HH:MM, 00:00 to 23:59")
        return v

    @field_validator("tz")
    @classmethod
    def _zone(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError("not a known IANA time zone") from None
        return v


class PrefsIn(Inbound):
    lang: Literal["zh-CN", "en"] | None = None
    quiet_hours: QuietIn | None = None
    # Chat notifications off for these conversations (the whole list).
    muted_conversations: Annotated[list[Id], Field(max_length=MAX_MUTED)] | None = None


class KeysIn(Inbound):
    p256dh: Annotated[str, StringConstraints(min_length=80, max_length=100, pattern=r"^[A-Za-z0-9_-]+=*$")]
    auth: Annotated[str, StringConstraints(min_length=16, max_length=32, pattern=r"^[A-Za-z0-9_-]+=*$")]

    @field_validator("p256dh")
    @classmethod
    def _point(cls, v: str) -> str:
        raw = base64.urlsafe_b64decode(v + "=" * (-len(v) % 4))
        if len(raw) != 65 or raw[0] != 4:
            raise ValueError("must be an uncompressed P-256 public key (65 bytes, base64url)")
        return v

    @field_validator("auth")
    @classmethod
    def _auth(cls, v: str) -> str:
        if len(base64.urlsafe_b64decode(v + "=" * (-len(v) % 4))) != 16:
            raise ValueError("must be 16 bytes, base64url")
        return v


class SubscriptionIn(Inbound):
    endpoint: Url
    keys: KeysIn
    expirationTime: int | None = None


class UnsubscribeIn(Inbound):
    endpoint: Url


def webhook_view(doc: dict[str, Any]) -> dict[str, Any]:
    """An endpoint as the API shows it: never its secret."""
    return {"id": doc["_id"], "url": doc["url"], "types": doc.get("types") or ["*"],
            "description": doc.get("description"), "source": doc.get("source", "api"),
            "created_ts": doc.get("created_ts")}


def delivery_view(doc: dict[str, Any]) -> dict[str, Any]:
    return {"id": doc["_id"], "event_id": doc["msg_id"], "type": doc["topic"], "status": doc["status"],
            "tries": doc.get("tries", 0), "attempts": doc.get("attempts") or [],
            "ts": doc.get("ts"), "created_ts": doc.get("created_ts"),
            "next_ts": doc.get("next_ts") if doc["status"] == "pending" else None,
            "delivered_ts": doc.get("delivered_ts"), "dead_reason": doc.get("dead_reason")}


async def own_ports(request: web.Request) -> set[int]:
    """The ports this server answers on: configured, and the one this
    request came in on (REALTIME_PORT=0 picks one at start)."""
    s = request.app[CTX].settings
    ports = {p for p in (s.port, s.metrics_port) if p}
    sock = request.transport.get_extra_info("sockname") if request.transport else None
    if isinstance(sock, tuple) and len(sock) >= 2:
        ports.add(int(sock[1]))
    return ports


def staff(request: web.Request) -> None:
    require_role(principal(request), "admin", "service")


async def create_webhook(request: web.Request) -> web.Response:
    staff(request)
    body = await parse(request, WebhookIn)
    why = await url_problem(body.url, await own_ports(request))
    if why:
        raise WireError("invalid", f"url {why}", [{"field": "url", "error": why}])
    services = request.app[SERVICES]
    if len(await services.outbox_store.endpoints()) >= MAX_ENDPOINTS:
        raise Conflict(f"at most {MAX_ENDPOINTS} webhook endpoints; delete one first")
    secret = body.secret or new_secret()
    doc = {"_id": "wh_" + uuid.uuid4().hex[:20], "url": body.url, "types": body.types,
           "description": body.description, "secret": secret, "source": "api",
           "created_ts": now_ms()}
    await services.outbox_store.insert_endpoint(doc)
    await endpoints_changed(request)
    # The secret is shown this once (and is never logged).
    return json_response(ok({"webhook": webhook_view(doc), "secret": secret}), 201)


async def endpoints_changed(request: web.Request) -> None:
    await request.app[SERVICES].relay.reload_endpoints()
    request.app[CTX].engine.bus.to_others(WEBHOOKS_CHANGED, {})


async def list_webhooks(request: web.Request) -> web.Response:
    staff(request)
    docs = await request.app[SERVICES].outbox_store.endpoints()
    return json_response(ok({"webhooks": [webhook_view(d) for d in docs]}))


async def _endpoint(request: web.Request) -> dict[str, Any]:
    staff(request)
    wid = request.match_info["webhook_id"]
    doc = await request.app[SERVICES].outbox_store.endpoint(wid)
    if doc is None:
        raise NotFound(f"webhook {wid!r} not found")
    return doc


async def get_webhook(request: web.Request) -> web.Response:
    return json_response(ok({"webhook": webhook_view(await _endpoint(request))}))


async def delete_webhook(request: web.Request) -> web.Response:
    doc = await _endpoint(request)
    if doc.get("source") == "config":
        raise Conflict("this endpoint comes from REALTIME_WEBHOOKS; remove it there")
    store = request.app[SERVICES].outbox_store
    await store.delete_endpoint(doc["_id"])
    await store.cancel_target(doc["_id"], now_ms())
    await endpoints_changed(request)
    return json_response(ok({"deleted": doc["_id"]}))


async def replay_webhook(request: web.Request) -> web.Response:
    doc = await _endpoint(request)
    body = await parse(request, ReplayIn)
    services = request.app[SERVICES]
    n = await services.outbox_store.replay(doc["_id"], body.since_ts, body.event_ids, now_ms(),
                                           limit=10_000)
    services.relay.poke()
    return json_response(ok({"replayed": n}))


async def webhook_deliveries(request: web.Request) -> web.Response:
    doc = await _endpoint(request)
    q = parse_query(request, DeliveriesQuery)
    items = await request.app[SERVICES].outbox_store.deliveries_of(doc["_id"], q.status, q.before_ts,
                                                                   q.limit)
    return json_response(ok({"deliveries": [delivery_view(d) for d in items],
                             "has_more": len(items) == q.limit}))


# -- notifications ---------------------------------------------------------
async def inbox(request: web.Request) -> web.Response:
    p = principal(request)
    q = parse_query(request, InboxQuery)
    store = request.app[SERVICES].outbox_store
    items, unread = await store.inbox(p.id, q.unread, q.before_ts, q.limit)
    if unread >= MAX_INBOX:
        await store.trim_inbox(p.id)
    return json_response(ok({"notifications": [notification_out(d) for d in items], "unread": unread,
                             "has_more": len(items) == q.limit}))


async def mark_read(request: web.Request) -> web.Response:
    p = principal(request)
    body = await parse(request, ReadIn)
    store = request.app[SERVICES].outbox_store
    n = await store.mark_read(p.id, body.ids, now_ms())
    _, unread = await store.inbox(p.id, True, None, 1)
    return json_response(ok({"marked": n, "unread": unread}))


def prefs_view(doc: dict[str, Any]) -> dict[str, Any]:
    return {"lang": doc.get("lang") or "zh-CN", "quiet_hours": doc.get("quiet_hours"),
            "muted_conversations": doc.get("muted_conversations") or []}


async def get_prefs(request: web.Request) -> web.Response:
    p = principal(request)
    docs = await request.app[SERVICES].outbox_store.prefs_of([p.id])
    return json_response(ok({"preferences": prefs_view(docs.get(p.id) or {})}))


async def put_prefs(request: web.Request) -> web.Response:
    p = principal(request)
    raw = await parse(request, PrefsIn)
    changes: dict[str, Any] = {}
    given = raw.model_fields_set
    if "lang" in given:
        changes["lang"] = raw.lang if raw.lang in LANGS else None
    if "quiet_hours" in given:
        changes["quiet_hours"] = raw.quiet_hours.model_dump() if raw.quiet_hours else None
    if "muted_conversations" in given:
        changes["muted_conversations"] = sorted(set(raw.muted_conversations or []))
    if not changes:
        raise WireError("invalid", "give lang, quiet_hours or muted_conversations")
    doc = await request.app[SERVICES].outbox_store.set_prefs(p.id, changes)
    return json_response(ok({"preferences": prefs_view(doc)}))


async def push_key(request: web.Request) -> web.Response:
    return json_response(ok({"public_key": request.app[SERVICES].vapid_public_key}))


async def subscribe(request: web.Request) -> web.Response:
    p = principal(request)
    body = await parse(request, SubscriptionIn)
    why = await url_problem(body.endpoint, await own_ports(request))
    if why:
        raise WireError("invalid", f"endpoint {why}", [{"field": "endpoint", "error": why}])
    doc, created = await request.app[SERVICES].outbox_store.subscribe(
        p.id, body.endpoint, body.keys.model_dump(), now_ms(), MAX_SUBSCRIPTIONS)
    return json_response(ok({"subscription": {"id": doc["_id"], "endpoint": doc["endpoint"],
                                              "created_ts": doc["created_ts"]}}),
                         201 if created else 200)


async def unsubscribe(request: web.Request) -> web.Response:
    p = principal(request)
    body = await parse(request, UnsubscribeIn)
    gone = await request.app[SERVICES].outbox_store.unsubscribe(p.id, body.endpoint)
    if not gone:
        raise NotFound("no such subscription of yours")
    return json_response(ok({"deleted": True}))


def setup_outbox_routes(app: web.Application) -> None:
    app.router.add_post("/api/webhooks", create_webhook)
    app.router.add_get("/api/webhooks", list_webhooks)
    app.router.add_get(f"/api/webhooks/{WEBHOOK_ID}", get_webhook)
    app.router.add_delete(f"/api/webhooks/{WEBHOOK_ID}", delete_webhook)
    app.router.add_post(f"/api/webhooks/{WEBHOOK_ID}/replay", replay_webhook)
    app.router.add_get(f"/api/webhooks/{WEBHOOK_ID}/deliveries", webhook_deliveries)
    app.router.add_get("/api/notifications", inbox)
    app.router.add_post("/api/notifications/read", mark_read)
    app.router.add_get("/api/notifications/preferences", get_prefs)
    app.router.add_put("/api/notifications/preferences", put_prefs)
    app.router.add_get("/api/push/key", push_key)
    app.router.add_post("/api/push/subscriptions", subscribe)
    app.router.add_delete("/api/push/subscriptions", unsubscribe)
