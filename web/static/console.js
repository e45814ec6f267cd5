// /console: the support agent's desk — availability, the queue, my conversations,
// a conversation with its order card, refunds, and the feedback inbox.
import {
  $, api, applyI18n, call, checkVendor, connect, fmtDateTime, fmtDistance, fmtEta, fmtTime, fmtWait, h,
  onLangChange, RatingCache, ratingText, setupTopbar, signIn, stateLabel, t, toast, watchConnection,
} from "./common.js";
import { bindComposer, ChatHub, renderMessages } from "./chat.js";
import { lateOf, onThisJob, OrderFeed, TechWatch, VISIBLE } from "./orders.js";

const STATUS_KEY = "rt.agent.status";


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
  const ratings = new RatingCache(token);
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
        o.technician_id ? h("div", { class: "rating-line", id: "card-rating", dataset: { techId: o.technician_id },
          text: ratingText(ratings.get(o.technician_id, () => this.render())) }) : null,
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
        const stars = $("#card-rating"); if (stars && o.technician_id) stars.textContent = ratingText(ratings.get(o.technician_id));
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
  const inbox = feedbackDesk({ token, claims, chatSock, showOrder: (id) => card.show(id) });
  function sideTab(name) {
    for (const b of document.querySelectorAll("#side-tabs [data-tab]")) {
      b.classList.toggle("active", b.dataset.tab === name);
      b.setAttribute("aria-selected", String(b.dataset.tab === name));
    }
    $("#side-order").hidden = name !== "order";
    $("#side-feedback").hidden = name !== "feedback";
    // The inbox needs room: the side pane widens while it shows.
    $(".console-layout").classList.toggle("wide-side", name === "feedback");
    if (name === "feedback") inbox.open(); else inbox.hide();
  }
  for (const b of document.querySelectorAll("#side-tabs [data-tab]")) b.addEventListener("click", () => sideTab(b.dataset.tab));

  onLangChange(() => { renderStatus(); renderQueue(); renderMine(); renderConv(); card.render(); inbox.render(); });
  sideTab("order");
  card.render();
  renderQueue();
  renderMine();
  renderConv();
}


// -- the feedback desk (issue 19): inbox, thread, actions, statistics, CSAT ----------------------------
const FB_TEXT_MAX = 4000;
const FB_TAGS_MAX = 10;
const FB_TAG_MAX = 32;
const FB_PAGE = 30;
const FB_OPEN = new Set(["new", "in_progress", "replied"]);
// The server's status table (feedback/model.py); `replied` comes only from a reply.
const FB_MOVES = {
  new: ["in_progress", "resolved", "closed"],
  in_progress: ["resolved", "closed"],
  replied: ["in_progress", "resolved", "closed"],
  resolved: ["in_progress"],
  closed: ["in_progress"],
};
const FB_BUBBLES = new Set(["created", "replied", "user_replied", "noted"]);

function feedbackDesk({ token, claims, chatSock, showOrder }) {
  const me = claims.sub;
  const isAdmin = claims.role === "admin";
  const items = new Map();     // id -> the newest view of each item we know
  let shown = [];              // ids in the list
  let loaded = false, more = false, nextOffset = null, listSeq = 0, listError = null;
  let skew = 0;                // server clock - ours (the list's `now`)
  let selected = null;         // id of the item in the detail pane
  let thread = null;           // {id, events: Map(seq -> event), loading, error}
  let view = "inbox";
  let visible = false;
  const alerts = new Map();    // id -> item: overdue pushes not yet looked at
  let stats = null, csat = null, statsSeq = 0;

  // -- the list ----------------------------------------------------------------------------
  function remember(f) {
    const old = items.get(f.id);
    if (!old || (f.seq ?? 0) >= (old.seq ?? 0)) items.set(f.id, f);
    return items.get(f.id);
  }

  function filterParams() {
    const p = new URLSearchParams();
    const st = $("#fb-status").value;
    if (st === "open") p.set("open", "true");
    else if (st) p.set("status", st);
    const who = $("#fb-assignee").value;
    if (who === "mine") p.set("assignee", me);
    else if (who === "none") p.set("assignee", "none");
    if ($("#fb-overdue").checked) p.set("overdue", "true");
    for (const k of ["q", "tag", "category"]) {
      const v = $(`#fb-${k}`).value.trim();
      if (v) p.set(k, v);
    }
    return p;
  }

  /** Whether a pushed item belongs in the list as filtered (all but the term, which is the server's). */
  function matches(f) {
    const st = $("#fb-status").value;
    if (st === "open" ? !FB_OPEN.has(f.status) : st && f.status !== st) return false;
    const who = $("#fb-assignee").value;
    if (who === "mine" && f.assignee !== me) return false;
    if (who === "none" && f.assignee) return false;
    if ($("#fb-overdue").checked && !f.overdue) return false;
    const tag = $("#fb-tag").value.trim();
    if (tag && !(f.tags || []).includes(tag)) return false;
    const cat = $("#fb-category").value.trim();
    return !cat || f.category === cat;
  }

  async function load(reset) {
    const mine = ++listSeq;
    const p = filterParams();
    p.set("limit", String(FB_PAGE));
    if (!reset && nextOffset) p.set("offset", String(nextOffset));
    $("#feedback").dataset.state = "loading";
    const r = await api(`/api/feedback?${p}`, token);
    if (mine !== listSeq) return;  // a newer filter answers
    $("#feedback").dataset.state = "ready";
    if (!r.ok) { listError = r.error?.message || ""; renderList(); return; }
    listError = null;
    if (Number.isFinite(r.data.now)) skew = r.data.now - Date.now();
    if (reset) shown = [];
    for (const f of r.data.feedback) {
      remember(f);
      if (!shown.includes(f.id)) shown.push(f.id);
    }
    more = !!r.data.has_more;
    nextOffset = r.data.next_offset ?? null;
    loaded = true;
    renderList();
  }
  let reloadTimer = 0;
  function reloadSoon() { clearTimeout(reloadTimer); reloadTimer = setTimeout(() => load(true), 400); }

  const rank = (f) => (f.overdue ? 0 : 1);
  function renderList() {
    const list = [...new Set(shown)].map((id) => items.get(id)).filter(Boolean)
      .sort((a, b) => rank(a) - rank(b) || b.ts - a.ts);
    const cats = new Set(list.map((f) => f.category));
    $("#fb-categories").replaceChildren(...[...cats].map((c) => h("option", { value: c })));
    const rows = list.map((f) => h("li", {
      class: `item fb-item${f.id === selected ? " selected" : ""}${f.overdue ? " overdue" : ""}`,
      dataset: { id: f.id, status: f.status, priority: f.priority || "normal", overdue: f.overdue ? "1" : "0", assignee: f.assignee || "" },
      tabindex: 0,
      onclick: () => select(f.id),
      onkeydown: (e) => { if (e.key === "Enter") select(f.id); },
    },
    h("div", { class: "line1" },
      f.overdue ? h("span", { class: "late-badge small fb-overdue", text: t("fb.overdue") }) : null,
      h("span", { class: "tag", text: f.category }),
      f.priority && f.priority !== "normal" ? h("span", { class: `prio p-${f.priority}`, text: t(`fb.pr.${f.priority}`) }) : null,
      h("span", { class: `fb-status st-${f.status}`, text: t(`fb.st.${f.status}`) }),
      h("span", { class: "muted fb-time", text: fmtDateTime(f.ts) })),
    h("div", { class: "fb-body", text: f.body }),
    h("div", { class: "line2" },
      h("span", { class: "fb-assignee", text: f.assignee ? `${t("fb.assignee")}: ${whoName(f.assignee)}` : t("fb.unassigned") }),
      ` · ${f.user?.name || f.user?.id || ""}${f.order_id ? ` · ${f.order_id}` : ""}`,
      ...(f.tags || []).map((tg) => h("span", { class: "tag fb-tag", text: tg })))));
    let empty = t("console.feedback_empty");
    if (listError) empty = listError;
    else if (!loaded) empty = t("chat.loading");
    else if ([...filterParams().keys()].length) empty = t("fb.empty_filtered");
    $("#feedback").replaceChildren(...(rows.length ? rows : [h("li", { class: `empty${listError ? " error" : ""}`, text: empty })]));
    $("#feedback-more").hidden = !more;
  }

  const whoName = (id) => (id === me ? `${t("fb.me")} (${id})` : id);

  // -- live: every step of every item, and the SLA's alarms ----------------------------------
  function pushed(f, ev) {
    if (!f?.id || !("user" in f)) return null;  // our own items' author view: not the inbox's
    const known = shown.includes(f.id);
    const item = remember(f);
    if (loaded && !known) {
      if ($("#fb-q").value.trim()) reloadSoon();  // the term is the server's to match
      else if (matches(item)) shown.push(f.id);
    }
    if (ev && thread?.id === f.id) addEvents([ev]);
    renderList();
    if (selected === f.id) renderDetail();
    return item;
  }
  chatSock.on("feedback_event", (m) => { pushed(m?.feedback, m?.event); });
  chatSock.on("feedback_overdue", (m) => {
    const item = pushed(m?.feedback, null);
    if (!item) return;
    alerts.set(item.id, item);
    toast(t("fb.overdue_toast", { body: excerpt(item.body) }), "error");
    renderAlert();
  });
  // Back after a drop (or the cluster asks): what we show may have missed steps.
  let connectedOnce = false;
  chatSock.on("connect", () => { if (connectedOnce && loaded) refresh(); connectedOnce = true; });
  chatSock.on("resync", () => { if (loaded) refresh(); });
  function refresh() {
    load(true);
    if (selected) loadThread(selected);
  }

  const excerpt = (s) => (s.length > 24 ? `${s.slice(0, 24)}…` : s);

  function renderAlert() {
    const n = alerts.size;
    $("#fb-tab-badge").textContent = n ? String(n) : "";
    $("#fb-alert").hidden = !n;
    $("#fb-alert-text").textContent = n ? t("fb.overdue_alert", { n }) : "";
  }
  $("#fb-alert-show").addEventListener("click", () => {
    alerts.clear();
    renderAlert();
    setView("inbox");
    $("#fb-overdue").checked = true;
    load(true);
  });
  $("#fb-alert-dismiss").addEventListener("click", () => { alerts.clear(); renderAlert(); });

  // -- the selected item: its thread and what may be done with it ------------------------------
  function select(id) {
    selected = id;
    alerts.delete(id);
    renderAlert();
    $("#fb-error").hidden = true;
    loadThread(id);
    renderList();
    renderDetail();
    $("#fb-detail").scrollIntoView({ block: "nearest" });
  }

  async function loadThread(id) {
    thread = { id, events: new Map(), loading: true, error: null };
    const r = await api(`/api/feedback/${encodeURIComponent(id)}`, token);
    if (thread?.id !== id) return;
    thread.loading = false;
    if (!r.ok) thread.error = r.error?.message || "";
    else { remember(r.data.feedback); addEvents(r.data.events || []); }
    renderList();
    renderDetail();
  }

  function addEvents(events) {
    if (!thread) return;
    let gap = false;
    for (const ev of events) {
      if (ev?.feedback_id !== thread.id || !Number.isFinite(ev.seq)) continue;
      if (!thread.loading && thread.events.size && !thread.events.has(ev.seq - 1) && ev.seq > 1) gap = true;
      thread.events.set(ev.seq, ev);
    }
    // A step went by unseen (a dropped push): read the whole thread again.
    if (gap) loadThread(thread.id);
  }

  const canHandle = (f) => isAdmin || !f.assignee || f.assignee === me;

  function renderDetail() {
    const box = $("#fb-detail");
    const f = selected ? items.get(selected) : null;
    box.hidden = !f;
    if (!f) return;
    box.dataset.id = f.id;
    box.dataset.status = f.status;
    const due = f.sla_due_ts && !f.first_response_ts ? f.sla_due_ts : null;
    const left = due ? Math.round((due - (Date.now() + skew)) / 60_000) : null;
    $("#fb-head").replaceChildren(
      h("div", { class: "card-head" },
        h("span", {}, h("span", { class: "tag", text: f.category }), " ",
          f.source === "rating" ? h("span", { class: "tag", text: t("fb.from_rating") }) : null),
        h("span", {},
          f.overdue ? h("span", { class: "late-badge", id: "fb-detail-overdue", text: t("fb.overdue") }) : null, " ",
          h("span", { class: `fb-status st-${f.status}`, id: "fb-detail-status", text: t(`fb.st.${f.status}`) }),
          h("button", { type: "button", class: "ghost small", id: "fb-close", title: t("fb.close"), text: "×",
            onclick: () => { selected = null; thread = null; renderList(); renderDetail(); } }))),
      h("p", { class: "fb-text", text: f.body }),
      h("div", { class: "muted small-line" },
        `${f.user?.name || f.user?.id || ""} · ${t(`role.${f.user?.role}`)} · ${fmtDateTime(f.ts)}`,
        f.order_id ? " · " : null,
        f.order_id ? h("a", { href: "#", class: "fb-order", text: `${t("console.order")} ${f.order_id}`,
          onclick: (e) => { e.preventDefault(); showOrder(f.order_id); } }) : null,
        f.technician_id ? ` · ${t("console.technician")} ${f.technician_id}` : null),
      due ? h("div", { class: left < 0 || f.overdue ? "late-text small-line" : "small-line",
        text: `${t("fb.due", { time: fmtDateTime(due) })}${left >= 0 ? ` · ${t("fb.due_left", { n: left })}` : ""}` }) : "");

    // Assignment: an agent takes what nobody has, or gives back their own; an admin moves any.
    $("#fb-assignee-name").textContent = f.assignee ? whoName(f.assignee) : t("fb.unassigned");
    $("#fb-take").hidden = f.assignee === me || !(isAdmin || !f.assignee);
    $("#fb-unassign").hidden = !f.assignee || !(isAdmin || f.assignee === me);
    $("#fb-assign-form").hidden = !isAdmin;

    const handle = canHandle(f);
    $("#fb-moves").replaceChildren(...(handle ? (FB_MOVES[f.status] || []) : []).map((s) => h("button", {
      type: "button", class: "ghost small", dataset: { move: s }, text: t(`fb.to.${s}`),
      onclick: () => patch({ status: s }),
    })), handle ? "" : h("span", { class: "muted", text: t("fb.theirs", { id: f.assignee }) }));
    $("#fb-priority").value = f.priority || "normal";
    $("#fb-tags").replaceChildren(...(f.tags || []).map((tg) => h("span", { class: "tag fb-tag", dataset: { tag: tg } }, tg,
      h("button", { type: "button", class: "tag-x", title: t("fb.tag_remove", { tag: tg }), "aria-label": t("fb.tag_remove", { tag: tg }),
        text: "×", onclick: () => patch({ tags: (f.tags || []).filter((x) => x !== tg) }) }))));

    const events = thread?.id === f.id ? [...thread.events.values()].sort((a, b) => a.seq - b.seq) : [];
    const threadBox = $("#fb-thread");
    const atEnd = threadBox.scrollTop + threadBox.clientHeight >= threadBox.scrollHeight - 4;
    threadBox.replaceChildren(...(thread?.error ? [h("li", { class: "error", text: thread.error })]
      : thread?.loading && !events.length ? [h("li", { class: "muted", text: t("chat.loading") })]
        : events.map(renderEvent)));
    if (atEnd) threadBox.scrollTop = threadBox.scrollHeight;

    // Replying is the assignee's (or anyone's while nobody has it); notes are anyone's.
    $("#fb-reply").disabled = !handle || !FB_OPEN.has(f.status);
    $("#fb-reply-send").disabled = $("#fb-reply").disabled;
    $("#fb-reply").placeholder = !handle ? t("fb.theirs", { id: f.assignee })
      : FB_OPEN.has(f.status) ? t("fb.reply_ph") : t("fb.reopen_first");
    counts();
  }

  function renderEvent(ev) {
    const who = ev.actor?.name || ev.actor?.id || t(`role.${ev.actor?.role || "system"}`);
    const d = ev.data || {};
    const meta = h("div", { class: "ev-meta" }, h("span", { class: "ev-who", text: who }), " ",
      h("span", { class: "ev-kind", text: eventLabel(ev) }), " ", h("time", { text: fmtDateTime(ev.ts) }));
    if (FB_BUBBLES.has(ev.type)) {
      const text = ev.type === "created" ? items.get(ev.feedback_id)?.body ?? d.body ?? "" : d.text ?? "";
      return h("li", { class: `ev ev-${ev.type}`, dataset: { seq: ev.seq, type: ev.type } }, meta,
        h("div", { class: "ev-text", text }));
    }
    return h("li", { class: `ev ev-step ev-${ev.type}`, dataset: { seq: ev.seq, type: ev.type } }, meta);
  }

  function eventLabel(ev) {
    const d = ev.data || {};
    switch (ev.type) {
      case "assigned":
        if (!d.assignee) return t("fb.ev.unassigned");
        return t(d.routed ? "fb.ev.routed" : "fb.ev.assigned", { to: whoName(d.assignee) });
      case "status": return t("fb.ev.status", { status: t(`fb.st.${d.status || ev.status}`) });
      case "tagged": return t("fb.ev.tagged", { tags: (d.tags || []).join("、") || t("fb.no_tags") });
      case "prioritized": return t("fb.ev.prioritized", { p: t(`fb.pr.${d.priority}`) });
      default: return t(`fb.ev.${ev.type}`);
    }
  }

  function showError(text) {
    const el = $("#fb-error");
    el.textContent = text;
    el.hidden = !text;
  }

  function errorText(error) {
    if (!error) return "";
    const allowed = error.details?.allowed;
    if (error.code === "conflict" && Array.isArray(allowed)) {
      return `${error.message} (${t("fb.allowed", { list: allowed.map((s) => t(`fb.st.${s}`)).join(" / ") })})`;
    }
    return error.message || error.code || "";
  }

  /** Applies an answer's item and events; returns whether it went through. */
  function applied(r) {
    if (!r.ok) {
      showError(errorText(r.error));
      // What we showed was out of date (someone else moved it): read it again.
      if (selected && ["conflict", "forbidden"].includes(r.error?.code)) loadThread(selected);
      renderDetail();  // the controls show the item as it is, not as asked
      return false;
    }
    showError("");
    const f = r.data?.feedback;
    const events = r.data?.events || (r.data?.event ? [r.data.event] : []);
    if (f) pushed(f, null);
    addEvents(events);
    renderList();
    renderDetail();
    return true;
  }

  async function patch(body) {
    if (!selected) return false;
    return applied(await api(`/api/feedback/${encodeURIComponent(selected)}`, token, { method: "PATCH", body }));
  }

  $("#fb-take").addEventListener("click", () => patch({ assignee: me }));
  $("#fb-unassign").addEventListener("click", () => patch({ assignee: null }));
  $("#fb-assign-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const to = $("#fb-assign-to").value.trim();
    if (to && await patch({ assignee: to })) $("#fb-assign-to").value = "";
  });
  $("#fb-priority").addEventListener("change", () => patch({ priority: $("#fb-priority").value }));
  $("#fb-tag-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const f = items.get(selected);
    const tag = $("#fb-tag-add").value.trim();
    if (!f || !tag) return;
    const tags = f.tags || [];
    if (tag.length > FB_TAG_MAX) { showError(t("fb.tag_too_long", { max: FB_TAG_MAX })); return; }
    if (tags.includes(tag)) { showError(t("fb.tag_dup")); return; }
    if (tags.length >= FB_TAGS_MAX) { showError(t("fb.too_many_tags", { max: FB_TAGS_MAX })); return; }
    if (await patch({ tags: [...tags, tag] })) $("#fb-tag-add").value = "";
  });

  function counts() {
    for (const k of ["reply", "note"]) {
      const n = $(`#fb-${k}`).value.length;
      const el = $(`#fb-${k}-count`);
      el.textContent = n ? `${n}/${FB_TEXT_MAX}` : "";
      el.classList.toggle("over", n > FB_TEXT_MAX);
    }
  }
  $("#fb-reply").addEventListener("input", counts);
  $("#fb-note").addEventListener("input", counts);

  /** A reply (to the author) or an internal note, from its box. */
  async function send(kind) {
    const input = $(`#fb-${kind}`);
    const id = selected;
    const text = input.value.trim();
    if (!id || !text) return;
    if (text.length > FB_TEXT_MAX) { showError(t("fb.too_long", { max: FB_TEXT_MAX, n: text.length })); return; }
    const button = $(`#fb-${kind}-send`);
    button.disabled = true;
    const r = await api(`/api/feedback/${encodeURIComponent(id)}/${kind === "reply" ? "replies" : "notes"}`, token,
      { method: "POST", body: { body: text } });
    button.disabled = false;
    if (applied(r)) { input.value = ""; counts(); }
  }
  $("#fb-reply-form").addEventListener("submit", (e) => { e.preventDefault(); send("reply"); });
  $("#fb-note-form").addEventListener("submit", (e) => { e.preventDefault(); send("note"); });
  for (const k of ["reply", "note"]) {
    $(`#fb-${k}`).addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); send(k); }
    });
  }

  // -- filters ----------------------------------------------------------------------------------
  $("#fb-filters").addEventListener("submit", (e) => { e.preventDefault(); load(true); });
  for (const id of ["#fb-status", "#fb-assignee", "#fb-overdue"]) $(id).addEventListener("change", () => load(true));
  $("#fb-clear").addEventListener("click", () => {
    $("#fb-status").value = "";
    $("#fb-assignee").value = "";
    $("#fb-overdue").checked = false;
    for (const k of ["q", "tag", "category"]) $(`#fb-${k}`).value = "";
    load(true);
  });
  $("#feedback-refresh").addEventListener("click", refresh);
  $("#feedback-more").addEventListener("click", () => load(false));

  // -- statistics of a period, its export, and CSAT ---------------------------------------------------
  function periodParams() {
    const p = new URLSearchParams();
    if ($("#fb-from").value) p.set("from", $("#fb-from").value);
    if ($("#fb-to").value) p.set("to", $("#fb-to").value);
    return p;
  }

  async function loadStats() {
    const mine = ++statsSeq;
    const p = periodParams();
    const sp = new URLSearchParams(p);
    sp.set("group_by", $("#fb-group").value);
    $("#fb-stats").dataset.state = "loading";
    const [s, c] = await Promise.all([api(`/api/feedback/stats?${sp}`, token), api(`/api/chat/csat?${p}`, token)]);
    if (mine !== statsSeq) return;
    $("#fb-stats").dataset.state = "ready";
    stats = s.ok ? s.data : { error: s.error?.message || "" };
    csat = c.ok ? c.data : { error: c.error?.message || "" };
    if (s.ok && !$("#fb-from").value) { $("#fb-from").value = s.data.from; $("#fb-to").value = s.data.to; }
    renderStats();
  }

  function renderStats() {
    if (!stats) return;
    if (stats.error) {
      $("#fb-summary").replaceChildren(h("p", { class: "error", text: stats.error }));
      for (const id of ["#fb-chart", "#fb-top", "#fb-rising"]) $(id).replaceChildren();
    } else {
      const median = (m) => (m?.count ? t("fb.median", { m: Math.round(m.median_min), n: m.count }) : "—");
      $("#fb-summary").replaceChildren(
        h("div", { id: "fb-total", dataset: { total: stats.total }, text: t("fb.total", { n: stats.total, prev: stats.previous_total }) }),
        h("div", { class: "fb-status-counts" }, ...Object.entries(stats.by_status || {}).map(([k, n]) =>
          h("span", { class: `fb-status st-${k}`, text: `${t(`fb.st.${k}`)} ${n}` }))),
        h("div", { class: "muted", text: `${t("fb.frt")}: ${median(stats.first_response)} · ${t("fb.res")}: ${median(stats.resolution)}` }));
      renderChart(stats.series || []);
      const term = (x, extra) => h("li", {}, h("button", { type: "button", class: "linkish", dataset: { term: x.term },
        title: t("fb.search_term"), text: x.term, onclick: () => searchTerm(x.term) }), h("span", { class: "muted", text: ` ${extra}` }));
      const none = () => [h("li", { class: "muted", text: t("fb.no_terms") })];
      const top = stats.top_terms || [], rising = stats.rising_terms || [];
      $("#fb-top").replaceChildren(...(top.length ? top.map((x) => term(x, String(x.count))) : none()));
      $("#fb-rising").replaceChildren(...(rising.length
        ? rising.map((x) => term(x, t("fb.rose", { n: x.count, prev: x.previous }))) : none()));
    }
    renderCsat();
  }

  /** Counts per day (or week) as bars: plain boxes, their height the share of the busiest. */
  function renderChart(series) {
    const max = Math.max(1, ...series.map((x) => x.count));
    const box = $("#fb-chart");
    box.setAttribute("aria-label", series.map((x) => `${x.period}: ${x.count}`).join(", "));
    box.replaceChildren(
      h("div", { class: "chart-max", text: String(max) }),
      h("div", { class: "bars" }, ...series.map((x) => h("div", { class: "col", title: `${x.period}: ${x.count}`, dataset: { period: x.period, count: x.count } },
        h("span", { class: `bar-v${x.count ? "" : " zero"}`, style: `height: ${((x.count / max) * 100).toFixed(1)}%` })))),
      h("div", { class: "chart-axis" }, h("span", { text: series[0]?.period || "" }), h("span", { text: series.at(-1)?.period || "" })));
  }

  function renderCsat() {
    $("#fb-csat-title").textContent = t(isAdmin ? "fb.csat_all" : "fb.csat_mine");
    const box = $("#fb-csat");
    if (!csat) return;
    if (csat.error) { box.replaceChildren(h("p", { class: "error", text: csat.error })); return; }
    const pct = (x) => `${Math.round(x * 100)}%`;
    const cells = (r) => [h("td", { text: String(r.count) }), h("td", { text: Number(r.mean).toFixed(2) }),
      h("td", { class: "sat" }, h("span", { class: "sat-bar", style: `width: ${pct(r.satisfied)}` }), h("span", { text: pct(r.satisfied) }))];
    const weeks = csat.weeks || [], agents = csat.agents || [];
    if (!weeks.length) { box.replaceChildren(h("p", { class: "empty", text: t("fb.csat_empty") })); return; }
    const head = (...keys) => h("thead", {}, h("tr", {}, ...keys.map((k) => h("th", { text: t(k) }))));
    const parts = [];
    if (isAdmin) {
      parts.push(h("table", { class: "csat-table", id: "csat-agents" },
        head("fb.col.agent", "fb.col.count", "fb.col.mean", "fb.col.satisfied"),
        h("tbody", {}, ...agents.map((r) => h("tr", { dataset: { agent: r.agent_id } }, h("td", { text: r.agent_id }), ...cells(r))))));
    }
    parts.push(h("table", { class: "csat-table", id: "csat-weeks" },
      isAdmin ? head("fb.col.week", "fb.col.agent", "fb.col.count", "fb.col.mean", "fb.col.satisfied")
        : head("fb.col.week", "fb.col.count", "fb.col.mean", "fb.col.satisfied"),
      h("tbody", {}, ...weeks.map((r) => h("tr", { dataset: { agent: r.agent_id, week: r.week } },
        h("td", { text: r.week }), isAdmin ? h("td", { text: r.agent_id }) : null, ...cells(r))))));
    box.replaceChildren(...parts);
  }

  function searchTerm(term) {
    $("#fb-q").value = term.slice(0, 32);
    setView("inbox");
    load(true);
  }

  /** The export needs the bearer token: fetched here, handed to the browser as a file. */
  async function exportCsv() {
    const button = $("#fb-export");
    button.disabled = true;
    try {
      const resp = await fetch(`/api/feedback/export.csv?${periodParams()}`, { headers: { Authorization: `Bearer ${token}` } });
      if (!resp.ok) {
        const reply = await resp.json().catch(() => null);
        toast(reply?.error?.message || `HTTP ${resp.status}`, "error");
        return;
      }
      const blob = await resp.blob();
      const name = /filename="([^"]+)"/.exec(resp.headers.get("Content-Disposition") || "")?.[1] || "feedback.csv";
      const url = URL.createObjectURL(blob);
      const a = h("a", { href: url, download: name, hidden: true });
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 60_000);
    } catch {
      toast(t("err.network"), "error");
    } finally {
      button.disabled = false;
    }
  }
  $("#fb-period").addEventListener("submit", (e) => { e.preventDefault(); loadStats(); });
  $("#fb-group").addEventListener("change", loadStats);
  $("#fb-export").addEventListener("click", exportCsv);

  // -- the two views --------------------------------------------------------------------------------
  function setView(name) {
    view = name;
    for (const b of document.querySelectorAll("#fb-views [data-view]")) {
      b.classList.toggle("active", b.dataset.view === name);
      b.setAttribute("aria-selected", String(b.dataset.view === name));
    }
    $("#fb-inbox").hidden = name !== "inbox";
    $("#fb-stats").hidden = name !== "stats";
    if (name === "stats" && visible) loadStats();
    if (name === "inbox" && visible && !loaded) load(true);
  }
  for (const b of document.querySelectorAll("#fb-views [data-view]")) b.addEventListener("click", () => setView(b.dataset.view));
  setView("inbox");
  renderAlert();
  setInterval(() => { if (selected && visible) renderDetail(); }, 30_000);  // the SLA's minutes left

  return {
    open() {
      visible = true;
      setView(view);
    },
    hide() { visible = false; },
    render() {
      renderList();
      renderDetail();
      renderAlert();
      renderStats();
    },
  };
}

// Last: main() uses the classes and constants above, which exist only once evaluated.
applyI18n();
if (checkVendor()) await main();
