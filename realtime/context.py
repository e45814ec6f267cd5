"""What the edge's handlers share: built by create_app, completed at startup."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from realtime.auth import TokenVerifier
from realtime.metrics import Metrics
from realtime.settings import Settings

if TYPE_CHECKING:
    from pymongo import AsyncMongoClient

    from chat.service import ChatService
    from orders.service import OrderService
    from realtime.engine import Engine
    from realtime.namespaces.ops import OpsNamespace
    from realtime.transport.sio import RealtimeServer
    from storage.chat import MongoChatStore
    from storage.dispatch import MongoDispatchStore
    from storage.trails import TrailWriter
    from tracking.dispatch import DispatchService
    from tracking.service import TrackingService


@dataclass
class Context:
    settings: Settings
    metrics: Metrics
    verifier: TokenVerifier
    sio: RealtimeServer
    engine: Engine
    # Set by the store's cleanup_ctx once the store is reachable.
    mongo: AsyncMongoClient[dict[str, Any]] | None = None
    trails: TrailWriter | None = None
    chat_store: MongoChatStore | None = None
    dispatch_store: MongoDispatchStore | None = None
    ops: OpsNamespace = field(init=False, repr=False)
    _orders: OrderService | None = field(default=None, repr=False)
    _tracking: TrackingService | None = field(default=None, repr=False)
    _chat: ChatService | None = field(default=None, repr=False)
    _dispatch: DispatchService | None = field(default=None, repr=False)

    @property
    def orders(self) -> OrderService:
        if self._orders is None:
            raise RuntimeError("the order service is not started")
        return self._orders

    @property
    def tracking(self) -> TrackingService:
        if self._tracking is None:
            raise RuntimeError("the tracking service is not started")
        return self._tracking

    @property
    def chat(self) -> ChatService:
        if self._chat is None:
            raise RuntimeError("the chat service is not started")
        return self._chat

    @property
    def dispatch(self) -> DispatchService:
        if self._dispatch is None:
            raise RuntimeError("the dispatch service is not started")
        return self._dispatch
