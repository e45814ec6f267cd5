// Reference peer: Node.js socket.io 4.8 (+ @socket.io/redis-adapter when
// REDIS_URL is set) doing the same relay as our `tracking` scenario: same
// namespace, events, payloads, rooms and acks, a JWT check in middleware.
// Used only by the benchmark (python -m loadtest bench).
import http from "node:http";
import { Server } from "socket.io";
import { createAdapter, createShardedAdapter } from "@socket.io/redis-adapter";
import { createClient, createCluster } from "redis";
import jwt from "jsonwebtoken";

const PORT = Number(process.env.PORT || 8099);
const SECRET = process.env.JWT_SECRET;
const REDIS_URL = process.env.REDIS_URL || "";
// A Redis Cluster's nodes (comma-separated redis:// URLs): socket.io's sharded
// adapter (SPUBLISH/SSUBSCRIBE), as its docs set it up with node-redis.
const REDIS_CLUSTER = process.env.REDIS_CLUSTER || "";

const server = http.createServer((req, res) => {
  if (req.url === "/healthz") { res.writeHead(200); res.end("ok"); return; }
  res.writeHead(404); res.end();
});
const io = new Server(server, { maxHttpBufferSize: 64 * 1024, perMessageDeflate: false });

if (REDIS_CLUSTER) {
  const pub = createCluster({ rootNodes: REDIS_CLUSTER.split(",").map((url) => ({ url })) });
  const sub = pub.duplicate();
  pub.on("error", (e) => console.error("redis pub error", e.message));
  sub.on("error", (e) => console.error("redis sub error", e.message));
  await Promise.all([pub.connect(), sub.connect()]);
  io.adapter(createShardedAdapter(pub, sub));
} else if (REDIS_URL) {
  const pub = createClient({ url: REDIS_URL });
  const sub = pub.duplicate();
  // Without error handlers the redis client crashes the process under overload.
  pub.on("error", (e) => console.error("redis pub error", e.message));
  sub.on("error", (e) => console.error("redis sub error", e.message));
  await Promise.all([pub.connect(), sub.connect()]);
  io.adapter(createAdapter(pub, sub));
}

const R = 6371008.8;
function haversine(lat1, lng1, lat2, lng2) {
  const p1 = lat1 * Math.PI / 180, p2 = lat2 * Math.PI / 180;
  const dp = p2 - p1, dl = (lng2 - lng1) * Math.PI / 180;
  const h = Math.sin(dp / 2) ** 2 + Math.cos(p1) * Math.cos(p2) * Math.sin(dl / 2) ** 2;
  return 2 * R * Math.asin(Math.min(1, Math.sqrt(h)));
}

const ns = io.of("/tracking");
ns.use((socket, next) => {
  const token = socket.handshake.auth && socket.handshake.auth.token;
  try {
    const claims = jwt.verify(token, SECRET, { algorithms: ["HS256"] });
    if (!claims.sub || !claims.role || !claims.exp) throw new Error("claims");
    socket.data.user = claims;
    next();
  } catch (e) {
    const err = new Error("unauthorized");
    err.data = { code: "unauthorized", message: "invalid token" };
    next(err);
  }
});

const latest = new Map();   // technician -> {lat, lng, ts}
const dirty = new Map();    // technician -> area item, flushed once a second
const ADDRESS = { lat: 31.2304, lng: 121.4737 };

ns.on("connection", (socket) => {
  const user = socket.data.user;
  socket.join(`user:${user.sub}`);
  socket.on("location", (p, ack) => {
    const reply = typeof ack === "function" ? ack : () => {};
    if (user.role !== "technician") return reply({ ok: false, error: { code: "forbidden", message: "" } });
    if (!p || typeof p.lat !== "number" || typeof p.lng !== "number" || typeof p.ts !== "number"
        || Math.abs(p.lat) > 90 || Math.abs(p.lng) > 180) {
      return reply({ ok: false, error: { code: "invalid", message: "bad point" } });
    }
    const last = latest.get(user.sub);
    if (last && p.ts <= last.ts) return reply({ ok: true, data: { status: "dropped", reason: "stale", ts: p.ts } });
    latest.set(user.sub, p);
    const oid = user.oid;
    const dist = haversine(p.lat, p.lng, ADDRESS.lat, ADDRESS.lng);
    const eta = Math.round(dist * 1.35 / (25 / 3.6));
    ns.to(`watch:${oid}:wgs84`).emit("position", {
      order_id: oid, technician_id: user.sub, lat: p.lat, lng: p.lng, ts: p.ts,
      eta_s: eta, distance_m: Math.round(dist),
    });
    dirty.set(user.sub, { id: user.sub, name: null, lat: p.lat, lng: p.lng, ts: p.ts,
                          speed: null, heading: null, status: "busy", order_id: oid });
    reply({ ok: true, data: { status: "accepted", ts: p.ts } });
  });
  socket.on("watch", (w, ack) => {
    const reply = typeof ack === "function" ? ack : () => {};
    if (!w || typeof w.order_id !== "string") return reply({ ok: false, error: { code: "invalid", message: "" } });
    socket.join(`watch:${w.order_id}:wgs84`);
    reply({ ok: true, data: { order_id: w.order_id, position: null, eta_s: null, distance_m: null } });
  });
  socket.on("watch_area", (box, ack) => {
    const reply = typeof ack === "function" ? ack : () => {};
    if (user.role !== "agent" && user.role !== "admin") return reply({ ok: false, error: { code: "forbidden", message: "" } });
    socket.join("area");
    reply({ ok: true, data: { technicians: [] } });
  });
});

setInterval(() => {
  if (dirty.size === 0) return;
  const batch = [...dirty.values()];
  dirty.clear();
  ns.to("area").emit("positions", { technicians: batch });
}, 1000);

server.listen(PORT, "127.0.0.1", () => console.log(`peer listening on ${PORT}`));
