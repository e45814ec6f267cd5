"""``python -m realtime demo``: the server in dev mode on the embedded defaults,
plus a small simulated city that uses it the way the real apps would.

Everything goes through the public surface — the HTTP API with a service token,
Socket.IO with technician, customer and agent tokens — never around it:

- technicians on real-looking routes in Shanghai (polylines along streets),
  sending ``location`` once a second with ``coord_sys: "gcj02"`` as a Chinese
  map SDK would; one waits idle, one goes offline;
- orders created by "the backend" and dispatched to the nearest suitable
  technicians; the intended technician accepts (others decline), drives
  (``en_route``), arrives by the server's geofence, then starts and completes
  the service; then the next order, the route driven the other way;
- a customer who opens a support chat and waits in the queue, an away agent
  to transfer to, feedback in the inbox;
- calendars for every technician (``PUT /api/technicians/{id}/calendar``):
  the simulated ones work all day, every day (the demo's own orders start
  ten minutes from now, whenever now is), a few more are bookable in the
  daytime only, all around the city centre, so /book shows real free times;
- it prints the URLs of the four pages, with tokens in the URL fragment.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import random
import signal
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import socketio
from aiohttp import web

from realtime.app import create_app
from realtime.auth import mint_token
from realtime.settings import Settings
from tracking.geo import haversine_m, wgs84_to_gcj02

log = logging.getLogger("realtime.demo")

TOKEN_TTL_S = 24 * 3600
SPEED_MPS = 13.0        # a van in city traffic, a little optimistic
TICK_S = 1.0            # one fix a second while driving
IDLE_TICK_S = 10.0      # a fix every 10 s while waiting (positions stay fresh for dispatch)
ARRIVED_WAIT_S = 15.0   # arrived -> in_service
SERVICE_S = 30.0        # in_service -> completed
REST_S = 20.0           # completed -> next order

# Streets in central Shanghai, WGS-84 (lat, lng), as driven from the first point to the last.
ROUTES: dict[str, tuple[str, list[tuple[float, float]]]] = {
    "nanjing": ("南京西路 → 西藏中路", [
        (31.2306, 121.4603), (31.2315, 121.4628), (31.2326, 121.4655), (31.2336, 121.4680),
        (31.2345, 121.4705), (31.2352, 121.4728), (31.2357, 121.4752), (31.2361, 121.4776),
        (31.2343, 121.4779), (31.2326, 121.4781), (31.2312, 121.4783)]),
    "century": ("世纪大道", [
        (31.2393, 121.5010), (31.2378, 121.5036), (31.2362, 121.5064), (31.2345, 121.5092),
        (31.2327, 121.5121), (31.2309, 121.5150), (31.2290, 121.5180), (31.2276, 121.5204),
        (31.2261, 121.5229)]),
    "huaihai": ("淮海中路", [
        (31.2141, 121.4503), (31.2150, 121.4530), (31.2160, 121.4560), (31.2168, 121.4588),
        (31.2177, 121.4615), (31.2188, 121.4645), (31.2198, 121.4672), (31.2207, 121.4700),
        (31.2214, 121.4726)]),
    "bund": ("中山东一路（外滩）", [
        (31.2297, 121.4912), (31.2318, 121.4916), (31.2340, 121.4918), (31.2362, 121.4916),
        (31.2384, 121.4912), (31.2405, 121.4907), (31.2426, 121.4899), (31.2446, 121.4889),
        (31.2451, 121.4866)]),
}


@dataclass
class Tech:
    id: str
    name: str
    skills: list[str]
    route: str | None  # None: waits where it is
    home: tuple[float, float]
    token: str = ""
    tracking: socketio.AsyncClient = field(default_factory=socketio.AsyncClient)
    orders: socketio.AsyncClient = field(default_factory=socketio.AsyncClient)
    chat: socketio.AsyncClient = field(default_factory=socketio.AsyncClient)
    pos: tuple[float, float] = (0.0, 0.0)
    last_ts: int = 0
    intended: set[str] = field(default_factory=set)
    arrived: dict[str, asyncio.Event] = field(default_factory=dict)
    last_reply: float = 0.0


# (id, name, skills, route or None to stay put, where they start)
TECH_SPECS: list[tuple[str, str, list[str], str | None, tuple[float, float]]] = [
    ("t-zhang", "张师傅", ["aircon", "appliance"], "nanjing", ROUTES["nanjing"][1][0]),
    ("t-li", "李师傅", ["plumbing"], "century", ROUTES["century"][1][0]),
    ("t-wang", "王师傅", ["cleaning"], "huaihai", ROUTES["huaihai"][1][0]),
    ("t-zhao", "赵师傅", ["appliance", "aircon"], "bund", ROUTES["bund"][1][0]),
    ("t-chen", "陈师傅", ["aircon", "plumbing"], None, (31.2192, 121.4560)),
    ("t-sun", "孙师傅", ["cleaning"], None, (31.2265, 121.4800)),
]
SERVICES = {
    "nanjing": ({"code": "aircon_repair", "name": "空调维修"}, ["aircon"], "黄浦区西藏中路 268 号"),
    "century": ({"code": "plumbing", "name": "水管维修"}, ["plumbing"], "浦东新区世纪大道 1568 号"),
    "huaihai": ({"code": "housekeeping", "name": "日常保洁"}, ["cleaning"], "黄浦区淮海中路 300 号"),
    "bund": ({"code": "appliance_repair", "name": "家电维修"}, ["appliance"], "黄浦区中山东一路 13 号"),
}
# Bookable only: a calendar and no app (no GPS, no simulation); /book offers their
# time, and a booking is assigned to them straight away.
# (id, skills, home); they work 08:00-20:00 every day.
BOOKABLE: list[tuple[str, list[str], tuple[float, float]]] = [
    ("t-zhou", ["aircon", "appliance"], (31.2381, 121.4652)),
    ("t-wu", ["plumbing"], (31.2212, 121.4883)),
    ("t-zheng", ["cleaning"], (31.2290, 121.4561)),
    ("t-feng", ["aircon", "plumbing"], (31.2151, 121.4752)),
    ("t-he", ["cleaning", "appliance"], (31.2423, 121.4822)),
]
CITY_CENTRE = (31.2304, 121.4737)  # People's Square: the /book page's default place
CITY_TZ = ZoneInfo("Asia/Shanghai")  # the calendars' timezone (their default)
AREA_M = 15_000.0  # everyone serves this far around the centre
ALL_DAY = [{"weekday": d, "start": "00:00", "end": "00:00"} for d in range(7)]
DAYTIME = [{"weekday": d, "start": "08:00", "end": "20:00"} for d in range(7)]
CUSTOMERS = ["王女士", "刘先生", "陈女士", "赵先生", "周女士", "吴先生", "郑女士", "孙先生"]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def order_window(now: int) -> dict[str, int]:
    """The demo's orders: from ten minutes on, for an hour, ended at midnight
    (city time) when it comes first: a calendar's days are separate shifts,
    and a job must lie inside one (docs/scheduling.md)."""
    start = now + 10 * 60_000
    local = datetime.fromtimestamp(start / 1000, CITY_TZ)
    midnight = datetime(local.year, local.month, local.day, tzinfo=CITY_TZ) + timedelta(days=1)
    return {"start_ts": start, "end_ts": min(start + 3_600_000, int(midnight.timestamp() * 1000))}


def heading(a: tuple[float, float], b: tuple[float, float]) -> float:
    dlng = math.radians(b[1] - a[1])
    la, lb = math.radians(a[0]), math.radians(b[0])
    y = math.sin(dlng) * math.cos(lb)
    x = math.cos(la) * math.sin(lb) - math.sin(la) * math.cos(lb) * math.cos(dlng)
    return (math.degrees(math.atan2(y, x)) + 360.0) % 360.0


def walk(points: list[tuple[float, float]], step_m: float) -> list[tuple[float, float, float]]:
    """Points every `step_m` metres along a polyline, with their heading; ends at its end."""
    out: list[tuple[float, float, float]] = []
    for a, b in itertools.pairwise(points):
        seg = haversine_m(a[0], a[1], b[0], b[1])
        n = max(1, math.ceil(seg / step_m))
        hd = heading(a, b)
        for i in range(n):
            f = i / n
            out.append((a[0] + (b[0] - a[0]) * f, a[1] + (b[1] - a[1]) * f, hd))
    last = points[-1]
    out.append((last[0], last[1], out[-1][2] if out else 0.0))
    return out


class Demo:
    def __init__(self, settings: Settings, base_url: str, public_url: str) -> None:
        self.settings = settings
        self.base = base_url
        self.public = public_url
        self.run_id = time.strftime("%H%M%S")
        self.service_token = self.token("service", "demo-backend", "演示后台")
        self.http: aiohttp.ClientSession | None = None
        self.clients: list[socketio.AsyncClient] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.customer_names = itertools.cycle(CUSTOMERS)
        self.order_no = itertools.count(1)
        self.customer_no = itertools.count(1)
        self.techs = [Tech(*spec) for spec in TECH_SPECS]

    def token(self, role: str, sub: str, name: str | None = None, skills: list[str] | None = None) -> str:
        return mint_token(self.settings, sub=sub, role=role, name=name, skills=skills, ttl_s=TOKEN_TTL_S)

    # -- plumbing ----------------------------------------------------------------------------
    async def api(self, method: str, path: str, body: Any = None, token: str | None = None) -> Any:
        assert self.http is not None
        headers = {"Authorization": f"Bearer {token or self.service_token}"}
        async with self.http.request(method, self.base + path, json=body, headers=headers) as resp:
            reply = await resp.json(content_type=None)
        if not reply.get("ok"):
            raise RuntimeError(f"{method} {path}: {reply.get('error')}")
        return reply["data"]

    async def sio(self, client: socketio.AsyncClient, namespace: str, token: str) -> socketio.AsyncClient:
        await client.connect(self.base, namespaces=[namespace], auth={"token": token},
                             transports=["websocket"], wait_timeout=10)
        self.clients.append(client)
        return client

    @staticmethod
    async def call(client: socketio.AsyncClient, namespace: str, event: str, data: Any) -> Any:
        reply = await client.call(event, data, namespace=namespace, timeout=10)
        if not reply.get("ok"):
            raise RuntimeError(f"{namespace} {event}: {reply.get('error')}")
        return reply["data"]

    def spawn(self, coro: Any, name: str) -> None:
        async def guarded() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("demo task %s failed", name)

        self.tasks.append(asyncio.get_running_loop().create_task(guarded(), name=name))

    # -- technicians ------------------------------------------------------------------------------
    async def send_fix(self, tech: Tech, lat: float, lng: float, hd: float | None, speed: float) -> None:
        """One GPS fix, in GCJ-02 as a Chinese map SDK reports it."""
        j = 0.000015  # a few metres of GPS noise
        glat, glng = wgs84_to_gcj02(lat + random.uniform(-j, j), lng + random.uniform(-j, j))
        ts = max(now_ms(), tech.last_ts + 1)
        point: dict[str, Any] = {"lat": round(glat, 7), "lng": round(glng, 7), "ts": ts,
                                 "accuracy": round(random.uniform(4, 12), 1),
                                 "speed": round(speed, 1), "coord_sys": "gcj02"}
        if hd is not None:
            point["heading"] = round(hd, 1)
        with contextlib.suppress(Exception):  # a dropped fix is what GPS does anyway
            await tech.tracking.call("location", point, namespace="/tracking", timeout=5)
        tech.pos, tech.last_ts = (lat, lng), ts

    async def connect_tech(self, tech: Tech) -> None:
        tech.token = self.token("technician", tech.id, tech.name, tech.skills)
        tech.pos = tech.home

        @tech.orders.on("offer", namespace="/orders")
        async def offer(data: dict[str, Any]) -> None:
            await asyncio.sleep(random.uniform(1.0, 2.5))  # reading the offer
            event = "accept" if data["order_id"] in tech.intended else "decline"
            with contextlib.suppress(Exception):
                await tech.orders.call(event, {"order_id": data["order_id"]}, namespace="/orders", timeout=10)

        @tech.orders.on("order_event", namespace="/orders")
        async def order_event(ev: dict[str, Any]) -> None:
            if ev.get("type") == "state_changed" and ev.get("state") == "arrived":
                tech.arrived.setdefault(ev["order_id"], asyncio.Event()).set()

        @tech.chat.on("message", namespace="/chat")
        async def message(msg: dict[str, Any]) -> None:
            # Customers who write to their technician get a short answer.
            if (msg.get("sender") or {}).get("role") != "customer" or time.monotonic() - tech.last_reply < 20:
                return
            tech.last_reply = time.monotonic()
            await asyncio.sleep(2.0)
            with contextlib.suppress(Exception):
                await tech.chat.call("send", {"conversation_id": msg["conversation_id"],
                                              "client_msg_id": f"auto-{msg['id']}",
                                              "body": "好的，收到！"}, namespace="/chat", timeout=10)

        await self.sio(tech.tracking, "/tracking", tech.token)
        await self.sio(tech.orders, "/orders", tech.token)
        await self.sio(tech.chat, "/chat", tech.token)
        await self.send_fix(tech, *tech.home, None, 0.0)

    async def idle(self, tech: Tech, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            await asyncio.sleep(min(IDLE_TICK_S, max(0.0, end - time.monotonic())))
            await self.send_fix(tech, *tech.pos, None, 0.0)

    async def say(self, tech: Tech, order_id: str, body: str) -> None:
        with contextlib.suppress(Exception):
            opened = await self.call(tech.chat, "/chat", "open", {"kind": "order", "order_id": order_id})
            await self.call(tech.chat, "/chat", "send", {
                "conversation_id": opened["conversation"]["conversation_id"],
                "client_msg_id": f"say-{order_id}-{now_ms()}", "body": body})

    # -- orders ------------------------------------------------------------------------------------
    async def create_order(self, tech: Tech, route_key: str, address: tuple[float, float],
                           customer: tuple[str, str]) -> str:
        service, skills, text = SERVICES[route_key]
        order_id = f"o-{self.run_id}-{next(self.order_no)}"
        await self.api("POST", "/api/orders", {
            "order_id": order_id, "customer_id": customer[0], "service": service,
            "address": {"lat": address[0], "lng": address[1], "text": text},
            "window": order_window(now_ms()), "skills": skills})
        tech.intended.add(order_id)
        return order_id

    async def dispatch(self, tech: Tech, order_id: str) -> bool:
        """Dispatch as the backend would; the intended technician accepts, the others
        decline. If the round ends without them, assign directly. False (and the
        order cancelled) when their day has no room for it: someone booked that
        time on /book."""
        with contextlib.suppress(Exception):
            await self.api("POST", f"/api/orders/{order_id}/dispatch",
                           {"strategy": "sequential", "count": 4, "timeout_s": 12})
        for _ in range(90):
            order = (await self.api("GET", f"/api/orders/{order_id}"))["order"]
            if order["state"] != "created":
                break
            rounds = (await self.api("GET", f"/api/orders/{order_id}/dispatch"))["dispatches"]
            if rounds and all(r["status"] != "running" for r in rounds):
                try:
                    await self.api("POST", f"/api/orders/{order_id}/assign", {"technician_id": tech.id})
                except RuntimeError as exc:  # refused: their schedule is taken then
                    log.warning("demo order %s not assigned to %s: %s", order_id, tech.id, exc)
                break
            await asyncio.sleep(1.0)
        order = (await self.api("GET", f"/api/orders/{order_id}"))["order"]
        if order["state"] == "assigned" and order.get("technician_id") == tech.id:
            return True
        with contextlib.suppress(Exception):
            await self.api("POST", f"/api/orders/{order_id}/events", {"state": "cancelled"})
        return False

    async def serve_order(self, tech: Tech, order_id: str, route: list[tuple[float, float]]) -> None:
        """Drive there, arrive (the geofence decides), do the job."""
        arrived = tech.arrived.setdefault(order_id, asyncio.Event())
        await asyncio.sleep(3.0)
        await self.call(tech.orders, "/orders", "progress", {"order_id": order_id, "state": "en_route"})
        length = sum(haversine_m(*a, *b) for a, b in itertools.pairwise(route))
        minutes = max(1, round(length / SPEED_MPS / 60))
        await self.say(tech, order_id, f"您好，我是{tech.name}，已经出发，大约 {minutes} 分钟到。")
        for lat, lng, hd in walk(route, SPEED_MPS * TICK_S):
            await self.send_fix(tech, lat, lng, hd, SPEED_MPS * random.uniform(0.85, 1.1))
            await asyncio.sleep(TICK_S)
        for _ in range(3):  # parked at the door: the geofence needs two fixes inside
            await self.send_fix(tech, *route[-1], None, 0.0)
            await asyncio.sleep(TICK_S)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(arrived.wait(), 10)
        if not arrived.is_set():
            await self.call(tech.orders, "/orders", "progress", {"order_id": order_id, "state": "arrived"})
        await self.say(tech, order_id, "我到楼下了，马上上来。")
        await self.idle(tech, ARRIVED_WAIT_S)
        await self.call(tech.orders, "/orders", "progress", {"order_id": order_id, "state": "in_service"})
        await self.idle(tech, SERVICE_S)
        await self.call(tech.orders, "/orders", "progress", {"order_id": order_id, "state": "completed"})

    async def technician_loop(self, tech: Tech, first: tuple[str, tuple[str, str]] | None,
                              delay: float) -> None:
        assert tech.route is not None
        points = ROUTES[tech.route][1]
        forward = True
        await self.idle(tech, delay)
        while True:
            route = points if forward else list(reversed(points))
            if first is not None:
                order_id, customer = first
                first = None
            else:
                customer = self.new_customer()
                order_id = await self.create_order(tech, tech.route, route[-1], customer)
                print(f"  new order {order_id} for {customer[1]}: {self.track_url(order_id, customer)}",
                      flush=True)
            if not await self.dispatch(tech, order_id):
                await self.idle(tech, REST_S)
                continue
            await self.serve_order(tech, order_id, route)
            forward = not forward
            await self.idle(tech, REST_S)

    # -- customers and agents ---------------------------------------------------------------------
    def new_customer(self) -> tuple[str, str]:
        name = next(self.customer_names)
        return f"c-{self.run_id}-{next(self.customer_no)}", name

    async def set_calendars(self) -> None:
        """Everyone's working hours, skills, home and area, as the backend sets them."""
        area = {"circle": {"lat": CITY_CENTRE[0], "lng": CITY_CENTRE[1], "radius_m": AREA_M}}
        hours: list[tuple[str, list[str], tuple[float, float], list[dict[str, Any]]]] = [
            (t.id, t.skills, t.home, ALL_DAY) for t in self.techs]
        hours += [(tid, skills, home, DAYTIME) for tid, skills, home in BOOKABLE]
        for tid, skills, home, weekly in hours:
            await self.api("PUT", f"/api/technicians/{tid}/calendar", {
                "timezone": CITY_TZ.key, "weekly": weekly, "skills": skills,
                "home": {"lat": home[0], "lng": home[1]}, "area": area})

    def book_url(self, customer: tuple[str, str]) -> str:
        return f"{self.public}/book#token={self.token('customer', customer[0], customer[1])}"

    def track_url(self, order_id: str, customer: tuple[str, str]) -> str:
        return f"{self.public}/track/{order_id}#token={self.token('customer', customer[0], customer[1])}"

    async def support_customer(self, customer: tuple[str, str], order_id: str | None, topic: str,
                               first: str, delay: float) -> None:
        await asyncio.sleep(delay)
        client = socketio.AsyncClient(reconnection=True)
        answered = asyncio.Event()

        @client.on("message", namespace="/chat")
        async def message(msg: dict[str, Any]) -> None:
            if (msg.get("sender") or {}).get("role") == "agent" and not answered.is_set():
                answered.set()
                await asyncio.sleep(3.0)
                with contextlib.suppress(Exception):
                    await client.call("send", {"conversation_id": msg["conversation_id"],
                                               "client_msg_id": f"thanks-{msg['id']}",
                                               "body": "好的，明白了，谢谢！"}, namespace="/chat", timeout=10)

        await self.sio(client, "/chat", self.token("customer", customer[0], customer[1]))
        opened = await self.call(client, "/chat", "open",
                                 {"kind": "support", **({"order_id": order_id} if order_id else {}),
                                  "topic": topic})
        cid = opened["conversation"]["conversation_id"]
        await self.call(client, "/chat", "send", {"conversation_id": cid,
                                                  "client_msg_id": f"first-{cid}", "body": first})

    async def backup_agent(self) -> None:
        """小刚: online but away — a colleague to transfer to. Greets what he is given."""
        client = socketio.AsyncClient(reconnection=True)
        greeted: set[str] = set()

        @client.on("conversation", namespace="/chat")
        async def conversation(conv: dict[str, Any]) -> None:
            cid = conv["conversation_id"]
            if conv.get("assignee") == "a-gang" and conv.get("status") == "assigned" and cid not in greeted:
                greeted.add(cid)
                await asyncio.sleep(2.0)
                with contextlib.suppress(Exception):
                    await client.call("send", {"conversation_id": cid, "client_msg_id": f"hi-{cid}",
                                               "body": "您好，我是小刚，接下来由我为您处理。"},
                                      namespace="/chat", timeout=10)

        await self.sio(client, "/chat", self.token("agent", "a-gang", "小刚"))

    # -- the whole show ------------------------------------------------------------------------------
    async def start(self) -> None:
        self.http = aiohttp.ClientSession()
        await self.set_calendars()  # before any order: assignments must fit them
        for tech in self.techs:
            await self.connect_tech(tech)
        # 孙师傅 signs off: the ops map shows him offline where he was last seen.
        sun = next(t for t in self.techs if t.id == "t-sun")
        await sun.tracking.disconnect()
        await self.backup_agent()

        first_customer = (f"c-{self.run_id}-wang", "王女士")
        zhang = self.techs[0]
        assert zhang.route is not None
        featured = await self.create_order(zhang, zhang.route, ROUTES[zhang.route][1][-1], first_customer)
        li = self.techs[1]
        assert li.route is not None
        liu = (f"c-{self.run_id}-liu", "刘先生")
        second = await self.create_order(li, li.route, ROUTES[li.route][1][-1], liu)

        for fb in ({"category": "app", "body": "地图上能看到师傅的实时位置，很方便！"},
                   {"category": "service", "body": "师傅很准时，就是希望能提前打个电话。"}):
            await self.api("POST", "/api/feedback", fb, token=self.token("customer", "c-zhou", "周女士"))

        self.spawn(self.technician_loop(zhang, (featured, first_customer), 1.0), "t-zhang")
        self.spawn(self.technician_loop(li, (second, liu), 8.0), "t-li")
        for tech, delay in ((self.techs[2], 25.0), (self.techs[3], 45.0)):
            self.spawn(self.technician_loop(tech, None, delay), tech.id)
        for tech in self.techs[4:5]:
            self.spawn(self.idle(tech, float("inf")), tech.id)
        self.spawn(self.support_customer(liu, second, "师傅什么时候到？",
                                         "你好，我的水管维修订单，师傅大概几点能到？", 4.0), "support-liu")
        self.spawn(self.support_customer((f"c-{self.run_id}-wu", "吴先生"), None, "发票问题",
                                         "请问上次的保洁服务可以开发票吗？", 40.0), "support-wu")

        agent = self.token("agent", "a-mei", "小美")
        admin = self.token("admin", "ops-admin", "调度员")
        print(f"""
Realtime demo running (dev mode) at {self.public}

  Booking (王女士 books a time; pay, and the order opens in tracking):
    {self.book_url(first_customer)}
  Customer tracking (王女士, order {featured}):
    {self.track_url(featured, first_customer)}
  Agent console (客服 小美):
    {self.public}/console#token={agent}
  Ops map (调度员):
    {self.public}/ops#token={admin}
    dispatch records to look up: {featured}, {second}

  Or open any page without a token and use the dev sign-in form.
  Add ?lang=en for English. Ctrl-C stops the demo.
""", flush=True)

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for client in self.clients:
            with contextlib.suppress(Exception):
                await client.disconnect()
        if self.http is not None:
            await self.http.close()


def check_port(host: str, port: int) -> None:
    """Fail fast, before the store starts, when the port is taken."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise SystemExit(f"cannot listen on {host}:{port} ({exc.strerror}); is another server "
                             "running? Set REALTIME_PORT to use another port.") from None


async def run(settings: Settings) -> None:
    check_port(settings.host, settings.port)
    app = create_app(settings)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    port = runner.addresses[0][1] if runner.addresses else settings.port
    host = "localhost" if settings.host in ("0.0.0.0", "::", "") else settings.host
    demo = Demo(settings, f"http://127.0.0.1:{port}", f"http://{host}:{port}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await demo.start()
        await stop.wait()
    finally:
        print("stopping the demo…", flush=True)
        await demo.stop()
        await runner.cleanup()
