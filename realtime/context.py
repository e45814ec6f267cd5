"""What the edge's parts share, in the order create_app builds it:

1. `Edge`: settings, metrics, the token verifier, the Socket.IO server and
   the engine. Needs no store; the feeds (what services push to clients)
   are built on it.
2. `Services` (realtime/services.py): the domain services and their stores,
   given the feeds' callbacks at construction.
3. `Context`: the edge, the services and the feeds, for the namespaces and
   HTTP routes. Frozen, every field set: a handler never asks whether
   something is started yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from realtime.auth import TokenVerifier
from realtime.metrics import Metrics
from realtime.settings import Settings

if TYPE_CHECKING:
    from realtime.engine import Engine
    from realtime.feeds import Feeds
    from realtime.services import Services
    from realtime.transport.sio import RealtimeServer


@dataclass(frozen=True)
class Edge:
    settings: Settings
    metrics: Metrics
    verifier: TokenVerifier
    sio: RealtimeServer
    engine: Engine


@dataclass(frozen=True)
class Context(Edge):
    services: Services
    feeds: Feeds

    @classmethod
    def of(cls, edge: Edge, services: Services, feeds: Feeds) -> Context:
        return cls(edge.settings, edge.metrics, edge.verifier, edge.sio, edge.engine,
                   services, feeds)
