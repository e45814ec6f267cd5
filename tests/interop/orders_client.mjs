#!/usr/bin/env node
// A customer/technician app in miniature, built on the official socket.io-client:
// connects to the /orders namespace, subscribes to one order and prints, one JSON
// object per line on stdout, everything it sees:
//
//   {"type":"connect","id":...,"transport":"websocket"|"polling"}
//   {"type":"subscribe","reply":{ok, data|error}}
//   {"type":"order_event","event":{order_id, seq, state, ...}}
//   {"type":"event","name":...,"args":[...]}            any other server event
//   {"type":"connect_error","message":...,"data":{code, message}}
//   {"type":"subscribe_error","message":...}             no ack in time
//   {"type":"disconnect","reason":...}
//   {"type":"timeout","received":n}
//   {"type":"done","received":n}
//
// Usage:
//   node orders_client.mjs URL TOKEN ORDER_ID [--transport websocket|polling]
//        [--count N] [--since-seq S] [--timeout-ms T] [--ack-timeout-ms A]
// Each of URL, TOKEN, ORDER_ID, transport, count, timeout may come from the
// environment instead: RT_URL, RT_TOKEN, RT_ORDER_ID, RT_TRANSPORT, RT_COUNT,
// RT_TIMEOUT_MS (a token in the environment stays out of `ps`).
//
// Exit codes: 0 after N order events (N = 0: after the subscribe reply),
// 1 connect_error, 2 timeout, 3 subscribe refused or not acknowledged,
// 4 disconnected early, 64 usage. If the connection is still open 3 s after
// the client closed it, the script says so on stderr ("forced exit") and exits.

import { parseArgs } from "node:util";
import { io } from "socket.io-client";

// How long the client waits, after closing, for its connections to end.
const CLOSE_GRACE_MS = 3000;
const EXIT = { ok: 0, connectError: 1, timeout: 2, subscribe: 3, disconnected: 4, usage: 64 };

function out(obj) {
  process.stdout.write(JSON.stringify(obj) + "\n");
}

let finished = false;
let socket;

function finish(code, last) {
  if (finished) return;
  finished = true;
  clearTimeout(deadline);
  process.exitCode = code;
  out(last);
  if (socket) {
    socket.removeAllListeners();
    socket.offAny();
    // Say goodbye to the server (a close packet), then let the event loop
    // drain so that it is sent; exit anyway if that hangs.
    socket.disconnect();
  }
  setTimeout(() => {
    // The server kept a request of ours open (e.g. a long-poll GET) after we
    // closed: say so, for the tests, and leave anyway.
    process.stderr.write(`orders_client: forced exit, connection still open ${CLOSE_GRACE_MS} ms after close\n`);
    process.exit(code);
  }, CLOSE_GRACE_MS).unref();
}

function usage(message) {
  process.stderr.write(
    `${message}\nusage: node orders_client.mjs URL TOKEN ORDER_ID [--transport websocket|polling] ` +
      "[--count N] [--since-seq S] [--timeout-ms T] [--ack-timeout-ms A]\n",
  );
  process.exit(EXIT.usage);
}

function intOption(value, name, min) {
  const n = Number(value);
  if (!Number.isInteger(n) || n < min) usage(`${name} must be an integer >= ${min}, got ${value}`);
  return n;
}

let parsed;
try {
  parsed = parseArgs({
    allowPositionals: true,
    options: {
      transport: { type: "string" },
      count: { type: "string" },
      "since-seq": { type: "string" },
      "timeout-ms": { type: "string" },
      "ack-timeout-ms": { type: "string" },
    },
  });
} catch (err) {
  usage(err.message);
}
const { values, positionals } = parsed;
const env = process.env;
const url = positionals[0] ?? env.RT_URL;
const token = positionals[1] ?? env.RT_TOKEN;
const orderId = positionals[2] ?? env.RT_ORDER_ID;
if (!url || token === undefined || !orderId) usage("URL, TOKEN and ORDER_ID are required");
const transport = values.transport ?? env.RT_TRANSPORT ?? "websocket";
if (transport !== "websocket" && transport !== "polling") {
  usage(`--transport must be websocket or polling, got ${transport}`);
}
const count = intOption(values.count ?? env.RT_COUNT ?? "1", "--count", 0);
const timeoutMs = intOption(values["timeout-ms"] ?? env.RT_TIMEOUT_MS ?? "15000", "--timeout-ms", 1);
const ackTimeoutMs = intOption(values["ack-timeout-ms"] ?? "5000", "--ack-timeout-ms", 1);
const sinceSeq = values["since-seq"] === undefined ? undefined : intOption(values["since-seq"], "--since-seq", 0);

let received = 0;
const deadline = setTimeout(() => finish(EXIT.timeout, { type: "timeout", received }), timeoutMs);

socket = io(url.replace(/\/+$/, "") + "/orders", {
  auth: { token },
  transports: [transport],
  reconnection: false,
  timeout: timeoutMs,
});

// Listen before subscribing: an event may arrive before the ack does.
socket.on("order_event", (event) => {
  out({ type: "order_event", event });
  received += 1;
  if (count > 0 && received >= count) finish(EXIT.ok, { type: "done", received });
});

socket.onAny((name, ...args) => {
  if (name !== "order_event") out({ type: "event", name, args });
});

socket.on("connect_error", (err) => {
  finish(EXIT.connectError, { type: "connect_error", message: err.message, data: err.data ?? null });
});

socket.on("disconnect", (reason) => {
  finish(EXIT.disconnected, { type: "disconnect", reason, received });
});

socket.on("connect", async () => {
  out({ type: "connect", id: socket.id, transport: socket.io.engine.transport.name });
  const body = { order_id: orderId };
  if (sinceSeq !== undefined) body.since_seq = sinceSeq;
  let reply;
  try {
    reply = await socket.timeout(ackTimeoutMs).emitWithAck("subscribe", body);
  } catch (err) {
    finish(EXIT.subscribe, { type: "subscribe_error", message: err.message });
    return;
  }
  if (!reply || reply.ok !== true) {
    finish(EXIT.subscribe, { type: "subscribe", reply });
    return;
  }
  out({ type: "subscribe", reply });
  if (count === 0) finish(EXIT.ok, { type: "done", received });
});
