// /track/{order_id}: the customer follows their order and technician live.
import {
  $, api, applyI18n, badgeIcon, call, checkVendor, CONFIG, connect, fmtDistance, fmtEta, fmtTime, h, lang, makeMap,
  Mover, onLangChange, setupTopbar, signIn, stateLabel, t, toast, toMap, watchConnection,
} from "./common.js";
import { bindComposer, ChatHub, renderMessages } from "./chat.js";
import { lateOf, MAIN_STATES, onThisJob, OrderFeed, TechWatch, VISIBLE } from "./orders.js";

const STALE_MS = 60_000;  // no fix for a minute: say when we last saw the technician
const orderId = decodeURIComponent(location.pathname.split("/").filter(Boolean).pop());

applyI18n();
if (checkVendor()) await main();

async function main() {
  const { token, claims } = await signIn(["customer", "agent", "admin"], { sub: "c-dev" });
  const isCustomer = claims.role === "customer";
  setupTopbar(claims);
  $("#order-id").textContent = orderId;

  const ordersSock = connect("/orders", token);
  const trackSock = connect("/tracking", token);
  const chatSock = connect("/chat", token);
  window.__rt = { sockets: { orders: ordersSock, tracking: trackSock, chat: chatSock } };
  watchConnection([ordersSock, trackSock, chatSock]);

  // -- map -----------------------------------------------------------------------
  const map = makeMap($("#map"), toMap(31.2304, 121.4737), 14);
  window.__rt.map = map;
  let home = null, techMarker = null, mover = null, techEl = null, fitted = false;
  const trailKey = `rt.trail.${orderId}`;
  let trail = [];
  try { trail = JSON.parse(sessionStorage.getItem(trailKey) || "[]"); } catch { trail = []; }
  const trailLine = L.polyline(trail.map((p) => [p[0], p[1]]), { color: "#1f6feb", weight: 4, opacity: 0.75 }).addTo(map);

  let info = null;        // the watch reply: technician {id, name}, technician_status, eta_s
  let fix = null;         // latest position (with eta_s, distance_m)
  let lastFixWall = 0;
  // The technician has not set off to this order (`not_started`, or
  // `on_another_job`: still on the job before): no position (where they are is
  // their own or another customer's business), only when they will come, kept
  // fresh by `eta` pushes. Positions show once the order is their current job.
  const STATUS_KEYS = { not_started: "track.not_started", on_another_job: "track.prev_job" };
  const notYet = () => !!info && !info.error && !onThisJob(info);

  function dropMarker() {
    if (techMarker) { map.removeLayer(techMarker); techMarker = null; techEl = null; mover = null; }
  }

  function clearTrail() {
    trail = [];
    trailLine.setLatLngs([]);
    sessionStorage.removeItem(trailKey);
  }

  function placeHome(order) {
    if (home || !order?.address) return;
    const { icon } = badgeIcon("home", t("marker.home"));
    home = L.marker(toMap(order.address.lat, order.address.lng), { icon, title: order.address.text, keyboard: false }).addTo(map);
    if (!fix) map.setView(home.getLatLng(), 15, { animate: false });
  }

  function onFix(p, fresh) {
    // Positions come only once this order is the technician's current job.
    if (notYet()) info = { ...info, technician_status: "on_this_job" };
    fix = p;
    const ll = [p.lat, p.lng];
    if (!techMarker) {
      const b = badgeIcon("tech", t("marker.tech"), { id: "tech-marker" });
      techEl = b.el;
      techMarker = L.marker(ll, { icon: b.icon, zIndexOffset: 1000, keyboard: false }).addTo(map);
      mover = new Mover(techMarker, techEl);
      mover.mark(L.latLng(ll));
    } else if (fresh) {
      const now = performance.now();
      mover.moveTo(ll, Math.max(300, Math.min(1500, now - lastFixWall)));
    }
    if (fresh) lastFixWall = performance.now();
    techEl.hidden = false;
    techEl.dataset.ts = String(p.ts);
    const state = feed.order?.state;
    if (fresh && (state === "en_route" || state === "arrived")) {
      trail.push([p.lat, p.lng, p.ts]);
      if (trail.length > 2000) trail = trail.slice(-2000);
      trailLine.setLatLngs(trail.map((q) => [q[0], q[1]]));
      sessionStorage.setItem(trailKey, JSON.stringify(trail));
    }
    if (!fitted && home) {
      map.fitBounds(L.latLngBounds([home.getLatLng(), L.latLng(ll)]), { paddingTopLeft: [50, 50], paddingBottomRight: [50, 110], maxZoom: 16, animate: false });
      fitted = true;
    } else if (!map.getBounds().pad(-0.08).contains(ll)) {
      map.panTo(ll);
    }
    renderTrack();
  }

  function onWatchInfo(data) {
    if (data === null) {  // not visible any more: no position is shown (privacy)
      info = null;
      fix = null;
      dropMarker();
      if (feed.order && !VISIBLE.has(feed.order.state) && feed.order.state !== "created") clearTrail();
    } else if (!data.error) {
      info = data;
      if (data.technician?.name) rememberTech(data.technician.name);
      // Not (yet) their current job: no marker. On it, a fix already shown stays
      // until a newer one (the reply may hold an older fix, or none yet).
      if (notYet()) { fix = null; dropMarker(); }
    }
    renderTrack();
  }

  function onEta(e) {
    if (!info || !Number.isFinite(e.eta_s)) return;
    info = { ...info, eta_s: e.eta_s, eta_basis: e.basis };
    renderTrack();
  }

  // The technician's name outlives the live view: from the watch or their chat messages.
  const nameKey = `rt.tech.${orderId}`;
  let techName = sessionStorage.getItem(nameKey);
  function rememberTech(name) {
    if (!name || name === techName) return;
    techName = name;
    sessionStorage.setItem(nameKey, name);
    renderTrack();
  }

  // -- order ---------------------------------------------------------------------
  const watch = new TechWatch(trackSock, orderId, onFix, onWatchInfo, onEta);
  let loaded = false;  // the first sync replays history: nothing in it is news
  let lateShown = false;
  const feed = new OrderFeed(ordersSock, orderId, (kind, f, fresh) => {
    if (kind === "error") {
      $("#order-state").textContent = f.error.code === "not_found" ? t("order.not_found")
        : f.error.code === "forbidden" ? t("order.forbidden") : f.error.message;
      return;
    }
    const news = loaded ? fresh || [] : [];
    loaded = true;
    const reassigned = news.some((ev) => ev.type === "reassigned");
    if (reassigned) {
      // Another technician: the old one's marker, trail and name go at once.
      clearTrail();
      dropMarker();
      fix = null;
      info = null;
      fitted = false;
      techName = null;
      sessionStorage.removeItem(nameKey);
    }
    placeHome(f.order);
    const watching = watch.wanted;
    watch.set(VISIBLE.has(f.order.state));
    // Any change of the order may change what the watch says (who comes, whether
    // this is their current job yet, the ETA): ask again.
    if (watching && news.length) watch.rewatch({ reset: reassigned });
    renderOrder();
    renderTrack();
    if (!lateOf(f.order) && news.some((ev) => ev.type === "on_time_again") && lateShown) toast(t("track.on_time"));
    renderLate();
  });

  function renderLate() {
    const box = $("#late-banner");
    const late = lateOf(feed.order);
    lateShown = !!late;
    box.hidden = !late;
    if (!late) { delete box.dataset.minutesLate; box.textContent = ""; return; }
    box.textContent = late.minutes ? t("track.late", { n: late.minutes }) : t("track.late_unknown");
    box.dataset.minutesLate = late.minutes ? String(late.minutes) : "";
  }

  function renderOrder() {
    const o = feed.order;
    if (!o) return;
    $("#service").textContent = o.service?.name || "";
    $("#address").textContent = o.address?.text || "";
    const st = $("#order-state");
    st.textContent = stateLabel(o.state);
    st.dataset.state = o.state;
    renderTimeline();
    renderActions();
  }

  function renderTimeline() {
    const o = feed.order;
    const reached = feed.reached();
    if (!reached.has("created")) reached.set("created", o.created_ts);
    let steps = [...MAIN_STATES];
    if (reached.has("cancelled")) {
      const furthest = Math.max(...MAIN_STATES.map((s, i) => (reached.has(s) ? i : 0)));
      steps = [...MAIN_STATES.slice(0, furthest + 1), "cancelled"];
    }
    for (const s of ["refund_requested", "refunded", "refund_rejected"]) if (reached.has(s)) steps.push(s);
    const currentIdx = steps.indexOf(o.state);
    $("#timeline").replaceChildren(...steps.map((s, i) => h("li", {
      class: `${reached.has(s) || i <= currentIdx ? "done" : "todo"}${s === o.state ? " current" : ""}${s === "cancelled" || s === "refund_rejected" ? " bad" : ""}`,
      dataset: { state: s },
    }, h("span", { class: "dot" }), h("span", { class: "label", text: stateLabel(s) }),
    h("span", { class: "time", text: reached.has(s) ? fmtTime(reached.get(s)) : "" }))));
  }

  function renderTrack() {
    renderTrackLines();
    const card = $(".map-card");
    card.hidden = !$("#eta").textContent && $("#last-seen").hidden && $("#tech-status").hidden;
  }

  function renderTrackLines() {
    const o = feed.order;
    const eta = $("#eta"), seen = $("#last-seen"), who = $("#tech-name"), status = $("#tech-status");
    who.textContent = info?.technician?.name || techName || info?.technician?.id
      || (o?.technician_id ? t("track.tech_assigned") : t("track.no_tech"));
    seen.textContent = "";
    seen.hidden = true;
    status.hidden = true;
    delete status.dataset.status;
    delete eta.dataset.etaS;
    delete eta.dataset.basis;
    delete eta.dataset.distanceM;
    if (!o) return;
    // (Once the order is en route the watch is asked again: until it answers, an
    // earlier "not set off" is not shown against the order's own state.)
    if (notYet() && o.state === "assigned") {
      const key = STATUS_KEYS[info.technician_status] || "track.not_started";
      status.textContent = t(key);
      status.dataset.status = info.technician_status || "";
      status.hidden = false;
      if (typeof info.eta_basis === "string") eta.dataset.basis = info.eta_basis;
      if (Number.isFinite(info.eta_s)) {
        eta.textContent = t("track.queued_eta", { eta: fmtEta(info.eta_s) });
        eta.dataset.etaS = String(info.eta_s);
      } else {
        eta.textContent = t("track.assigned_wait");
      }
      return;
    }
    if (!VISIBLE.has(o.state)) {
      eta.textContent = o.state === "created" ? t("track.before_assign")
        : ["in_service", "completed"].includes(o.state) ? t("track.after_arrival") : "";
      return;
    }
    if (o.state === "arrived") {
      eta.textContent = t("track.arrived");
      eta.dataset.etaS = "0";
    } else if (fix && fix.eta_s !== null && fix.eta_s !== undefined) {
      eta.textContent = t("track.eta", { eta: fmtEta(fix.eta_s), dist: fmtDistance(fix.distance_m) });
      eta.dataset.etaS = String(fix.eta_s);
      eta.dataset.distanceM = String(fix.distance_m);
      eta.dataset.basis = "live";
    } else {
      eta.textContent = o.state === "assigned" ? t("track.assigned_wait") : t("track.waiting_fix");
    }
    if (fix) {
      const age = Date.now() - fix.ts;
      const stale = age >= STALE_MS;
      if (stale) {
        seen.textContent = t("track.last_seen", { n: Math.floor(age / 60_000) });
        seen.hidden = false;
      }
      if (techEl) techEl.classList.toggle("stale", stale);
    }
  }
  setInterval(renderTrack, 5000);

  // -- customer actions: cancel, rate, refund -------------------------------------------------
  function renderActions() {
    const o = feed.order;
    const box = $("#actions");
    const parts = [];
    if (isCustomer && (o.state === "created" || o.state === "assigned")) {
      parts.push(h("button", { class: "ghost", id: "cancel", text: t("order.cancel"),
        onclick: async () => {
          if (!confirm(t("order.cancel_confirm"))) return;
          const r = await call(ordersSock, "cancel", { order_id: orderId, reason: t("order.cancel_reason") });
          if (!r.ok) toast(r.error.message, "error");
        } }));
    }
    if (o.rating) {
      parts.push(h("div", { class: "rated", id: "rating-done" }, `${t("rate.yours")} `,
        h("span", { class: "stars-static", text: "★".repeat(o.rating.stars) + "☆".repeat(5 - o.rating.stars) }),
        o.rating.comment ? h("q", { text: o.rating.comment }) : null));
    } else if (isCustomer && ["completed", "refund_requested", "refunded", "refund_rejected"].includes(o.state) && o.completed_ts) {
      parts.push(ratingForm());
    }
    if (o.state === "refund_requested") parts.push(h("p", { class: "notice", id: "refund-status", text: t("refund.pending") }));
    if (o.state === "refunded") parts.push(h("p", { class: "notice good", id: "refund-status", text: t("refund.done") }));
    if (o.state === "refund_rejected") {
      const note = feed.lastEventOf("refund_rejected")?.data?.note;
      parts.push(h("p", { class: "notice bad", id: "refund-status", text: t("refund.rejected") + (note ? `：${note}` : "") }));
    }
    if (isCustomer && (o.state === "completed" || o.state === "cancelled")) parts.push(refundForm());
    // Keep a form the user is typing in.
    if (box.contains(document.activeElement) && box.dataset.state === o.state && box.dataset.rated === String(!!o.rating)) return;
    box.dataset.state = o.state;
    box.dataset.rated = String(!!o.rating);
    box.replaceChildren(...parts);
    box.hidden = parts.length === 0;
  }

  function starPicker(name, label) {
    const wrap = h("div", { class: "stars", role: "radiogroup", "aria-label": label, dataset: { name, value: "0" } });
    const buttons = [1, 2, 3, 4, 5].map((n) => h("button", {
      type: "button", role: "radio", "aria-label": `${n}`, text: "★",
      onclick: () => {
        wrap.dataset.value = String(n);
        buttons.forEach((b, i) => { b.classList.toggle("on", i < n); b.setAttribute("aria-checked", String(i === n - 1)); });
      },
    }));
    wrap.append(...buttons);
    return h("div", { class: "star-row" }, h("span", { class: "star-label", text: label }), wrap);
  }

  function ratingForm() {
    const overall = starPicker("stars", t("rate.overall"));
    const quality = starPicker("quality", t("rate.quality"));
    const attitude = starPicker("attitude", t("rate.attitude"));
    const efficiency = starPicker("efficiency", t("rate.efficiency"));
    const comment = h("textarea", { rows: 2, maxlength: 1000, placeholder: t("rate.comment_ph") });
    const msg = h("p", { class: "form-msg" });
    return h("form", {
      id: "rate-form", class: "card-form",
      onsubmit: async (e) => {
        e.preventDefault();
        const val = (el) => Number(el.querySelector(".stars").dataset.value);
        if (!val(overall)) { msg.textContent = t("rate.need_stars"); return; }
        const body = { order_id: orderId, stars: val(overall) };
        for (const [k, el] of [["quality", quality], ["attitude", attitude], ["efficiency", efficiency]]) if (val(el)) body[k] = val(el);
        if (comment.value.trim()) body.comment = comment.value.trim();
        const r = await call(ordersSock, "rate", body);
        if (r.ok) { feed.order = { ...feed.order, rating: r.data.order.rating }; toast(t("rate.thanks")); renderActions(); }
        else msg.textContent = r.error.message;
      },
    }, h("h3", { text: t("rate.title") }), overall, quality, attitude, efficiency, comment, msg,
    h("button", { type: "submit", class: "primary", text: t("rate.submit") }));
  }

  function refundForm() {
    const reason = h("textarea", { rows: 2, maxlength: 2000, required: true, placeholder: t("refund.reason_ph") });
    const msg = h("p", { class: "form-msg" });
    return h("details", { class: "refund" }, h("summary", { text: t("refund.ask") }),
      h("form", {
        id: "refund-form", class: "card-form",
        onsubmit: async (e) => {
          e.preventDefault();
          const r = await call(ordersSock, "request_refund", { order_id: orderId, reason: reason.value.trim() });
          if (!r.ok) msg.textContent = r.error.message;
        },
      }, reason, msg, h("button", { type: "submit", class: "primary", text: t("refund.submit") })));
  }

  // -- chat: technician (order chat) and support ----------------------------------------
  const hub = new ChatHub(chatSock, claims);
  hub.onMessage = (c, m) => { if (m.sender?.role === "technician" && c === orderConv) rememberTech(m.sender.name); };
  let tab = "order";
  let orderConv = null, supportConv = null, queuePos = null;
  const convFor = (which) => (which === "order" ? orderConv : supportConv);

  function renderChat() {
    for (const b of document.querySelectorAll(".tabs [data-tab]")) {
      const c = convFor(b.dataset.tab);
      b.classList.toggle("active", b.dataset.tab === tab);
      b.setAttribute("aria-selected", String(b.dataset.tab === tab));
      const unread = c && b.dataset.tab !== tab ? c.last - c.myRead : 0;
      b.querySelector(".unread").textContent = unread > 0 ? String(unread) : "";
    }
    const c = convFor(tab);
    const list = $("#messages");
    const status = $("#chat-status");
    const form = $("#composer");
    const start = $("#support-start");
    start.hidden = true;
    status.textContent = "";
    if (tab === "support") {
      const conv = c?.conv;
      if (!c || conv?.status === "closed") {
        start.hidden = !isCustomer;
        start.textContent = conv?.status === "closed" ? t("support.again") : t("support.start");
        status.textContent = conv?.status === "closed" ? t("support.closed") : t("support.intro");
      } else if (conv?.status === "queued") {
        status.textContent = queuePos ? t("support.queued_n", { n: queuePos }) : t("support.queued");
      } else if (conv?.status === "assigned") {
        status.textContent = t("support.assigned");
      }
    } else if (!c) {
      status.textContent = isCustomer ? t("chat.loading") : "";
    }
    if (c) renderMessages(list, c, claims, { peerLabel: (s) => t(`role.${s?.role}`) });
    else list.replaceChildren();
    const typing = c ? c.othersTyping() : [];
    $("#typing").textContent = typing.length ? t("chat.typing") : "";
    const writable = c && (!c.conv || c.conv.status !== "closed") && (isCustomer || tab === "order");
    form.hidden = !writable;
    if (c && tab === (c === orderConv ? "order" : "support") && document.visibilityState === "visible") c.markRead();
  }

  for (const b of document.querySelectorAll(".tabs [data-tab]")) {
    b.addEventListener("click", () => { tab = b.dataset.tab; renderChat(); });
  }
  bindComposer($("#composer"), $("#chat-input"), () => convFor(tab));
  document.addEventListener("visibilitychange", renderChat);

  function follow(c) {
    c.onChange(() => renderChat());
    renderChat();
    return c;
  }

  async function openSupport() {
    const r = await call(chatSock, "open", { kind: "support", order_id: isCustomer ? orderId : undefined, topic: t("support.topic", { id: orderId }) });
    if (!r.ok) { toast(r.error.message, "error"); return; }
    queuePos = r.data.queue_position ?? null;
    const id = r.data.conversation.conversation_id;
    supportConv = hub.convs.get(id) || follow(hub.attach(id, r.data.conversation));
    tab = "support";
    renderChat();
  }
  $("#support-start").addEventListener("click", openSupport);
  hub.onQueuePosition = (e) => {
    if (supportConv && e.conversation_id === supportConv.id) { queuePos = e.position; renderChat(); }
  };
  hub.onConversation = (conv) => {
    if (supportConv && conv.conversation_id === supportConv.id) {
      if (conv.status !== "queued") queuePos = null;
      if (conv.status === "assigned") toast(t("support.assigned"));
    }
    renderChat();
  };

  let chatReady = false;
  chatSock.on("connect", async () => {
    if (chatReady || !isCustomer) { renderChat(); return; }
    const opened = await call(chatSock, "open", { kind: "order", order_id: orderId });
    if (opened.ok) orderConv = follow(hub.attach(opened.data.conversation.conversation_id, opened.data.conversation));
    const listed = await call(chatSock, "list", {});
    if (listed.ok) {
      const mine = listed.data.conversations.filter((c) => c.kind === "support" && c.status !== "closed");
      const pick = mine.find((c) => c.order_id === orderId) || mine[0];
      if (pick) supportConv = follow(hub.attach(pick.conversation_id, pick));
    }
    chatReady = opened.ok;
    renderChat();
  });

  // -- notifications: what came while the page was closed, and Web Push ------------------
  // On connecting, /orders sends the notifications this customer missed while
  // connected nowhere (docs/notifications.md): those about this order are listed,
  // others link to their order. The server marks them read once sent.
  const here = `/track/${encodeURIComponent(orderId)}`;
  let missed = [];
  ordersSock.on("notifications", (e) => {
    const known = new Set(missed.map((n) => n.id));
    for (const n of Array.isArray(e?.notifications) ? e.notifications : []) {
      if (n && typeof n.id === "string" && !known.has(n.id)) { missed.push(n); known.add(n.id); }
    }
    // This order's first, newest first; then those of other orders.
    const other = (n) => (pathOf(n.link) === here ? 0 : 1);
    missed.sort((a, b) => other(a) - other(b) || (b.event_ts || b.ts || 0) - (a.event_ts || a.ts || 0));
    renderMissed();
  });
  $("#missed-close").addEventListener("click", () => { missed = []; renderMissed(); });

  function pathOf(link) {
    try {
      const u = new URL(link, location.origin);
      return u.origin === location.origin ? u.pathname : null;
    } catch { return null; }
  }

  function renderMissed() {
    const items = missed.map((n) => {
      const path = pathOf(n.link);
      const elsewhere = path && path !== here;
      return h("li", { class: "item", dataset: { id: n.id, kind: n.kind || "", order: elsewhere ? "other" : "this" } },
        h("div", { class: "line1" }, h("span", { class: "title", text: n.title || "" }),
          h("span", { class: "muted small-note", text: fmtTime(n.event_ts || n.ts) })),
        h("div", { class: "line2", text: n.body || "" }),
        elsewhere ? h("a", { href: path, text: t("notify.other_order") }) : null);
    });
    $("#missed-list").replaceChildren(...items);
    $("#missed").hidden = items.length === 0;
  }

  // "Notify me": Web Push through the service worker at /sw.js. A customer's
  // subscription carries all their orders' news while no page of theirs is open.
  const pushable = isCustomer && "serviceWorker" in navigator && "PushManager" in window && "Notification" in window;
  const SUBSCRIBE_MS = 15_000;  // a push service that never answers: say so, don't spin
  const notifyBtn = $("#notify"), notifyOff = $("#notify-off");
  let pushState = "off";  // off | working | on

  class PushFailure extends Error {
    constructor(code, message) { super(message); this.code = code; }
  }

  function within(promise, ms, code) {
    return Promise.race([promise, new Promise((_, reject) =>
      setTimeout(() => reject(new PushFailure(code, t("notify.no_answer"))), ms))]);
  }

  function keyBytes(b64url) {
    const b64 = b64url.replace(/-/g, "+").replace(/_/g, "/");
    return Uint8Array.from(atob(b64.padEnd(Math.ceil(b64.length / 4) * 4, "=")), (c) => c.charCodeAt(0));
  }

  function sameKey(buffer, b64url) {
    if (!buffer) return false;
    const a = new Uint8Array(buffer), b = keyBytes(b64url);
    return a.length === b.length && a.every((x, i) => x === b[i]);
  }

  function renderNotify() {
    notifyBtn.hidden = !pushable;
    notifyOff.hidden = !pushable || pushState !== "on";
    notifyBtn.dataset.state = pushState;
    notifyBtn.textContent = t(pushState === "on" ? "notify.enabled" : pushState === "working" ? "notify.working" : "notify.ask");
    notifyBtn.title = t(pushState === "on" ? "notify.enabled_title" : "notify.ask_title");
    notifyBtn.disabled = pushState === "working";
    notifyBtn.setAttribute("aria-pressed", String(pushState === "on"));
  }

  async function turnOn() {
    if (pushState !== "off") return;
    pushState = "working";
    delete notifyBtn.dataset.error;
    renderNotify();
    try {
      // Asked first, while the click still counts as the user's gesture.
      const permission = await Notification.requestPermission();
      if (permission !== "granted") throw new PushFailure("denied", t("notify.denied"));
      await navigator.serviceWorker.register("/sw.js", { scope: "/" })
        .catch((e) => { throw new PushFailure("register", e.message); });
      const reg = await within(navigator.serviceWorker.ready, SUBSCRIBE_MS, "register");
      const key = await api("/api/push/key", token);
      if (!key.ok) throw new PushFailure("key", key.error.message);
      let sub = await reg.pushManager.getSubscription();
      // Made with another server key (the server's changed): useless now.
      if (sub && !sameKey(sub.options?.applicationServerKey, key.data.public_key)) {
        await sub.unsubscribe().catch(() => {});
        sub = null;
      }
      if (!sub) {
        sub = await within(reg.pushManager.subscribe({
          userVisibleOnly: true, applicationServerKey: keyBytes(key.data.public_key),
        }), SUBSCRIBE_MS, "subscribe").catch((e) => { throw e instanceof PushFailure ? e : new PushFailure("subscribe", e.message || e.name); });
      }
      const saved = await api("/api/push/subscriptions", token, { method: "POST", body: sub.toJSON() });
      if (!saved.ok) {
        await sub.unsubscribe().catch(() => {});
        throw new PushFailure("save", saved.error.message);
      }
      // Pushes come in the language of the page they were turned on from.
      api("/api/notifications/preferences", token, { method: "PUT", body: { lang: lang === "en" ? "en" : "zh-CN" } });
      pushState = "on";
      toast(t("notify.on_done"));
    } catch (e) {
      pushState = "off";
      notifyBtn.dataset.error = e.code || "error";
      toast(e.code === "denied" ? e.message : t("notify.failed", { message: e.message || String(e) }), "error");
    }
    renderNotify();
  }

  async function turnOff() {
    if (pushState !== "on") return;
    pushState = "working";
    renderNotify();
    try {
      const reg = await navigator.serviceWorker.getRegistration("/");
      const sub = reg ? await reg.pushManager.getSubscription() : null;
      if (sub) {
        const r = await api("/api/push/subscriptions", token, { method: "DELETE", body: { endpoint: sub.endpoint } });
        if (!r.ok && r.error.code !== "not_found") throw new Error(r.error.message);
        await sub.unsubscribe();
      }
      pushState = "off";
      toast(t("notify.off_done"));
    } catch (e) {
      pushState = "on";
      toast(t("notify.off_failed", { message: e.message || String(e) }), "error");
    }
    renderNotify();
  }

  // Turned on in an earlier visit: say so, and tell the server again (it drops a
  // subscription its push service refused; the call is idempotent).
  async function syncPush() {
    if (!pushable || Notification.permission !== "granted") return;
    try {
      const reg = await navigator.serviceWorker.getRegistration("/");
      const sub = reg ? await reg.pushManager.getSubscription() : null;
      if (!sub || pushState !== "off") return;
      const saved = await api("/api/push/subscriptions", token, { method: "POST", body: sub.toJSON() });
      if (saved.ok && pushState === "off") { pushState = "on"; renderNotify(); }
    } catch { /* stays off: the button still works */ }
  }

  notifyBtn.addEventListener("click", turnOn);
  notifyOff.addEventListener("click", turnOff);
  renderNotify();
  syncPush();

  onLangChange(() => { renderOrder(); renderTrack(); renderLate(); renderChat(); renderNotify(); renderMissed(); });
  renderChat();
}
