// An order's live state over /orders, and its technician over /tracking.
// OrderFeed keeps the highest seq seen and subscribes with since_seq on every
// connect and `resync`; a push it has seen is dropped, a push after a gap makes it
// subscribe again (docs/protocol.md, "Catching up").
import { call, CONFIG } from "./common.js";

export const VISIBLE = new Set(["assigned", "en_route", "arrived"]);
export const MAIN_STATES = ["created", "assigned", "en_route", "arrived", "in_service", "completed"];
// The states whose time the order keeps in `times` (docs/protocol.md).
const TIMED = new Set(["en_route", "arrived", "in_service", "completed"]);

/** The order's late risk worth showing: {minutes, projected_arrival_ts} or null.
 * Lateness matters until the technician is there; bad data shows no number. */
export function lateOf(order) {
  const late = order?.late;
  if (!late || typeof late !== "object") return null;
  if (order.state !== "assigned" && order.state !== "en_route") return null;
  const n = Number(late.minutes_late);
  return { minutes: Number.isFinite(n) && n > 0 ? Math.round(n) : null,
    projected_arrival_ts: Number.isFinite(late.projected_arrival_ts) ? late.projected_arrival_ts : null,
    basis: typeof late.basis === "string" ? late.basis : null };
}

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
      if (TIMED.has(ev.state)) this.order.times = { ...(this.order.times || {}), [ev.state]: ev.ts };
    } else if (ev.type === "reassigned") {
      this.order.technician_id = ev.data?.technician_id;
      this.order.late = null;  // the server clears it: the new technician's day decides anew
    } else if (ev.type === "rated") {
      this.order.rating = { ...ev.data, ts: ev.ts };
    } else if (ev.type === "late_risk") {
      this.order.late = { ...(ev.data || {}), ts: ev.ts };
    } else if (ev.type === "on_time_again") {
      this.order.late = null;
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

/** Whether a watch reply lets the technician's position show: this order is
 * their current job (they set off to it). Before that (`not_started`: no job
 * under way; `on_another_job`: another order is) the customer is told when,
 * never where (docs/tracking.md, "Privacy"). */
export function onThisJob(info) {
  return info?.technician_status === "on_this_job";
}

/** Watches the order's technician while the order is visible (assigned/en_route/arrived).
 * The reply says whether this order is the technician's current job
 * (`technician_status`); while it is not, no positions come, only `eta` pushes
 * with the projected ETA (onEta). Watch again (rewatch) when the order changes:
 * it goes en route, or is re-assigned. A push whose basis changes (`idle`: no job
 * under way; `queued`: behind another) says the technician's other job began or
 * ended: the watch is asked again too. */
export class TechWatch {
  constructor(socket, orderId, onFix, onInfo, onEta = null) {
    this.socket = socket;
    this.orderId = orderId;
    this.onFix = onFix;     // (position with eta_s, distance_m)
    this.onInfo = onInfo;   // (watch reply | null when not visible)
    this.onEta = onEta;     // ({order_id, eta_s, basis}) for a queued job
    this.wanted = false;
    this.lastTs = 0;
    this.asked = 0;
    this.basis = null;      // the ETA's basis as last told (reply or push)
    this.handlers = {
      connect: () => this.watch(),
      resync: () => this.watch(),
      position: (p) => { if (p && p.order_id === this.orderId) this.fix(p); },
      eta: (e) => { if (e && e.order_id === this.orderId && this.wanted) this.eta(e); },
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
      this.asked++;  // an answer still under way is not wanted any more
      if (this.socket.connected) call(this.socket, "unwatch", { order_id: this.orderId });
      this.onInfo(null);
    }
  }

  /** Watch again; `reset` forgets the last fix (another technician's points follow). */
  rewatch({ reset = false } = {}) {
    if (reset) this.lastTs = 0;
    if (this.wanted) this.watch();
  }

  async watch() {
    if (!this.wanted || !this.socket.connected) return;
    const asked = ++this.asked;
    const reply = await call(this.socket, "watch", { order_id: this.orderId, coord_sys: CONFIG.coord_sys });
    if (!this.wanted || asked !== this.asked) return;  // unwatched, or a newer watch answers
    if (!reply.ok) { this.onInfo({ error: reply.error }); return; }
    const data = reply.data || {};
    this.basis = typeof data.eta_basis === "string" ? data.eta_basis : null;
    this.onInfo(data);
    const p = data.position;
    if (p && onThisJob(data)) {
      this.fix({ ...p, eta_s: data.eta_s, distance_m: data.distance_m });
    }
  }

  eta(e) {
    if (!Number.isFinite(e.eta_s) || typeof e.basis !== "string") return;
    const changed = this.basis !== null && e.basis !== this.basis;
    this.basis = e.basis;
    if (this.onEta) this.onEta(e);
    if (changed) this.watch();
  }

  fix(p) {
    if (!Number.isFinite(p.ts) || !Number.isFinite(p.lat) || !Number.isFinite(p.lng)) return;
    if (p.ts < this.lastTs) return;  // latest wins
    const fresh = p.ts > this.lastTs;
    this.lastTs = p.ts;
    this.onFix(p, fresh);
  }
}
