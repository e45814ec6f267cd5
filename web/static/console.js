// /console: the support agent's desk — availability, the queue, my conversations,
// a conversation with its order card, refunds, and the feedback inbox.
import {
  $, api, applyI18n, call, checkVendor, connect, fmtDateTime, fmtDistance, fmtEta, fmtTime, fmtWait, h,
  onLangChange, setupTopbar, signIn, stateLabel, t, toast, watchConnection,
} from "./common.js";
import { bindComposer, ChatHub, renderMessages } from "./chat.js";
import { lateOf, onThisJob, OrderFeed, TechWatch, VISIBLE } from "./orders.js";

const STATUS_KEY = "rt.agent.status";

applyI18n();
if (checkVendor()) await main();

async function main() {
  const { token, claims } = await signIn(["agent", "admin"], { sub: "a-dev", name: "客服" });
  const isAgent = claims.role === "agent";
  setupTopbar(claims);

  const chatSock = connect("/chat", token);
  const ordersSock = connect("/orders", token);
  const trackSock = connect("/tracking", token);
  const opsSock = connect("/ops", token);
  window.__rt = { sockets: { chat: chatSock, orders: ordersSock, tracking: trackSock, ops: opsSock } };
  watchConnection([chatSock, ordersSock, trackSock, opsSock]);
  const hub = new ChatHub(chatSock, claims);

  // -- phone: one pane at a time ---------------------------------------------------------
  const showPane = (name) => {
    document.body.dataset.pane = name;
    for (const b of document.querySelectorAll("#panes-nav [data-pane]")) b.classList.toggle("active", b.dataset.pane === name);
  };
  for (const b of document.querySelectorAll("#panes-nav [data-pane]")) b.addEventListener("click", () => showPane(b.dataset.pane));
  showPane("list");

  // -- availability ------------------------------------------------------------------------------
  const availBtn = $("#avail");
  // The status lives on the server, shared by the agent's tabs: this tab re-asserts
  // only a choice it made itself (after a reconnect); otherwise it shows the server's.
  let chosen = sessionStorage.getItem(STATUS_KEY) !== null;
  let status = sessionStorage.getItem(STATUS_KEY) || "away";
  let load = null, cap = null, statusChanges = 0;
  function renderStatus() {
    availBtn.setAttribute("aria-checked", String(status === "available"));
    availBtn.dataset.status = status;
    $("#avail-label").textContent = t(`agent.${status}`);
    $("#load").textContent = load === null ? "" : t("agent.load", { load, cap });
  }
  async function setStatus(next) {
    status = next;
    chosen = true;
    statusChanges++;
    sessionStorage.setItem(STATUS_KEY, next);
    renderStatus();
    if (!isAgent || !chatSock.connected) return;
    const r = await call(chatSock, "set_status", { status: next });
    if (r.ok) { load = r.data.load; cap = r.data.cap; renderStatus(); }
    else toast(r.error.message, "error");
    refreshQueue();
  }
  availBtn.hidden = !isAgent;
  availBtn.addEventListener("click", () => setStatus(status === "available" ? "away" : "available"));
  renderStatus();

  // -- the queue (extension: `queue {}` on /chat) -------------------------------------------------
  let queue = [];
  async function refreshQueue() {
    if (!chatSock.connected) return;
    const asked = statusChanges;
    const r = await call(chatSock, "queue", {});
    if (!r.ok) return;
    queue = r.data.conversations;
    if (r.data.agent && asked === statusChanges) {  // not older than a switch made meanwhile
      ({ status, load, cap } = r.data.agent);
      if (chosen) sessionStorage.setItem(STATUS_KEY, status);
    }
    renderQueue();
    renderStatus();
  }
  function renderQueue() {
    $("#queue-count").textContent = String(queue.length);
    const now = Date.now();
    $("#queue").replaceChildren(...(queue.length ? queue.map((c) => h("li", { class: "item", dataset: { id: c.conversation_id } },
      h("div", { class: "line1" }, h("span", { class: "title", text: c.topic || t("console.no_topic") }),
        h("span", { class: "wait", text: fmtWait(now - c.waiting_since_ts) })),
      h("div", { class: "line2", text: `${t("console.customer")} ${c.customer_id}${c.order_id ? ` · ${c.order_id}` : ""} · #${c.position}` })))
      : [h("li", { class: "empty", text: t("console.queue_empty") })]));
  }
  setInterval(refreshQueue, 2500);
  setInterval(renderQueue, 1000);

  // -- my conversations -------------------------------------------------------------------------
  const mine = new Map();  // id -> conversation view
  const followed = new Set();
  let selected = null;

  function track(id, view) {
    mine.set(id, { ...(mine.get(id) || {}), ...view });
    if (view.status !== "closed" || id === selected) {
      const c = hub.attach(id, view);
      if (!followed.has(id)) { followed.add(id); c.onChange(() => { renderMine(); if (id === selected) renderConv(); }); }
    }
  }

  async function refreshMine() {
    const r = await call(chatSock, "list", {});
    if (!r.ok) return;
    for (const v of r.data.conversations) if (v.kind === "support") track(v.conversation_id, v);
    renderMine();
  }

  function unreadOf(id) {
    const c = hub.convs.get(id);
    if (c && c.conv) return id === selected ? 0 : Math.max(0, c.last - c.myRead);
    return mine.get(id)?.unread || 0;
  }

  function renderMine() {
    const views = [...mine.values()].map((v) => ({ ...v, ...(hub.convs.get(v.conversation_id)?.conv || {}) }));
    const rank = (v) => (v.status === "closed" || v.assignee !== claims.sub ? 1 : 0);
    views.sort((a, b) => rank(a) - rank(b) || b.updated_ts - a.updated_ts);
    const items = views.slice(0, 30).map((v) => {
      const unread = unreadOf(v.conversation_id);
      const gone = v.assignee !== claims.sub && v.status !== "closed";
      return h("li", {
        class: `item${v.conversation_id === selected ? " selected" : ""}${v.status === "closed" || gone ? " closed" : ""}`,
        dataset: { id: v.conversation_id, status: v.status },
        tabindex: 0,
        onclick: () => select(v.conversation_id),
        onkeydown: (e) => { if (e.key === "Enter") select(v.conversation_id); },
      },
      h("div", { class: "line1" }, h("span", { class: "title", text: v.topic || t("console.no_topic") }),
        unread ? h("span", { class: "badge-n", text: String(unread) }) : null),
      h("div", { class: "line2", text: `${t("console.customer")} ${v.customer_id} · ${gone ? t("console.transferred") : t(`conv.${v.status}`)} · ${fmtTime(v.updated_ts)}` }));
    });
    $("#mine").replaceChildren(...(items.length ? items : [h("li", { class: "empty", text: t("console.mine_empty") })]));
    const total = views.reduce((n, v) => n + unreadOf(v.conversation_id), 0);
    document.title = (total ? `(${total}) ` : "") + t("console.title");
  }

  hub.onConversation = (conv) => {
    if (conv.kind !== "support") return;
    const known = mine.has(conv.conversation_id);
    if (conv.assignee === claims.sub || known) {
      // Transferred away: stop following it (we joined its staff room to read it).
      if (known && conv.assignee !== claims.sub) call(chatSock, "leave", { conversation_id: conv.conversation_id });
      track(conv.conversation_id, conv);
      if (!known && conv.assignee === claims.sub && conv.status === "assigned") {
        toast(t("console.new_conv", { topic: conv.topic || conv.customer_id }));
        if (!selected) select(conv.conversation_id);
      }
      renderMine();
      if (conv.conversation_id === selected) renderConv();
    }
    refreshQueue();
  };
  hub.onRead = () => renderMine();

  // -- the selected conversation -----------------------------------------------------------------
  function select(id) {
    selected = id;
    const v = mine.get(id);
    track(id, v || {});
    const c = hub.convs.get(id);
    if (c && !c.conv) c.sync();
    showPane("chat");
    renderMine();
    renderConv();
    const orderId = c?.conv?.order_id || v?.order_id;
    if (orderId) card.show(orderId);
  }

  function renderConv() {
    const c = selected ? hub.convs.get(selected) : null;
    $("#conv-empty").hidden = !!c;
    $("#conv").hidden = !c;
    if (!c) return;
    const v = c.conv || mine.get(selected) || {};
    $("#conv-title").textContent = v.topic || t("console.no_topic");
    const gone = v.assignee && v.assignee !== claims.sub;
    $("#conv-sub").textContent = `${t("console.customer")} ${v.customer_id || ""}${v.order_id ? ` · ${t("console.order")} ${v.order_id}` : ""} · ${gone ? t("console.transferred_to", { id: v.assignee }) : t(`conv.${v.status}`)}`;
    renderMessages($("#messages"), c, claims, { peerLabel: (s) => t(`role.${s?.role}`) });
    $("#typing").textContent = c.othersTyping().length ? t("chat.typing") : "";
    const writable = v.status === "assigned" && v.assignee === claims.sub;
    $("#composer").hidden = !writable;
    $("#conv-actions").hidden = !(writable || (claims.role === "admin" && v.status !== "closed"));
    if (document.visibilityState === "visible") { c.markRead(); }
    if (v.order_id && card.orderId !== v.order_id) card.show(v.order_id);
  }
  document.addEventListener("visibilitychange", renderConv);
  bindComposer($("#composer"), $("#chat-input"), () => (selected ? hub.convs.get(selected) : null));

  $("#close-conv").addEventListener("click", async () => {
    if (!selected || !confirm(t("console.close_confirm"))) return;
    const r = await call(chatSock, "close", { conversation_id: selected });
    if (r.ok) { track(selected, r.data.conversation); renderMine(); renderConv(); }
    else toast(r.error.message, "error");
  });

  const onlineAgents = new Set();
  function renderAgents() {
    $("#agents").replaceChildren(...[...onlineAgents].filter((a) => a !== claims.sub).map((a) => h("option", { value: a })));
  }
  opsSock.on("presence", (e) => {
    if (e.kind !== "agent") return;
    if (e.online) onlineAgents.add(e.user_id); else onlineAgents.delete(e.user_id);
    renderAgents();
  });
  $("#transfer-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const to = $("#transfer-to").value.trim();
    if (!selected || !to) return;
    const r = await call(chatSock, "transfer", { conversation_id: selected, to_agent_id: to });
    if (r.ok) { $("#transfer-to").value = ""; track(selected, r.data.conversation); toast(t("console.transferred_to", { id: to })); renderMine(); renderConv(); }
    else toast(r.error.message, "error");
  });

  chatSock.on("connect", async () => {
    if (isAgent && chosen) await setStatus(status);
    await refreshMine();
    await refreshQueue();
  });

  // -- order card (order of the selected conversation, or looked up) -------------------------
  const card = {
    orderId: null, feed: null, watch: null, fix: null, info: null,
    show(orderId) {
      this.close();
      this.orderId = orderId;
      this.fix = null;
      this.info = null;
      this.watch = new TechWatch(trackSock, orderId,
        (p) => {
          this.fix = p;
          // Positions come only once the order is the technician's current job.
          if (this.info && !onThisJob(this.info)) this.info = { ...this.info, technician_status: "on_this_job" };
          this.render();
        },
        (d) => {
          this.info = d && !d.error ? d : null;
          if (!d || (this.info && !onThisJob(this.info))) this.fix = null;
          this.render();
        },
        (e) => {
          if (this.info && Number.isFinite(e.eta_s)) { this.info = { ...this.info, eta_s: e.eta_s, eta_basis: e.basis }; this.render(); }
        });
      let loaded = false;
      this.feed = new OrderFeed(ordersSock, orderId, (kind, f, fresh) => {
        const news = loaded && kind !== "error" ? fresh || [] : [];
        if (kind !== "error") loaded = true;
        if (this.feed?.order) {
          const watching = this.watch.wanted;
          this.watch.set(VISIBLE.has(this.feed.order.state));
          // Another technician, or their previous job ended: what the watch says changed.
          if (watching && news.length) {
            const reassigned = news.some((ev) => ev.type === "reassigned");
            if (reassigned) this.fix = null;
            this.watch.rewatch({ reset: reassigned });
          }
        }
        this.render();
      });
      sideTab("order");
      this.render();
    },
    close() {
      this.feed?.close();
      this.watch?.close();
      this.feed = null;
      this.watch = null;
    },
    render() {
      const box = $("#order-card");
      const f = this.feed;
      if (!f) { box.replaceChildren(h("p", { class: "empty", text: t("console.no_order") })); return; }
      if (f.error) { box.replaceChildren(h("p", { class: "empty", text: `${this.orderId}: ${f.error.message}` })); return; }
      const o = f.order;
      if (!o) { box.replaceChildren(h("p", { class: "empty", text: t("chat.loading") })); return; }
      const techName = this.info?.technician?.name || o.technician_id || t("track.no_tech");
      let live = "";
      if (o.state === "arrived") live = t("track.arrived");
      else if (o.state === "assigned" && this.info && !onThisJob(this.info)) {
        // Not set off yet (or still on the job before): when, never where.
        const why = t(this.info.technician_status === "on_another_job" ? "track.prev_job" : "track.not_started");
        live = Number.isFinite(this.info.eta_s) ? `${why} · ${t("track.queued_eta", { eta: fmtEta(this.info.eta_s) })}` : why;
      } else if (VISIBLE.has(o.state) && Number.isFinite(this.fix?.eta_s)) {
        live = t("track.eta", { eta: fmtEta(this.fix.eta_s), dist: fmtDistance(this.fix.distance_m) });
      }
      const late = lateOf(o);
      const parts = [
        h("div", { class: "card-head" }, h("strong", { text: `${o.service?.name || ""}` }),
          late ? h("span", { class: "late-badge", id: "card-late", dataset: { minutesLate: late.minutes ?? "" },
            title: late.projected_arrival_ts ? `${t("console.projected")} ${fmtTime(late.projected_arrival_ts)}` : null,
            text: late.minutes ? t("console.late", { n: late.minutes }) : t("console.late_unknown") }) : null,
          h("span", { class: `state-badge s-${o.state}`, id: "card-state", dataset: { state: o.state }, text: stateLabel(o.state) })),
        h("div", { class: "muted", text: `${t("console.order")} ${o.order_id} · ${t("console.customer")} ${o.customer_id}` }),
        h("div", { text: o.address?.text || "" }),
        h("div", {}, `${t("console.technician")}: `, h("strong", { text: techName })),
        live ? h("div", { class: "eta", id: "card-eta", text: live }) : null,
        o.rating ? h("div", { text: `${t("rate.title")}: ${"★".repeat(o.rating.stars)}${o.rating.comment ? ` “${o.rating.comment}”` : ""}` }) : null,
        h("ol", { class: "events" }, ...f.events.filter((e) => e.type !== "rated").slice(-8).map((e) => h("li", {},
          h("span", { class: "time", text: fmtDateTime(e.ts) }), " ",
          e.type === "state_changed" ? stateLabel(e.state)
            : e.type === "late_risk" && Number.isFinite(e.data?.minutes_late) ? t("event.late_risk_n", { n: Math.round(e.data.minutes_late) })
              : t(`event.${e.type}`),
          e.data?.reason && typeof e.data.reason === "string" ? h("span", { class: "muted", text: ` — ${e.data.reason}` }) : null))),
      ];
      if (o.state === "refund_requested") parts.push(refundDecision(o));
      if (box.contains(document.activeElement) && box.dataset.state === o.state) {
        // Don't wipe a note being typed; refresh only the live line.
        const eta = $("#card-eta"); if (eta) eta.textContent = live;
        return;
      }
      box.dataset.state = o.state;
      box.replaceChildren(...parts.filter(Boolean));
    },
  };

  function refundDecision(o) {
    const reason = card.feed.lastEventOf("refund_requested")?.data?.reason || "";
    const note = h("input", { id: "refund-note", maxlength: 500, placeholder: t("refund.note_ph") });
    const decide = async (approve) => {
      const body = { order_id: o.order_id, approve };
      if (note.value.trim()) body.note = note.value.trim();
      const r = await call(ordersSock, "resolve_refund", body);
      if (r.ok) toast(approve ? t("refund.done") : t("refund.rejected"));
      else toast(r.error.message, "error");
    };
    return h("div", { class: "refund-box" },
      h("h3", { text: t("refund.decide") }),
      h("p", {}, `${t("refund.reason")}: `, h("q", { text: reason })),
      note,
      h("div", { class: "row" },
        h("button", { class: "primary", id: "refund-approve", text: t("refund.approve"), onclick: () => decide(true) }),
        h("button", { class: "ghost danger", id: "refund-reject", text: t("refund.reject"), onclick: () => decide(false) })));
  }

  $("#order-lookup").addEventListener("submit", (e) => {
    e.preventDefault();
    const id = $("#lookup-id").value.trim();
    if (id) card.show(id);
  });

  // -- side tabs: order card | feedback inbox -------------------------------------------------------
  function sideTab(name) {
    for (const b of document.querySelectorAll("#side-tabs [data-tab]")) {
      b.classList.toggle("active", b.dataset.tab === name);
      b.setAttribute("aria-selected", String(b.dataset.tab === name));
    }
    $("#side-order").hidden = name !== "order";
    $("#side-feedback").hidden = name !== "feedback";
    if (name === "feedback" && !feedbackLoaded) loadFeedback(true);
  }
  for (const b of document.querySelectorAll("#side-tabs [data-tab]")) b.addEventListener("click", () => sideTab(b.dataset.tab));

  let feedback = [], feedbackLoaded = false, feedbackMore = false;
  async function loadFeedback(reset) {
    const before = !reset && feedback.length ? `&before_ts=${feedback[feedback.length - 1].ts}` : "";
    const r = await api(`/api/feedback?limit=20${before}`, token);
    if (!r.ok) { toast(r.error.message, "error"); return; }
    feedback = reset ? r.data.feedback : [...feedback, ...r.data.feedback];
    feedbackMore = r.data.has_more;
    feedbackLoaded = true;
    renderFeedback();
  }
  function renderFeedback() {
    $("#feedback").replaceChildren(...(feedback.length ? feedback.map((f) => h("li", { class: "item" },
      h("div", { class: "line1" }, h("span", { class: "tag", text: f.category }), h("span", { class: "muted", text: fmtDateTime(f.ts) })),
      h("div", { class: "fb-body", text: f.body }),
      h("div", { class: "line2", text: `${f.user?.name || f.user?.id || ""} · ${t(`role.${f.user?.role}`)}${f.order_id ? ` · ${f.order_id}` : ""}` })))
      : [h("li", { class: "empty", text: t("console.feedback_empty") })]));
    $("#feedback-more").hidden = !feedbackMore;
  }
  $("#feedback-refresh").addEventListener("click", () => loadFeedback(true));
  $("#feedback-more").addEventListener("click", () => loadFeedback(false));

  onLangChange(() => { renderStatus(); renderQueue(); renderMine(); renderConv(); card.render(); if (feedbackLoaded) renderFeedback(); });
  sideTab("order");
  card.render();
  renderQueue();
  renderMine();
  renderConv();
}
