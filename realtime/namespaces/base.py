"""What every namespace shares: the handshake, the event table, replies.

A handler is declared with ``@handles("name", Model)`` and receives the
caller's Principal and the parsed payload; it returns the reply's ``data`` or
raises. ``trigger_event`` turns every outcome, including unknown events,
wrong arity and unexpected exceptions, into ``{ok, data}`` /
``{ok: false, error}``: a bad payload never closes the connection.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar
from urllib.parse import parse_qs

import socketio
from pydantic import BaseModel

from kernel import deadline
from kernel.errors import DomainError
from outbox.notices import presence_key
from realtime.auth import Principal
from realtime.errors import ErrorReply, OkReply, WireError, ok, to_error
from realtime.rooms import user_room
from realtime.settings import Settings
from realtime.transport.rooms import LocalRooms
from realtime.transport.sio import refusal
from storage.gate import OWNER

if TYPE_CHECKING:
    from realtime.context import Context

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)
Handler = Callable[[Any, Principal, str, Any], Awaitable[Any]]
Reply = OkReply | ErrorReply


class EventSpec:
    __slots__ = ("func", "model", "name")

    def __init__(self, name: str, model: type[BaseModel] | None, func: Handler) -> None:
        self.name = name
        self.model = model
        self.func = func


def handles(name: str, model: type[BaseModel] | None = None) -> Callable[[Handler], Handler]:
    def register(func: Handler) -> Handler:
        func.__event_spec__ = EventSpec(name, model, func)  # type: ignore[attr-defined]
        return func

    return register


class BaseNamespace(socketio.AsyncNamespace):  # type: ignore[misc]
    roles: ClassVar[frozenset[str]]
    events: ClassVar[dict[str, EventSpec]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.events = {}
        for klass in reversed(cls.__mro__):
            for attr in vars(klass).values():
                spec = getattr(attr, "__event_spec__", None)
                if spec is not None:
                    cls.events[spec.name] = spec

    def __init__(self, namespace: str, ctx: Context) -> None:
        super().__init__(namespace)
        self.ctx = ctx
        self.principals: dict[str, Principal] = {}

    @functools.cached_property
    def local(self) -> LocalRooms:
        """This node's side of this namespace's rooms (the server is known
        once the namespace is registered)."""
        return LocalRooms(self.server, self.namespace)

    # -- handshake -------------------------------------------------------
    async def on_connect(self, sid: str, environ: dict[str, Any], auth: Any = None) -> None:
        try:
            principal = self._authenticate(environ, auth)
            # Per node, per namespace: what one user's sockets may cost this
            # node's memory. The backend's workers share one service identity.
            cap = self.ctx.settings.max_sockets_per_user
            if self.local.count(user_room(principal.id)) >= cap and principal.role != "service":
                raise refusal("too_many_connections",
                              f"at most {cap} connections per user to {self.namespace}; close one")
        except socketio.exceptions.ConnectionRefusedError as exc:
            code = exc.error_args.get("data", {}).get("code", "unauthorized")
            self.ctx.metrics.handshakes_refused.labels(self.namespace, code).inc()
            raise
        self.principals[sid] = principal
        await self.enter_room(sid, user_room(principal.id))
        self.ctx.metrics.connections.labels(self.namespace).inc()
        try:
            await self.connected(sid, principal)
        except Exception as exc:  # a backing store is down: refuse clearly, never hang
            log.warning("%s handshake failed: %s", self.namespace, type(exc).__name__)
            self.principals.pop(sid, None)
            self.ctx.metrics.connections.labels(self.namespace).dec()
            self.ctx.metrics.handshakes_refused.labels(self.namespace, "unavailable").inc()
            raise refusal("unavailable", "a backing store is unreachable; retry") from None
        # Connected to this namespace somewhere: its events reach this user
        # live, not as notifications (outbox/relay.py).
        await self.ctx.engine.user_presence.connect(presence_key(self.namespace, principal.id))

    def _authenticate(self, environ: dict[str, Any], auth: Any) -> Principal:
        query = parse_qs(environ.get("QUERY_STRING", ""))
        if "token" in query or "access_token" in query:
            raise refusal("unauthorized", "tokens in the query string are refused; use auth.token")
        token = auth.get("token") if isinstance(auth, dict) else None
        try:
            principal = self.ctx.verifier.verify(token)
        except DomainError as exc:
            raise refusal("unauthorized", exc.message) from None
        if principal.role not in self.roles:
            raise refusal("forbidden", f"role {principal.role!r} may not use {self.namespace}")
        return principal

    async def on_disconnect(self, sid: str, reason: Any = None) -> None:
        principal = self.principals.pop(sid, None)
        if principal is not None:
            self.ctx.metrics.connections.labels(self.namespace).dec()
            await self.ctx.engine.user_presence.disconnect(presence_key(self.namespace, principal.id))
            await self.disconnected(sid, principal)

    async def connected(self, sid: str, principal: Principal) -> None:
        """Hook for subclasses."""

    async def disconnected(self, sid: str, principal: Principal) -> None:
        """Hook for subclasses."""

    # -- events ----------------------------------------------------------
    async def trigger_event(self, event: str, *args: Any) -> Any:
        if event == "connect":
            return await self.on_connect(*args)
        if event == "disconnect":
            return await self.on_disconnect(*args)
        sid, payload = args[0], args[1:]
        metrics = self.ctx.metrics
        spec = self.events.get(event)
        label = event if spec is not None else "(unknown)"
        metrics.events_in.labels(self.namespace, label).inc()
        reply: Reply
        try:
            principal = self.principals.get(sid)
            if principal is None:
                raise WireError("unauthorized", "not connected")
            begin_request(principal, self.ctx.settings)
            if spec is None:
                raise WireError("invalid", f"unknown event {event[:64]!r}",
                                {"events": sorted(self.events)})
            if len(payload) > 1:
                raise WireError("invalid", "send one payload object",
                                [{"field": "(payload)", "error": "exactly one argument expected"}])
            # No payload at all is an empty object: `unwatch_area` and `list`
            # take none, and other events then name their missing fields.
            body = payload[0] if payload else {}
            if spec.model is not None:
                if not isinstance(body, dict):
                    raise WireError("invalid", "payload must be an object",
                                    [{"field": "(payload)", "error": "must be an object"}])
                body = spec.model.model_validate(body)
            data = await spec.func(self, principal, sid, body)
            reply = ok(data)
            code = "ok"
        except Exception as exc:
            reply, code = error_reply(exc)
        metrics.acks.labels(self.namespace, label, code).inc()
        return reply


def begin_request(principal: Principal, settings: Settings) -> None:
    """What the rest of this request (its task) runs under: one deadline
    for all of its waits (kernel/deadline.py), and the principal's share of
    the node's store gate (storage/gate.py; the backend's is not limited)."""
    deadline.start(settings.mongo_timeout_ms / 1000)
    OWNER.set(None if principal.role == "service" else f"{principal.role}:{principal.id}")


def error_reply(exc: BaseException) -> tuple[ErrorReply, str]:
    """The reply to a failed event and its code. Kept out of the handler's
    frame on purpose: a local there holding the error would make a reference
    cycle (error -> traceback -> frame -> error) of every error reply, which
    only the garbage collector frees, and under load only a full collection."""
    err = to_error(exc)
    return err.body(), err.code


class NotServed(socketio.AsyncNamespace):  # type: ignore[misc]
    """The default namespace `/`: nothing is served there, so every
    handshake to it is refused (python-socketio would otherwise admit
    anyone, token or not, to an empty namespace that holds a session)."""

    def __init__(self, ctx: Context) -> None:
        super().__init__("/")
        self.ctx = ctx

    async def on_connect(self, sid: str, environ: dict[str, Any], auth: Any = None) -> None:
        self.ctx.metrics.handshakes_refused.labels("/", "not_found").inc()
        raise refusal("not_found",
                      "nothing is served on '/'; use /orders, /tracking, /chat, /ops or /booking")
