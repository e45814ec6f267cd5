// Lean load generator: speaks Engine.IO v4 / Socket.IO v5 directly over `ws`
// (offering permessage-deflate, as browsers do). Open-loop: every point has a
// scheduled send time, which is also its `ts`; latency is measured where the
// `position` arrives (same process, same clock). Reports its own CPU and
// event-loop lag so a saturated generator can be told from a slow server.
//
// Input: a JSON file (argv[2]) {url, ns, techs: [{token, order_id}], watchers:
// [{token, order_id}], area: token|null, rate, duration, warmup, idle: bool,
// burst: {factor, seconds, at_ms} | null, connect_parallel, watchers_url?, tech_urls?,
// watcher_urls?} (the lists spread technicians, and watchers, round-robin over
// nodes). Output: JSON on stdout;
// a progress line per second on stderr.
import fs from "node:fs";
import { monitorEventLoopDelay, performance } from "node:perf_hooks";
import WebSocket from "ws";

const cfg = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const NS = cfg.ns || "/tracking";
const wsUrlOf = (u) => u.replace(/^http/, "ws") + "/socket.io/?EIO=4&transport=websocket";
const wsUrl = wsUrlOf(cfg.url);
// Watchers (and the area watcher) may sit on another node than the technicians.
const watchersWsUrl = wsUrlOf(cfg.watchers_url || cfg.url);
const techWsUrls = (cfg.tech_urls || [cfg.url]).map(wsUrlOf);
const watcherWsUrls = (cfg.watcher_urls || [cfg.watchers_url || cfg.url]).map(wsUrlOf);
const nowMs = () => performance.timeOrigin + performance.now();

const lat = [];            // delivery latencies (ms) after warm-up
let delivered = 0, deliveredWarm = 0, acks = 0, ackErrors = 0, areaBatches = 0, sent = 0, sentWarm = 0;
let connectErrors = 0, closed = 0, retries = 0;
let measuring = false;
const ackLat = [];
const ackErrorSamples = [];

function connect(token, onEvent, url = wsUrl) {
  return new Promise((resolve) => {
    const ws = new WebSocket(url, { perMessageDeflate: true });
    const sock = { ws, ready: false, pending: new Map(), nextId: 1, retry: new Map(), retrying: 0 };
    let settled = false;
    const done = (ok) => { if (!settled) { settled = true; resolve(ok ? sock : null); } };
    ws.on("message", (buf, isBinary) => {
      const m = buf.toString();
      if (m === "2") { ws.send("3"); return; }
      if (m[0] === "0") { ws.send(`40${NS},` + JSON.stringify({ token })); return; }
      if (m.startsWith(`40${NS},`)) { sock.ready = true; done(true); return; }
      if (m.startsWith(`44${NS},`)) { connectErrors++; done(false); return; }
      if (m.startsWith(`42${NS},`)) {
        const arr = JSON.parse(m.slice(NS.length + 3));
        onEvent(arr[0], arr[1]);
        return;
      }
      if (m.startsWith(`43${NS},`)) {
        const rest = m.slice(NS.length + 3);
        const b = rest.indexOf("[");
        const id = Number(rest.slice(0, b));
        const t0 = sock.pending.get(id);
        sock.pending.delete(id);
        const reply = JSON.parse(rest.slice(b))[0];
        const again = sock.retry.get(id);
        sock.retry.delete(id);
        if (again && reply && reply.ok === false && reply.error && reply.error.code === "unavailable") {
          // What the apps do (PROTOCOL.md): `unavailable` means retry, after a pause.
          retries++;
          sock.retrying++;
          setTimeout(() => { sock.retrying--; emit(sock, again[0], again[1], true, true); },
                     200 + Math.random() * 800);
          return;
        }
        acks++;
        if (!reply || reply.ok !== true) {
          ackErrors++;
          if (ackErrorSamples.length < 5) ackErrorSamples.push(reply);
        }
        if (t0 !== undefined && measuring) ackLat.push(nowMs() - t0);
      }
    });
    ws.on("error", () => { connectErrors++; done(false); });
    ws.on("close", () => { closed++; done(false); });
  });
}

function emit(sock, event, data, withAck = true, retry = false) {
  if (sock.ws.readyState !== 1) return;
  if (withAck) {
    const id = sock.nextId++;
    sock.pending.set(id, nowMs());
    if (retry) sock.retry.set(id, [event, data]);
    sock.ws.send(`42${NS},${id}` + JSON.stringify([event, data]));
  } else {
    sock.ws.send(`42${NS},` + JSON.stringify([event, data]));
  }
}

async function inBatches(items, n, fn) {
  const out = [];
  for (let i = 0; i < items.length; i += n) {
    out.push(...await Promise.all(items.slice(i, i + n).map((x, k) => fn(x, i + k))));
  }
  return out;
}

// Latency by the second each point was sent in (from the schedule's start):
// what the burst scenario's recovery time is read from.
let scheduleStart = 0;
const bySecond = new Map();
const onWatcher = (ev, data) => {
  if (ev === "position") {
    delivered++;
    const l = nowMs() - data.ts;
    if (measuring) { deliveredWarm++; lat.push(l); }
    if (scheduleStart) {
      const sec = Math.floor((data.ts - scheduleStart) / 1000);
      let b = bySecond.get(sec);
      if (!b) { b = []; bySecond.set(sec, b); }
      b.push(l);
    }
  }
};
const onArea = (ev) => { if (ev === "positions") areaBatches++; };

const par = cfg.connect_parallel || 100;
const t0 = nowMs();
const techs = await inBatches(cfg.techs, par,
  (t, i) => connect(t.token, () => {}, techWsUrls[i % techWsUrls.length]));
const watchers = await inBatches(cfg.watchers, par,
  (w, i) => connect(w.token, onWatcher, watcherWsUrls[i % watcherWsUrls.length]));
let area = null;
if (cfg.area) area = await connect(cfg.area, onArea, watchersWsUrl);
const connectS = (nowMs() - t0) / 1000;
const okTechs = techs.filter(Boolean), okWatchers = watchers.filter(Boolean);
for (let i = 0; i < cfg.watchers.length; i++) {
  if (watchers[i]) emit(watchers[i], "watch", { order_id: cfg.watchers[i].order_id }, true, true);
}
if (area) emit(area, "watch_area", { min_lat: -90, min_lng: -180, max_lat: 90, max_lng: 180 }, true, true);
// Every watch answered (up to 120 s) before the schedule starts: a position
// sent before its watcher joined would count as lost.
const watchT0 = nowMs();
const watching = [...okWatchers, ...(area ? [area] : [])];
while (watching.some((w) => (w.pending.size > 0 || w.retrying > 0) && w.ws.readyState === 1) && nowMs() - watchT0 < 120000) {
  await new Promise((r) => setTimeout(r, 50));
}
const watchS = (nowMs() - watchT0) / 1000;
await new Promise((r) => setTimeout(r, 1000));

const loop = monitorEventLoopDelay({ resolution: 5 });
const cpu0 = process.cpuUsage();
const wall0 = nowMs();
const result = {
  connected: { techs: okTechs.length, watchers: okWatchers.length, area: !!area, seconds: connectS,
               watch_seconds: watchS },
};

if (cfg.idle) {
  // Hold the connections; the caller samples the server's memory meanwhile.
  process.stderr.write(`holding ${okTechs.length}\n`);
  await new Promise((r) => setTimeout(r, (cfg.duration || 10) * 1000));
} else {
  loop.enable();
  const n = okTechs.length;
  const base = cfg.rate;             // points/s in total
  const start = nowMs() + 100;
  scheduleStart = start;
  const end = start + (cfg.warmup + cfg.duration) * 1000;
  const warmEnd = start + cfg.warmup * 1000;
  // Per technician: next scheduled send (ms), position step.
  const next = new Float64Array(n);
  const seq = new Int32Array(n);
  for (let i = 0; i < n; i++) next[i] = start + (i / n) * (1000 * n / base);
  const rateAt = (t) => {
    if (cfg.burst && t >= cfg.burst.at_ms + start && t < cfg.burst.at_ms + start + cfg.burst.seconds * 1000) {
      return base * cfg.burst.factor;
    }
    return base;
  };
  let lastReport = nowMs(), lastDelivered = 0, lastSent = 0;
  const perSecond = [];
  await new Promise((resolve) => {
    const tick = () => {
      const now = nowMs();
      if (!measuring && now >= warmEnd) { measuring = true; process.stderr.write("\nmark measure-start\n"); }
      const interval = 1000 * n / rateAt(now);
      for (let i = 0; i < n; i++) {
        while (next[i] <= now && next[i] < end) {
          const ts = Math.floor(next[i]);
          seq[i]++;
          emit(okTechs[i], "location", { lat: 31.2 + (i % 100) * 0.001 + seq[i] * 1e-6,
                                         lng: 121.4 + Math.floor(i / 100) * 0.001, ts });
          sent++;
          if (measuring) sentWarm++;
          next[i] += interval;
        }
      }
      if (now - lastReport >= 1000) {
        const d = delivered - lastDelivered, s = sent - lastSent;
        perSecond.push({ t: Math.round((now - start) / 1000), sent: s, delivered: d,
                         p99: null });
        process.stderr.write(`\r t=${Math.round((now - start) / 1000)}s sent/s=${s} delivered/s=${d} ` +
                             `acks=${acks} loop_p99=${(loop.percentile(99) / 1e6).toFixed(1)}ms   `);
        lastReport = now; lastDelivered = delivered; lastSent = sent;
      }
      if (now >= end + (cfg.drain_s ?? 2) * 1000) { resolve(); return; }
      setTimeout(tick, 1);
    };
    tick();
  });
  process.stderr.write("\nmark measure-end\n");
  measuring = false;
  lat.sort((a, b) => a - b);
  ackLat.sort((a, b) => a - b);
  const pct = (arr, p) => arr.length ? arr[Math.min(arr.length - 1, Math.floor(p / 100 * arr.length))] : null;
  const expected = sentWarm * (okWatchers.length / Math.max(1, n));
  Object.assign(result, {
    offered_per_s: base, sent: sent, sent_measured: sentWarm, delivered_measured: deliveredWarm,
    expected_measured: Math.round(expected),
    delivered_ratio: expected ? deliveredWarm / expected : null,
    latency_ms: { p50: pct(lat, 50), p90: pct(lat, 90), p99: pct(lat, 99), max: lat.length ? lat[lat.length - 1] : null },
    ack_ms: { p50: pct(ackLat, 50), p99: pct(ackLat, 99) },
    acks, ack_errors: ackErrors, ack_error_samples: ackErrorSamples, retries, area_batches: areaBatches, per_second: perSecond,
    by_send_second: [...bySecond.keys()].sort((a, b) => a - b).map((sec) => {
      const b = bySecond.get(sec).sort((x, y) => x - y);
      return { sec, n: b.length, p50: pct(b, 50), p99: pct(b, 99) };
    }),
  });
}
const cpu = process.cpuUsage(cpu0);
const wall = (nowMs() - wall0) / 1000;
result.generator = {
  cpu_ratio: (cpu.user + cpu.system) / 1e6 / wall,
  loop_lag_p99_ms: loop.percentile(99) / 1e6,
  loop_lag_max_ms: loop.max / 1e6,
  connect_errors: connectErrors, closed,
};
process.stdout.write(JSON.stringify(result) + "\n");
process.exit(0);
