// Chat over /chat: conversations that catch up by seq (join since_seq on every
// connect and on `resync`), never show a message twice, retry sends with the same
// client_msg_id (the server stores a retry once), typing and read markers.
import { call, fmtTime, h, newId, sleep, t } from "./common.js";

const RETRYABLE = new Set(["timeout", "unavailable", "rate_limited", "internal"]);

export class Conversation {
  constructor(hub, id) {
    this.hub = hub;
    this.id = id;
    this.conv = null;
    this.messages = [];   // in seq order, each seq once
    this.last = 0;        // highest seq applied
    this.pending = new Map();  // client_msg_id -> {body, ts, state}
    this.peerRead = 0;    // highest seq someone else marked read
    this.myRead = 0;
    this.typing = new Map();   // user_id -> until (ms)
    this.syncing = false;
    this.again = false;
    this.listeners = new Set();
  }

  get socket() { return this.hub.socket; }

  onChange(fn) { this.listeners.add(fn); return () => this.listeners.delete(fn); }

  changed(what) { for (const fn of this.listeners) fn(what, this); }

  /** join {since_seq}: the messages we missed, also after a reconnect. */
  async sync() {
    if (this.syncing) { this.again = true; return; }
    this.syncing = true;
    try {
      do {
        this.again = false;
        const reply = await call(this.socket, "join", { conversation_id: this.id, since_seq: this.last });
        if (!reply.ok) { this.changed("error"); break; }
        this.setConversation(reply.data.conversation);
        for (const m of reply.data.messages) this.apply(m, false);
        if (reply.data.has_more) this.again = true;
        this.changed("messages");
      } while (this.again && this.socket.connected);
    } finally {
      this.syncing = false;
    }
  }

  setConversation(conv) {
    if (!conv) return;
    this.conv = { ...(this.conv || {}), ...conv };
    if (typeof conv.last_read_seq === "number") this.myRead = Math.max(this.myRead, conv.last_read_seq);
    this.changed("conversation");
  }

  /** One message, from a push, a join or an ack. Returns true if it was new. */
  apply(msg, notify = true) {
    if (msg.seq <= this.last) return false;           // seen already
    if (msg.seq > this.last + 1) { this.sync(); return false; }  // a gap: fetch it in order
    this.messages.push(msg);
    this.last = msg.seq;
    if (msg.sender?.id === this.hub.me.sub) this.pending.delete(msg.client_msg_id);
    else this.typing.delete(msg.sender?.id);
    if (notify) this.changed("messages");
    this.hub.messageApplied(this, msg);
    return true;
  }

  async send(body) {
    const cmid = newId();
    this.pending.set(cmid, { client_msg_id: cmid, body, ts: Date.now(), state: "sending" });
    this.changed("messages");
    this.setTyping(false);
    for (let attempt = 0; ; attempt++) {
      if (!this.socket.connected) await new Promise((r) => this.socket.once("connect", r));
      const reply = await call(this.socket, "send", { conversation_id: this.id, client_msg_id: cmid, body }, 8000);
      if (reply.ok) {
        // Shown now if it is next in line; after a gap, the join that fills it shows it.
        if (!this.apply(reply.data.message) && reply.data.message.seq <= this.last) this.pending.delete(cmid);
        this.changed("messages");
        return reply;
      }
      const p = this.pending.get(cmid);
      if (RETRYABLE.has(reply.error.code) && attempt < 30) {
        await sleep(Math.min(5000, 500 * 2 ** attempt));
        continue;
      }
      if (p) { p.state = "failed"; p.error = reply.error.message; }
      this.changed("messages");
      return reply;
    }
  }

  markRead() {
    if (this.last > this.myRead && this.socket.connected) {
      this.myRead = this.last;
      call(this.socket, "read", { conversation_id: this.id, seq: this.last });
      this.hub.readChanged(this);
    }
  }

  // Typing: "on" at most every 3 s while keys are pressed, "off" after 4 s idle or on send.
  inputActivity() {
    const now = Date.now();
    if (!this.typingSent || now - this.typingSentAt > 3000) {
      this.typingSent = true;
      this.typingSentAt = now;
      call(this.socket, "typing", { conversation_id: this.id, typing: true });
    }
    clearTimeout(this.typingOff);
    this.typingOff = setTimeout(() => this.setTyping(false), 4000);
  }

  setTyping(on) {
    clearTimeout(this.typingOff);
    if (!on && this.typingSent) {
      this.typingSent = false;
      call(this.socket, "typing", { conversation_id: this.id, typing: false });
    }
  }

  othersTyping() {
    const now = Date.now();
    return [...this.typing.entries()].filter(([, until]) => until > now).map(([id]) => id);
  }
}

/** Routes /chat events to conversations; re-syncs them all on connect and resync. */
export class ChatHub {
  constructor(socket, me) {
    this.socket = socket;
    this.me = me;
    this.convs = new Map();
    this.onMessage = null;       // (conv, msg) for any applied message
    this.onConversation = null;  // (conversation view) for `conversation` events
    this.onQueuePosition = null;
    this.onRead = null;
    socket.on("message", (m) => {
      const c = this.convs.get(m.conversation_id);
      if (c) c.apply(m);
      else if (this.onUnknown) this.onUnknown(m);
    });
    socket.on("typing", (e) => {
      const c = this.convs.get(e.conversation_id);
      if (!c || e.user_id === me.sub) return;
      if (e.typing) c.typing.set(e.user_id, Date.now() + 8000);
      else c.typing.delete(e.user_id);
      c.changed("typing");
    });
    socket.on("read", (e) => {
      const c = this.convs.get(e.conversation_id);
      if (!c || e.user_id === me.sub) return;
      c.peerRead = Math.max(c.peerRead, e.seq);
      c.changed("read");
    });
    socket.on("conversation", (conv) => {
      const c = this.convs.get(conv.conversation_id);
      if (c) c.setConversation(conv);
      if (this.onConversation) this.onConversation(conv);
    });
    socket.on("queue_position", (e) => { if (this.onQueuePosition) this.onQueuePosition(e); });
    const resync = () => { for (const c of this.convs.values()) c.sync(); };
    socket.on("connect", resync);
    socket.on("resync", resync);
    setInterval(() => {  // typing indicators expire
      for (const c of this.convs.values()) if (c.typing.size) c.changed("typing");
    }, 3000);
  }

  attach(id, conv = null) {
    let c = this.convs.get(id);
    if (!c) {
      c = new Conversation(this, id);
      this.convs.set(id, c);
      if (conv) c.setConversation(conv);
      if (this.socket.connected) c.sync();
    } else if (conv) {
      c.setConversation(conv);
    }
    return c;
  }

  messageApplied(conv, msg) { if (this.onMessage) this.onMessage(conv, msg); }

  readChanged(conv) { if (this.onRead) this.onRead(conv); }
}

/** Renders a conversation's messages into `list`; keeps the scroll at the bottom. */
export function renderMessages(list, conv, me, { peerLabel } = {}) {
  const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  const items = [];
  let lastMine = 0;
  for (const m of conv.messages) if (m.sender?.id === me.sub) lastMine = m.seq;
  for (const m of conv.messages) {
    if (m.kind === "system") {
      items.push(h("div", { class: "msg system", dataset: { seq: m.seq } }, h("span", { text: systemText(m) })));
      continue;
    }
    const mine = m.sender?.id === me.sub;
    const who = mine ? t("chat.me") : (m.sender?.name || (peerLabel ? peerLabel(m.sender) : m.sender?.id));
    const meta = [who, fmtTime(m.ts)];
    if (mine && m.seq === lastMine && conv.peerRead >= m.seq) meta.push(t("chat.read"));
    if (m.masked) meta.push(t("chat.masked"));
    const body = m.kind === "image"
      ? h("a", { href: m.body, target: "_blank", rel: "noopener noreferrer", text: t("chat.image") })
      : h("div", { class: "body", text: m.body });
    items.push(h("div", { class: `msg ${mine ? "mine" : "theirs"}`, dataset: { seq: m.seq, cmid: m.client_msg_id } },
      body, h("div", { class: "meta", text: meta.join(" · ") })));
  }
  for (const p of conv.pending.values()) {
    items.push(h("div", { class: `msg mine pending ${p.state}`, dataset: { cmid: p.client_msg_id } },
      h("div", { class: "body", text: p.body }),
      h("div", { class: "meta", text: p.state === "failed" ? `${t("chat.failed")}: ${p.error || ""}` : t("chat.sending") })));
  }
  list.replaceChildren(...items);
  if (atBottom || conv.pending.size) list.scrollTop = list.scrollHeight;
}

function systemText(m) {
  const ev = m.order_event;
  if (ev) return `${ev.type === "rated" ? t("chat.rated") : t("chat.order_state", { state: t(`state.${ev.state}`) })} · ${fmtTime(m.ts)}`;
  return m.body;
}

/** Wires a text input + form to a conversation (send on submit, typing on input). */
export function bindComposer(form, input, getConv) {
  input.addEventListener("input", () => { const c = getConv(); if (c && input.value) c.inputActivity(); });
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const c = getConv();
    const body = input.value.trim();
    if (!c || !body) return;
    input.value = "";
    c.send(body);
  });
}
