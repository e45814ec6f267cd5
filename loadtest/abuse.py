"""What one hostile customer can do to a server: measured, not asserted.

    python -m loadtest.abuse blast [--sockets 10 --frames 5000 --rounds 3]
    python -m loadtest.abuse flood [--messages 10000]
    python -m loadtest.abuse stall [--stall-s 15 --sockets 4 --rate 33]

`blast` (issue 14, item 1): `--sockets` raw websockets of one signed-in
customer each pipeline `--frames` `subscribe` packets for a missing order in
one go, without waiting for a reply, `--rounds` times. Meanwhile a normal
customer subscribes once every 50 ms with the official Python client. It
prints the server's RSS after each round and after `--idle` seconds of
quiet, the normal client's ack latency (median, p99, max) during the blast,
and the server's longest GC pause (`realtime_gc_pause_max_seconds`).

`flood` (item 8): one customer socket pipelines `--messages` chat sends
into its support conversation, which an agent has joined. It prints how
every send was answered (stored, `rate_limited`, or not at all), how many
were stored, stored without an `ok` ack, and received by the agent.

`stall` (item 7): an order chat whose two sides each send `--rate`
messages/s over `--sockets` sockets, retrying a failed send every 0.5 s
with the same client_msg_id; the store is stopped (SIGSTOP) for
`--stall-s`, then continued. It prints how fast `unavailable` was answered
during the stall, how soon a send succeeded after it, what was still
pending 5 s later, and whether any acknowledged message is missing.

The server runs as its own process on the embedded defaults (the `Stack` of
loadtest/quick.py: pinned to CPU 0, the generator on CPU 1). Results go to
docs/reliability.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import signal
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

from loadtest.quick import Stack, client, pct


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def metric(stack: Stack, name: str) -> float:
    async with aiohttp.ClientSession() as s, s.get(f"{stack.url}/metrics") as r:
        for line in (await r.text()).splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    return float("nan")


async def raw_socket(session: aiohttp.ClientSession, stack: Stack, token: str,
                     ns: str = "/orders") -> aiohttp.ClientWebSocketResponse:
    ws = await session.ws_connect(
        f"ws://127.0.0.1:{stack.port}/socket.io/?EIO=4&transport=websocket", max_msg_size=0)
    await ws.receive_str(timeout=10)
    await ws.send_str(f"40{ns}," + json.dumps({"token": token}))
    joined = await ws.receive_str(timeout=10)
    if not joined.startswith(f"40{ns},"):
        raise RuntimeError(f"not joined: {joined[:200]}")
    return ws


class Acks:
    """Acks counted over all of an attacker's sockets; `reached` is set when
    the count gets to `target`."""

    def __init__(self) -> None:
        self.n = 0
        self.target = 0
        self.reached = asyncio.Event()

    def expect(self, more: int) -> None:
        self.target = self.n + more
        self.reached.clear()

    def add(self) -> None:
        self.n += 1
        if self.n >= self.target:
            self.reached.set()


async def drain(ws: aiohttp.ClientWebSocketResponse, acks: Acks) -> None:
    """Read (and count acks) as a real client would; answer pings."""
    while True:
        msg = await ws.receive()
        if msg.type != aiohttp.WSMsgType.TEXT:
            return
        if msg.data == "2":
            await ws.send_str("3")
        elif msg.data.startswith("43"):
            acks.add()


async def run_blast(stack: Stack, sockets: int, frames: int, rounds: int,
                    idle: float) -> dict[str, Any]:
    pid = stack.procs[-1].pid
    run = uuid.uuid4().hex[:6]
    attacker = f"attacker-{run}"
    # The normal client runs in a process of its own: in this one, parsing the
    # attacker's 50,000 acks a round would delay it as much as the server does.
    probe = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loadtest.abuse", "probe", "--url", stack.url,
        "--token", stack.token("customer", f"normal-{run}"),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    assert probe.stdout is not None and probe.stdin is not None
    assert (await probe.stdout.readline()).strip() == b"ready"
    windows: list[tuple[float, float]] = []
    result: dict[str, Any] = {"scenario": "blast", "sockets": sockets, "frames": frames,
                              "rss_start_mb": round(rss_mb(pid), 1), "rounds": []}
    async with aiohttp.ClientSession() as session:
        socks = [await raw_socket(session, stack, stack.token("customer", attacker))
                 for _ in range(sockets)]
        acks = Acks()
        readers = [asyncio.create_task(drain(ws, acks)) for ws in socks]
        packet = '42/orders,{}["subscribe",{{"order_id":"nope"}}]'
        for r in range(rounds):
            before = acks.n
            acks.expect(sockets * frames)
            wall0 = time.time()
            t0 = time.monotonic()
            # No await yields in between: each socket's pipeline goes out at once.
            for ws in socks:
                for i in range(frames):
                    await ws.send_str(packet.format(r * frames + i + 1))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(acks.reached.wait(), 120)
            windows.append((wall0, time.time()))
            result["rounds"].append({
                "acked": acks.n - before, "seconds": round(time.monotonic() - t0, 2),
                "rss_mb": round(rss_mb(pid), 1)})
        await asyncio.sleep(idle)
        result["rss_after_idle_mb"] = round(rss_mb(pid), 1)
        for ws in socks:
            await ws.close()
        for task in readers:
            task.cancel()
    probe.stdin.close()
    lines = (await probe.stdout.read()).decode().split()
    await probe.wait()
    sent = [(float(t), float(ms)) for t, ms in zip(lines[::2], lines[1::2], strict=True)]
    for (start, end), row in zip(windows, result["rounds"], strict=True):
        during = [ms for t, ms in sent if start <= t <= end]
        row["normal_ack_ms"] = {"n": len(during),
                                "p50": round(statistics.median(during), 1) if during else None,
                                "p99": round(pct(during, 99), 1), "max": round(max(during, default=0), 1)}
    result["gc_pause_max_ms"] = round(await metric(stack, "realtime_gc_pause_max_seconds") * 1000, 1)
    return result


async def run_probe(url: str, token: str) -> None:
    """A normal customer: `subscribe` every 50 ms until stdin closes; one line
    `<wall time sent> <ack ms>` per request on stdout."""
    import socketio

    c = socketio.AsyncClient(reconnection=False)
    await c.connect(url, namespaces=["/orders"], auth={"token": token}, transports=["websocket"],
                    wait_timeout=20)
    print("ready", flush=True)
    done = asyncio.get_running_loop().create_future()
    loop = asyncio.get_running_loop()
    stdin = sys.stdin.buffer
    assert isinstance(stdin, io.BufferedReader)  # typed BinaryIO, which has no read1

    def stdin_readable() -> None:
        """What the parent writes is discarded; its end of the pipe closing ends the probe."""
        if not done.done() and not stdin.read1(1 << 16):
            done.set_result(None)

    loop.add_reader(sys.stdin.fileno(), stdin_readable)
    while not done.done():
        sent, t0 = time.time(), time.perf_counter()
        await c.call("subscribe", {"order_id": "nope"}, namespace="/orders", timeout=60)
        print(f"{sent:.3f} {(time.perf_counter() - t0) * 1000:.1f}", flush=True)
        await asyncio.sleep(0.05)
    loop.remove_reader(sys.stdin.fileno())
    await c.disconnect()


async def run_flood(stack: Stack, messages: int) -> dict[str, Any]:
    """One customer socket pipelines `messages` chat sends into its support
    conversation with an agent; nothing may be lost: every send is answered
    (stored, or `rate_limited`), the agent receives exactly what was stored."""
    run = uuid.uuid4().hex[:6]
    agent_id, customer_id = f"fa-{run}", f"fc-{run}"
    agent = await client(stack, "/chat", "agent", agent_id)
    received: list[dict[str, Any]] = []
    agent_heard = asyncio.Event()

    def on_message(message: dict[str, Any]) -> None:
        received.append(message)
        agent_heard.set()

    agent.on("message", on_message, namespace="/chat")
    await agent.call("set_status", {"status": "available"}, namespace="/chat")
    replies: dict[int, Any] = {}
    async with aiohttp.ClientSession() as session:
        ws = await raw_socket(session, stack, stack.token("customer", customer_id), "/chat")
        await ws.send_str('42/chat,0["open",{"kind":"support"}]')
        opened = await ws.receive_str(timeout=10)
        while not opened.startswith("43/chat,0["):  # pushes (queue_position, conversation)
            opened = await ws.receive_str(timeout=10)
        conversation = json.loads(opened[len("43/chat,0"):])[0]["data"]["conversation"]
        cid = conversation["conversation_id"]
        await agent.call("join", {"conversation_id": cid}, namespace="/chat")
        t0 = time.monotonic()
        for i in range(1, messages + 1):
            body = {"conversation_id": cid, "client_msg_id": f"f-{i}", "body": f"刷屏 {i}"}
            await ws.send_str(f"42/chat,{i}" + json.dumps(["send", body], ensure_ascii=False))

        async def read() -> None:
            while len(replies) < messages:
                msg = await ws.receive_str()
                if msg == "2":
                    await ws.send_str("3")
                elif msg.startswith("43/chat,"):
                    head, _, rest = msg[len("43/chat,"):].partition("[")
                    replies[int(head)] = json.loads("[" + rest)[0]

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(read(), 120)
        seconds = time.monotonic() - t0
        await ws.close()
        # Every stored message reaches the agent: wait for as many as were acked.
        stored_ok = sum(1 for r in replies.values() if r.get("ok"))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(30):
                while len(received) < stored_ok:
                    await agent_heard.wait()
                    agent_heard.clear()
    transcript = await http_get(stack, f"/api/conversations/{cid}/messages?limit=1000")
    stored = [m for m in transcript["data"]["messages"] if m["kind"] != "system"]
    acked_ok = {r["data"]["message"]["id"] for r in replies.values() if r.get("ok")}
    codes: dict[str, int] = {}
    for r in replies.values():
        code = "ok" if r.get("ok") else r["error"]["code"]
        codes[code] = codes.get(code, 0) + 1
    await agent.disconnect()
    return {"scenario": "flood", "sent": messages, "answered": len(replies),
            "seconds": round(seconds, 2), "replies": codes,
            "stored": len(stored), "stored_without_ok_ack": len({m["id"] for m in stored} - acked_ok),
            "agent_received": len(received)}


async def run_stall(stack: Stack, stall_s: float, sockets: int, rate: float) -> dict[str, Any]:
    """An order chat whose two sides each send `rate` messages/s over `sockets`
    sockets (a failed send retried with the same client_msg_id every 0.5 s);
    the store is stopped (SIGSTOP) for `stall_s`, then continued. How fast
    is `unavailable` answered during the stall, how soon does a send succeed
    after it, and is any acknowledged message lost?"""
    store = stack.procs[0]
    run = uuid.uuid4().hex[:6]
    order_id, customer_id, tech_id = f"so-{run}", f"sc-{run}", f"st-{run}"
    await http(stack, "POST", "/api/orders", {
        "order_id": order_id, "customer_id": customer_id, "service": {"code": "x", "name": "x"},
        "address": {"lat": 31.23, "lng": 121.47, "text": "x"}, "window": {"start_ts": 0, "end_ts": 1}})
    await http(stack, "POST", f"/api/orders/{order_id}/assign", {"technician_id": tech_id})
    sides = [[await client(stack, "/chat", "customer", customer_id) for _ in range(sockets)],
             [await client(stack, "/chat", "technician", tech_id) for _ in range(sockets)]]
    opened = await sides[0][0].call("open", {"kind": "order", "order_id": order_id}, namespace="/chat")
    cid = opened["data"]["conversation"]["conversation_id"]
    log: list[tuple[float, float, bool, bool]] = []  # sent, answered, ok, shed at once
    acked: set[str] = set()
    pending: set[str] = set()
    stop = asyncio.Event()

    async def attempt(c: Any, cmid: str) -> None:
        while True:
            t0 = time.monotonic()
            r = await c.call("send", {"conversation_id": cid, "client_msg_id": cmid, "body": cmid},
                             namespace="/chat", timeout=60)
            log.append((t0, time.monotonic(), r["ok"], not r["ok"] and "retry_after_ms" in r["error"]))
            if r["ok"]:
                acked.add(cmid)
                pending.discard(cmid)
                return
            await asyncio.sleep(0.5)

    async def side(i: int, clients: list[Any]) -> None:
        n, tasks = 0, []
        while not stop.is_set():
            cmid = f"s{i}-{n}"
            n += 1
            pending.add(cmid)
            tasks.append(asyncio.create_task(attempt(clients[n % len(clients)], cmid)))
            await asyncio.sleep(1 / rate)
        await asyncio.gather(*tasks)

    senders = [asyncio.create_task(side(i, c)) for i, c in enumerate(sides)]
    await asyncio.sleep(3)
    os.kill(store.pid, signal.SIGSTOP)
    stopped = time.monotonic()
    await asyncio.sleep(stall_s)
    os.kill(store.pid, signal.SIGCONT)
    resumed = time.monotonic()
    pending_at_resume = len(pending)
    await asyncio.sleep(5)
    pending_after_5s = len(pending)
    stop.set()
    await asyncio.gather(*senders)
    during = [(t1 - t0, ok, shed) for t0, t1, ok, shed in log if stopped <= t0 < resumed]
    refused = sorted(d for d, ok, _ in during if not ok)
    first_ok = min((t1 for t0, t1, ok, _ in log if ok and t1 >= resumed), default=float("nan"))
    transcript = await http_get(stack, f"/api/conversations/{cid}/messages?limit=1000")
    stored: set[str] = set()
    after = 0
    while True:
        page = transcript["data"]["messages"]
        stored |= {m["client_msg_id"] for m in page}
        if not transcript["data"]["has_more"]:
            break
        after = page[-1]["seq"]
        transcript = await http_get(
            stack, f"/api/conversations/{cid}/messages?limit=1000&after_seq={after}")
    for clients in sides:
        for c in clients:
            await c.disconnect()
    return {"scenario": "stall", "stall_s": stall_s, "sockets_per_side": sockets,
            "rate_per_side": rate, "attempts_during_stall": len(during),
            "unavailable": len(refused), "shed_at_once": sum(1 for _, _, shed in during if shed),
            "unavailable_after_s": {"median": round(statistics.median(refused), 3) if refused else None,
                                    "p99": round(pct(refused, 99), 3),
                                    "max": round(max(refused, default=0), 3)},
            "first_ok_after_resume_s": round(first_ok - resumed, 3),
            "pending_at_resume": pending_at_resume, "pending_5s_after_resume": pending_after_5s,
            "acked": len(acked), "acked_but_not_stored": len(acked - stored)}


async def http(stack: Stack, method: str, path: str, body: Any) -> Any:
    async with aiohttp.ClientSession() as s, s.request(
            method, stack.url + path, json=body,
            headers={"Authorization": f"Bearer {stack.token('service', 'backend')}"}) as r:
        return await r.json()


async def http_get(stack: Stack, path: str) -> Any:
    async with aiohttp.ClientSession() as s, s.get(
            stack.url + path,
            headers={"Authorization": f"Bearer {stack.token('service', 'backend')}"}) as r:
        return await r.json()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.abuse")
    sub = parser.add_subparsers(dest="scenario", required=True)
    blast = sub.add_parser("blast", help="pipelined subscribe frames from one customer's sockets")
    blast.add_argument("--sockets", type=int, default=10)
    blast.add_argument("--frames", type=int, default=5000)
    blast.add_argument("--rounds", type=int, default=3)
    blast.add_argument("--idle", type=float, default=35.0)
    flood = sub.add_parser("flood", help="pipelined chat sends from one customer socket")
    flood.add_argument("--messages", type=int, default=10000)
    stall = sub.add_parser("stall", help="the store stopped under chat traffic, then continued")
    stall.add_argument("--stall-s", type=float, default=15.0)
    stall.add_argument("--sockets", type=int, default=4)
    stall.add_argument("--rate", type=float, default=33.0, help="messages/s per side")
    probe = sub.add_parser("probe", help="(used by blast) a normal client in its own process")
    probe.add_argument("--url", required=True)
    probe.add_argument("--token", required=True)
    args = parser.parse_args()
    if args.scenario == "probe":
        asyncio.run(run_probe(args.url, args.token))
        return

    async def go() -> dict[str, Any]:
        # The stall drives chat faster than one user's default send limit.
        stack = Stack(limits=args.scenario != "stall")
        stack.start()
        try:
            await stack.ready()
            if args.scenario == "flood":
                return await run_flood(stack, args.messages)
            if args.scenario == "stall":
                return await run_stall(stack, args.stall_s, args.sockets, args.rate)
            return await run_blast(stack, args.sockets, args.frames, args.rounds, args.idle)
        finally:
            stack.stop()

    print(json.dumps(asyncio.run(go()), indent=1))


if __name__ == "__main__":
    main()
