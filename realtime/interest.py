"""Which other nodes want a technician's positions.

With the Redis engine every node used to publish every position on the one
shared channel, and every node (the publisher too) received and discarded
what it did not serve. Positions are the bulk of cross-node traffic, so they
go only where someone watches: each node announces which orders it has
watchers for (and whether it has area watchers) on the shared channel, and a
position is published to the channels of just those nodes; none, when no
other node watches. (Positions for one node are gathered until the next
publish and go as one message of rows: realtime/transport/cluster.py.)

Announcements are at most once like all pub/sub, so each node repeats its
whole interest every `ttl/3` seconds and forgets another node's interest
that was not repeated within `ttl` (a node that died stops costing
publishes). A node that starts asks the others to announce at once. A
`watch` or `unwatch` that changes what its node wants is answered only once
the announcement is published; the technician's node follows it as soon as
it has received it (a fix sent in that moment may still go the old way: the
watcher already has the current position from its `watch` reply).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

Publish = Callable[[str, dict[str, Any]], None]


class Interest:
    def __init__(self, node: str, publish: Publish, ttl_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.node = node
        self._clock = clock
        self._publish = publish  # a bus signal to every node
        self.ttl_s = ttl_s
        self._orders: dict[str, int] = {}  # order -> this node's watchers of it
        self._areas = 0  # this node's area watchers
        self._remote: dict[str, dict[str, float]] = {}  # order -> {node: expires}
        self._area_nodes: dict[str, float] = {}  # node -> expires

    # -- this node -------------------------------------------------------
    def add_order(self, order_id: str) -> bool:
        """True when this changed what the node wants (it was announced)."""
        n = self._orders.get(order_id, 0)
        self._orders[order_id] = n + 1
        if n == 0:
            self._publish("interest", {"node": self.node, "orders": [order_id]})
        return n == 0

    def remove_order(self, order_id: str) -> bool:
        """True when this changed what the node wants (it was announced)."""
        n = self._orders.get(order_id, 0)
        if n > 1:
            self._orders[order_id] = n - 1
            return False
        if self._orders.pop(order_id, None) is None:
            return False
        self._publish("interest", {"node": self.node, "dropped": [order_id]})
        return True

    def add_area(self) -> bool:
        self._areas += 1
        if self._areas == 1:
            self._publish("interest", {"node": self.node, "area": True})
        return self._areas == 1

    def remove_area(self) -> None:
        if self._areas > 0:
            self._areas -= 1
            if self._areas == 0:
                self._publish("interest", {"node": self.node, "area": False})

    def announce(self) -> None:
        """This node's whole interest (repeated: it heals lost messages)."""
        self._publish("interest", {"node": self.node, "orders": list(self._orders),
                                   "area": self._areas > 0})

    def refresh(self) -> None:
        """Ask every other node to announce, and announce ours (at start, and
        when the link to Redis comes back: what was said meanwhile is lost)."""
        self._publish("interest_query", {"node": self.node})
        self.announce()

    async def run(self) -> None:
        """Ask the others for theirs, then repeat ours every ttl/3."""
        self._publish("interest_query", {"node": self.node})
        while True:
            self.announce()
            await asyncio.sleep(self.ttl_s / 3)

    # -- the other nodes -------------------------------------------------
    def on_interest(self, data: dict[str, Any]) -> None:
        node = data.get("node")
        if not isinstance(node, str) or node == self.node:
            return
        expires = self._clock() + self.ttl_s
        for order_id in data.get("orders") or ():
            self._remote.setdefault(str(order_id), {})[node] = expires
        for order_id in data.get("dropped") or ():
            nodes = self._remote.get(str(order_id))
            if nodes is not None:
                nodes.pop(node, None)
                if not nodes:
                    del self._remote[str(order_id)]
        area = data.get("area")
        if area is True:
            self._area_nodes[node] = expires
        elif area is False:
            self._area_nodes.pop(node, None)

    def on_query(self, data: dict[str, Any]) -> None:
        if data.get("node") != self.node:
            self.announce()

    def wants_order(self, order_id: str) -> bool:
        """Whether another node has watchers of this order (not counting
        area views)."""
        now = self._clock()
        return any(expires > now for expires in (self._remote.get(order_id) or {}).values())

    def targets(self, order_id: str | None) -> list[str]:
        """The other nodes that want a position of this order's technician (or,
        without an order, an area view's)."""
        now = self._clock()
        found: list[str] = []
        if self._area_nodes:
            for node, expires in list(self._area_nodes.items()):
                if expires > now:
                    found.append(node)
                else:
                    del self._area_nodes[node]
        if order_id is not None:
            nodes = self._remote.get(order_id)
            if nodes:
                for node, expires in list(nodes.items()):
                    if expires <= now:
                        del nodes[node]
                    elif node not in found:
                        found.append(node)
                if not nodes:
                    del self._remote[order_id]
        return found
