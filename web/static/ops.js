// /ops: dispatchers and admins — technicians in the visible map area by status, live,
// and an order's dispatch record with the reason for each candidate.
import {
  $, api, applyI18n, badgeIcon, call, checkVendor, CONFIG, connect, fmtDistance, fmtTime, h, makeMap,
  Mover, onLangChange, setupTopbar, signIn, stateLabel, t, toast, toMap, watchConnection,
} from "./common.js";

const STATUSES = ["available", "busy", "offline"];

applyI18n();
if (checkVendor()) await main();

async function main() {
  const { token, claims } = await signIn(["agent", "admin"], { sub: "ops-dev", name: "调度" });
  setupTopbar(claims);
  const trackSock = connect("/tracking", token);
  const opsSock = connect("/ops", token);
  window.__rt = { sockets: { tracking: trackSock, ops: opsSock } };
  watchConnection([trackSock, opsSock]);

  const map = makeMap($("#map"), toMap(31.2304, 121.4737), 13);
  window.__rt.map = map;
  const techs = new Map();  // id -> {data, marker, mover, el}

  // -- technicians in view -----------------------------------------------------------------------
  function upsert(d) {
    let tech = techs.get(d.id);
    const ll = [d.lat, d.lng];
    if (!tech) {
      const label = (d.name || d.id).slice(0, 1);
      const b = badgeIcon(`tech s-${d.status}`, label, { "data-id": d.id, "data-status": d.status });
      const marker = L.marker(ll, { icon: b.icon, keyboard: false, title: d.name || d.id }).addTo(map);
      marker.bindTooltip(() => tooltip(techs.get(d.id)?.data || d), { direction: "top", offset: [0, -14] });
      tech = { data: d, marker, el: b.el, mover: new Mover(marker, b.el) };
      tech.mover.mark(L.latLng(ll));
      techs.set(d.id, tech);
    } else {
      if (d.ts > tech.data.ts) tech.mover.moveTo(ll, 900);
      tech.data = { ...tech.data, ...d };
    }
    tech.el.className = `badge tech s-${tech.data.status}`;
    tech.el.dataset.status = tech.data.status;
  }

  function tooltip(d) {  // an element, not a string: Leaflet would parse a string as HTML
    return h("span", { text: `${d.name || d.id} · ${t(`tech.${d.status}`)}${d.order_id ? ` · ${d.order_id}` : ""} · ${fmtTime(d.ts)}` });
  }

  function remove(id) {
    const tech = techs.get(id);
    if (tech) { map.removeLayer(tech.marker); techs.delete(id); }
  }

  function bounds() {
    const b = map.getBounds();
    const clamp = (v, lo, hi) => Math.min(hi, Math.max(lo, v));
    return {
      min_lat: clamp(b.getSouth(), -90, 90), max_lat: clamp(b.getNorth(), -90, 90),
      min_lng: clamp(b.getWest(), -180, 180), max_lng: clamp(b.getEast(), -180, 180),
      coord_sys: CONFIG.coord_sys,
    };
  }

  let watchSeq = 0;
  async function watchArea() {
    if (!trackSock.connected) return;
    const mySeq = ++watchSeq;
    const r = await call(trackSock, "watch_area", bounds());
    if (mySeq !== watchSeq) return;  // a newer pan/zoom answered already
    if (!r.ok) { toast(r.error.message, "error"); return; }
    const seen = new Set();
    for (const d of r.data.technicians) { upsert(d); seen.add(d.id); }
    for (const id of [...techs.keys()]) if (!seen.has(id)) remove(id);
    render();
  }
  let moveTimer = 0;
  map.on("moveend", () => { clearTimeout(moveTimer); moveTimer = setTimeout(watchArea, 250); });
  trackSock.on("connect", watchArea);
  trackSock.on("resync", watchArea);
  trackSock.on("positions", (batch) => {
    for (const d of batch.technicians) upsert(d);
    scheduleRender();
  });

  let renderQueued = false;
  function scheduleRender() {
    if (renderQueued) return;
    renderQueued = true;
    setTimeout(() => { renderQueued = false; render(); }, 200);
  }

  function inView() {
    const b = map.getBounds();
    return [...techs.values()].filter((x) => b.contains(x.marker.getLatLng()));
  }

  function render() {
    const visible = inView();
    const counts = Object.fromEntries(STATUSES.map((s) => [s, 0]));
    for (const x of visible) counts[x.data.status] = (counts[x.data.status] || 0) + 1;
    $("#area-counts").replaceChildren(...STATUSES.map((s) => h("li", { class: `count s-${s}`, dataset: { status: s } },
      h("span", { class: "n", text: String(counts[s]) }), h("span", { text: t(`tech.${s}`) }))));
    const order = { busy: 0, available: 1, offline: 2 };
    visible.sort((a, b) => (order[a.data.status] - order[b.data.status]) || (a.data.name || a.data.id).localeCompare(b.data.name || b.data.id));
    $("#tech-list").replaceChildren(...(visible.length ? visible.map((x) => h("li", {
      class: "item", dataset: { id: x.data.id, status: x.data.status }, tabindex: 0,
      onclick: () => { map.panTo(x.marker.getLatLng()); x.marker.openTooltip(); },
    },
    h("div", { class: "line1" }, h("span", { class: `dot s-${x.data.status}` }), h("span", { class: "title", text: x.data.name || x.data.id }),
      h("span", { class: "muted", text: t(`tech.${x.data.status}`) })),
    h("div", { class: "line2", text: `${x.data.id}${x.data.order_id ? ` · ${t("ops.on_order")} ${x.data.order_id}` : ""} · ${fmtTime(x.data.ts)}` })))
      : [h("li", { class: "empty", text: t("ops.none_in_view") })]));
  }
  setInterval(render, 10_000);

  // -- presence and totals (/ops) --------------------------------------------------------------------
  async function snapshot() {
    const r = await call(opsSock, "snapshot", {});
    if (!r.ok) return;
    const d = r.data;
    $("#totals").textContent = t("ops.totals", { techs: d.technicians.online, agents: d.agents.online, available: d.agents.available });
  }
  let snapTimer = 0;
  opsSock.on("connect", snapshot);
  opsSock.on("presence", (e) => {
    if (e.kind === "technician") {
      const x = techs.get(e.user_id);
      if (x && !e.online) { x.data.status = "offline"; upsert(x.data); scheduleRender(); }
      if (x && e.online && x.data.status === "offline") watchArea();
    }
    clearTimeout(snapTimer);
    snapTimer = setTimeout(snapshot, 300);
  });
  setInterval(snapshot, 15_000);

  // -- dispatch record -----------------------------------------------------------------------------------
  let orderMarker = null, candidateLines = [];
  let lastRecord = null;
  $("#dispatch-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const id = $("#dispatch-order").value.trim();
    if (id) await loadDispatch(id);
  });
  $("#dispatch-refresh").addEventListener("click", () => { if (lastRecord) loadDispatch(lastRecord.order_id); });

  async function loadDispatch(orderId) {
    const box = $("#dispatch");
    box.replaceChildren(h("p", { class: "empty", text: t("chat.loading") }));
    const [orderReply, record] = await Promise.all([
      api(`/api/orders/${encodeURIComponent(orderId)}`, token),
      api(`/api/orders/${encodeURIComponent(orderId)}/dispatch`, token),
    ]);
    if (!record.ok) { box.replaceChildren(h("p", { class: "error", text: `${orderId}: ${record.error.message}` })); return; }
    lastRecord = { order_id: orderId, order: orderReply.ok ? orderReply.data.order : null, dispatches: record.data.dispatches };
    renderDispatch();
  }

  function renderDispatch() {
    const box = $("#dispatch");
    $("#dispatch-refresh").hidden = !lastRecord;
    if (!lastRecord) return;
    const { order, dispatches } = lastRecord;
    for (const l of candidateLines) map.removeLayer(l);
    candidateLines = [];
    if (orderMarker) { map.removeLayer(orderMarker); orderMarker = null; }
    const parts = [];
    if (order) {
      const home = toMap(order.address.lat, order.address.lng);
      orderMarker = L.marker(home, { icon: badgeIcon("home", t("marker.order")).icon, title: order.address.text }).addTo(map);
      parts.push(h("div", { class: "card-head" }, h("strong", { text: `${order.order_id} · ${order.service?.name || ""}` }),
        h("span", { class: `state-badge s-${order.state}`, text: stateLabel(order.state) })),
      h("div", { class: "muted", text: order.address.text }));
      const pts = [L.latLng(home)];
      for (const d of dispatches) {
        for (const c of d.candidates) {
          const x = techs.get(c.technician_id);
          if (!x) continue;
          pts.push(x.marker.getLatLng());
          candidateLines.push(L.polyline([home, x.marker.getLatLng()], {
            color: c.status === "accepted" ? "#1a7f37" : "#8c959f", weight: c.status === "accepted" ? 3 : 1.5,
            dashArray: c.status === "accepted" ? null : "4 4", interactive: false,
          }).addTo(map));
        }
      }
      map.fitBounds(L.latLngBounds(pts).pad(0.2), { maxZoom: 15, animate: false });
    }
    if (!dispatches.length) parts.push(h("p", { class: "empty", text: t("ops.no_dispatch") }));
    for (const d of [...dispatches].reverse()) {
      parts.push(h("section", { class: "round", dataset: { status: d.status } },
        h("div", { class: "round-head" },
          h("strong", { text: `${t(`dispatch.${d.strategy}`)} · ${t(`dispatch.status.${d.status}`)}` }),
          h("span", { class: "muted", text: `${fmtTime(d.created_ts)} · ${t("ops.radius", { r: fmtDistance(d.radius_m) })}` })),
        d.assigned_to ? h("div", {}, `${t("ops.assigned_to")}: `, h("strong", { text: nameOf(d.assigned_to) })) : null,
        h("table", { class: "candidates" },
          h("thead", {}, h("tr", {}, ...["ops.col.tech", "ops.col.dist", "ops.col.status", "ops.col.reason"].map((k) => h("th", { text: t(k) })))),
          h("tbody", {}, ...d.candidates.map((c) => h("tr", { class: `c-${c.status}`, dataset: { tech: c.technician_id, reason: c.reason || "" } },
            h("td", { text: nameOf(c.technician_id), title: c.technician_id }),
            h("td", { text: fmtDistance(c.distance_m) }),
            h("td", { text: t(`cand.${c.status}`) + (c.answered_ts ? ` ${fmtTime(c.answered_ts)}` : "") }),
            h("td", { text: c.reason ? t(`reason.${c.reason}`) : "—" })))))));
    }
    box.replaceChildren(...parts);
  }

  function nameOf(id) {
    return techs.get(id)?.data.name || id;
  }

  onLangChange(() => { render(); snapshot(); renderDispatch(); });
  render();
}
