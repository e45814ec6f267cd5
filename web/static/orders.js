// An order's live state over /orders, and its technician over /tracking.
// OrderFeed keeps the highest seq seen and subscribes with since_seq on every
// connect and `resync`; a push it has seen is dropped, a push after a gap makes it
// subscribe again (docs/protocol.md, "Catching up").
import { call, CONFIG } from "./common.js";

export const VISIBLE = new Set(["assigned", "en_route", "arrived"]);
export const MAIN_STATES = ["created", "assigned", "en_route", "arrived", "in_service", "completed"];

export class OrderFeed {
  constructor(socket, orderId, onChange) {
    this.socket = socket;
    this.orderId = orderId;
    this.onChange = onChange;
    this.order = null;
    this.events = [];
    this.last = 0;
    this.error = null;
    this.syncing = false;
    this.again = false;
    this.closed = false;
    this.handlers = {
      connect: () => this.sync(),
      resync: () => this.sync(),
      order_event: (ev) => this.push(ev),
    };
    for (const [ev, fn] of Object.entries(this.handlers)) socket.on(ev, fn);
    if (socket.connected) this.sync();
  }

  close() {
    this.closed = true;
    for (const [ev, fn] of Object.entries(this.handlers)) this.socket.off(ev, fn);
    if (this.socket.connected) call(this.socket, "unsubscribe", { order_id: this.orderId });
  }

  async sync() {
    if (this.syncing) { this.again = true; return; }
    this.syncing = true;
    try {
      do {
        this.again = false;
        const reply = await call(this.socket, "subscribe", { order_id: this.orderId, since_seq: this.last });
        if (this.closed) return;
        if (!reply.ok) { this.error = reply.error; this.onChange("error", this); break; }
        this.error = null;
        const fresh = reply.data.events.filter((e) => e.seq > this.last);
        for (const ev of fresh) this.take(ev);
        // The snapshot is at least as new as what we applied.
        if (!this.order || reply.data.order.seq >= this.last) this.order = reply.data.order;
        if (reply.data.has_more) this.again = true;
        this.onChange("sync", this, fresh);
      } while (this.again && this.socket.connected && !this.closed);
    } finally {
      this.syncing = false;
    }
  }

  push(ev) {
    if (ev.order_id !== this.orderId || this.closed) return;
    if (ev.seq <= this.last) return;                 // already have it
    if (ev.seq > this.last + 1 || !this.order) { this.sync(); return; }  // a gap
    this.take(ev);
    this.onChange("event", this, [ev]);
  }

  take(ev) {
    this.events.push(ev);
    this.last = ev.seq;
    if (!this.order) return;
    this.order = { ...this.order, seq: ev.seq, updated_ts: ev.ts };
    if (ev.type === "state_changed") {
      this.order.state = ev.state;
      if (ev.state === "assigned" && ev.data?.technician_id) this.order.technician_id = ev.data.technician_id;
      if (ev.state === "completed") this.order.completed_ts = ev.ts;
    } else if (ev.type === "reassigned") {
      this.order.technician_id = ev.data?.technician_id;
    } else if (ev.type === "rated") {
      this.order.rating = { ...ev.data, ts: ev.ts };
    }
  }

  /** First time each state was reached: state -> ts. */
  reached() {
    const out = new Map();
    for (const ev of this.events) if (ev.type === "state_changed" && !out.has(ev.state)) out.set(ev.state, ev.ts);
    return out;
  }

  lastEventOf(state) {
    for (let i = this.events.length - 1; i >= 0; i--) {
      if (this.events[i].type === "state_changed" && this.events[i].state === state) return this.events[i];
    }
    return null;
  }
}

/** Watches the order's technician while the order is visible (assigned/en_route/arrived). */
export class TechWatch {
  constructor(socket, orderId, onFix, onInfo) {
    this.socket = socket;
    this.orderId = orderId;
    this.onFix = onFix;     // (position with eta_s, distance_m)
    this.onInfo = onInfo;   // (watch reply | null when not visible)
    this.wanted = false;
    this.lastTs = 0;
    this.handlers = {
      connect: () => this.watch(),
      resync: () => this.watch(),
      position: (p) => { if (p.order_id === this.orderId) this.fix(p); },
    };
    for (const [ev, fn] of Object.entries(this.handlers)) socket.on(ev, fn);
  }

  close() {
    this.set(false);
    for (const [ev, fn] of Object.entries(this.handlers)) this.socket.off(ev, fn);
  }

  set(visible) {
    if (visible === this.wanted) return;
    this.wanted = visible;
    if (visible) this.watch();
    else {
      if (this.socket.connected) call(this.socket, "unwatch", { order_id: this.orderId });
      this.onInfo(null);
    }
  }

  async watch() {
    if (!this.wanted || !this.socket.connected) return;
    const reply = await call(this.socket, "watch", { order_id: this.orderId, coord_sys: CONFIG.coord_sys });
    if (!this.wanted) return;
    if (!reply.ok) { this.onInfo({ error: reply.error }); return; }
    this.onInfo(reply.data);
    const p = reply.data.position;
    if (p) this.fix({ ...p, eta_s: reply.data.eta_s, distance_m: reply.data.distance_m });
  }

  fix(p) {
    if (p.ts < this.lastTs) return;  // latest wins
    const fresh = p.ts > this.lastTs;
    this.lastTs = p.ts;
    this.onFix(p, fresh);
  }
}
