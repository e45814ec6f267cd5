"""What the services push to clients: one feed per namespace, built before
any service (a feed needs only the edge: the Socket.IO server, the engine,
the metrics), so each service gets its callbacks at construction. The
namespaces (realtime/namespaces/) answer clients; the feeds push to them."""

from __future__ import annotations

from dataclasses import dataclass

from realtime.context import Edge
from realtime.feeds.booking import BookingFeed
from realtime.feeds.chat import ChatFeed
from realtime.feeds.feedback import FeedbackFeed
from realtime.feeds.ops import OpsFeed
from realtime.feeds.orders import OrderFeed
from realtime.feeds.tracking import TrackingFeed


@dataclass(frozen=True)
class Feeds:
    orders: OrderFeed
    tracking: TrackingFeed
    chat: ChatFeed
    ops: OpsFeed
    booking: BookingFeed
    feedback: FeedbackFeed

    async def start(self) -> None:
        self.tracking.start()

    async def stop(self) -> None:
        await self.tracking.stop()


def build_feeds(edge: Edge) -> Feeds:
    ops = OpsFeed(edge)
    return Feeds(orders=OrderFeed(edge), tracking=TrackingFeed(edge), chat=ChatFeed(edge),
                 ops=ops, booking=BookingFeed(edge), feedback=FeedbackFeed(edge))
