"""The raw limit: a bare aiohttp websocket server that speaks just enough
Engine.IO/Socket.IO for the tracking scenario and writes one pre-encoded
frame to each recipient. No auth, no validation, no rooms library: the
machine's ceiling for this relay in Python, to show how close we are.

    python -m loadtest.rawpeer --port 8098
"""

from __future__ import annotations

import argparse
import base64
import json
import math
from collections import defaultdict
from typing import Any

from aiohttp import WSMsgType, web

NS = "/tracking"
OPEN = '0{"sid":"x","upgrades":[],"pingInterval":25000,"pingTimeout":20000,"maxPayload":65536}'


def haversine(lat1: float, lng1: float, lat2: float, lng2: float) -> float:
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lng2 - lng1)
    h = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * 6371008.8 * math.asin(min(1.0, math.sqrt(h)))


def make_app() -> web.Application:
    watchers: dict[str, set[web.WebSocketResponse]] = defaultdict(set)
    prefix = f"42{NS},"
    ack_prefix = f"43{NS},"

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(compress=False, max_msg_size=65536)
        await ws.prepare(request)
        await ws.send_str(OPEN)
        oid: str | None = None
        watching: list[str] = []
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            m = msg.data
            if m.startswith("40"):
                # The order id is the token's `oid` claim (read, not verified:
                # this is the ceiling, not a server).
                auth = json.loads(m[len(NS) + 3:]) if len(m) > len(NS) + 3 else {}
                payload = str(auth.get("token", "..")).split(".")[1]
                claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
                oid = claims.get("oid")
                await ws.send_str(f'40{NS},{{"sid":"{id(ws)}"}}')
            elif m == "3":
                continue
            elif m.startswith(prefix):
                rest = m[len(prefix):]
                b = rest.index("[")
                ack_id = rest[:b]
                event, data = json.loads(rest[b:])
                if event == "location" and oid is not None:
                    dist = haversine(data["lat"], data["lng"], 31.2304, 121.4737)
                    frame = prefix + json.dumps(["position", {
                        "order_id": oid, "technician_id": "t", "lat": data["lat"],
                        "lng": data["lng"], "ts": data["ts"], "eta_s": round(dist * 1.35 / 6.94),
                        "distance_m": round(dist)}], separators=(",", ":"))
                    for w in list(watchers.get(oid, ())):
                        await w.send_str(frame)
                    reply: dict[str, Any] = {"ok": True, "data": {"status": "accepted", "ts": data["ts"]}}
                elif event == "watch":
                    watchers[data["order_id"]].add(ws)
                    watching.append(data["order_id"])
                    reply = {"ok": True, "data": {}}
                else:
                    reply = {"ok": True, "data": {}}
                if ack_id:
                    await ws.send_str(ack_prefix + ack_id + json.dumps([reply]))
        for o in watching:
            watchers[o].discard(ws)
        return ws

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/socket.io/", handler)
    app.router.add_get("/healthz", health)
    return app


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=8098)
    args = ap.parse_args()
    import uvloop

    web.run_app(make_app(), host="127.0.0.1", port=args.port, print=None, access_log=None,
                loop=uvloop.new_event_loop())


if __name__ == "__main__":
    main()
