// /ops: dispatchers and admins — technicians in the visible map area by status, live
// (those with a job at risk of being late ringed in red), the technicians' day as a
// timeline of jobs, and an order's dispatch record with the reason for each candidate.
import {
  $, api, applyI18n, badgeIcon, call, checkVendor, CONFIG, connect, fmtDistance, fmtEta, fmtTime, h, lang, makeMap,
  Mover, onLangChange, setupTopbar, signIn, stateLabel, t, toast, toMap, watchConnection, RatingCache, ratingText,
} from "./common.js";
import { lateOf } from "./orders.js";

const STATUSES = ["available", "busy", "offline"];
const HOUR = 3_600_000;
// The timeline shows at least the working day, more when jobs lie outside it.
const DAY_VIEW = [7, 21];
// A job leaves its technician's day when it is cancelled (its time is given back).
const GONE = new Set(["cancelled"]);
const LATE_REFRESH_MS = 60_000;
const RATING_TTL_MS = 60_000;

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
  const names = new Map();  // technician id -> name, from every area reply
  const lateOrders = new Map();  // order id -> technician id, for jobs at risk of being late

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
    if (d.name) names.set(d.id, d.name);
    paintTech(tech);
  }

  function paintTech(tech) {
    const late = lateTechs().has(tech.data.id);
    tech.el.className = `badge tech s-${tech.data.status}${late ? " late" : ""}`;
    tech.el.dataset.status = tech.data.status;
    tech.el.dataset.late = late ? "1" : "0";
  }

  // -- late jobs: a red ring on their technician ---------------------------------------------------
  function lateTechs() { return new Set(lateOrders.values()); }

  function noteLate(job) {
    if (!job || typeof job.order_id !== "string") return;
    if (lateOf(job) && typeof job.technician_id === "string") lateOrders.set(job.order_id, job.technician_id);
    else lateOrders.delete(job.order_id);
  }

  function paintLate() {
    for (const x of techs.values()) paintTech(x);
    scheduleRender();
  }

  async function loadLate() {
    const r = await api("/api/orders/late", token);
    if (!r.ok || !Array.isArray(r.data?.orders)) return;
    lateOrders.clear();
    for (const o of r.data.orders) noteLate(o);
    paintLate();
  }
  setInterval(loadLate, LATE_REFRESH_MS);

  // A technician's rating, fetched when their tooltip opens and kept a minute.
  const ratings = new RatingCache(token, RATING_TTL_MS);
  const ratingOf = (id) => ratings.get(id, () => {
    const tip = techs.get(id)?.marker.getTooltip();
    if (tip?.isOpen()) tip.update();
  });

  function tooltip(d) {  // an element, not a string: Leaflet would parse a string as HTML
    return h("span", { class: "tech-tip", dataset: { id: d.id } },
      h("span", { text: `${d.name || d.id} · ${t(`tech.${d.status}`)}${d.order_id ? ` · ${d.order_id}` : ""} · ${fmtTime(d.ts)}` }),
      h("br"),
      h("span", { class: "tip-rating", text: ratingText(ratingOf(d.id)) }));
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
    const late = lateTechs();
    $("#tech-list").replaceChildren(...(visible.length ? visible.map((x) => h("li", {
      class: `item${late.has(x.data.id) ? " late" : ""}`, dataset: { id: x.data.id, status: x.data.status }, tabindex: 0,
      onclick: () => { map.panTo(x.marker.getLatLng()); x.marker.openTooltip(); },
    },
    h("div", { class: "line1" }, h("span", { class: `dot s-${x.data.status}` }), h("span", { class: "title", text: x.data.name || x.data.id }),
      late.has(x.data.id) ? h("span", { class: "late-badge small", text: t("ops.late") }) : null,
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
    if (!record.ok) { box.replaceChildren(h("p", { class: "error", text: `${orderId}: ${record.error?.message || ""}` })); return; }
    lastRecord = { order_id: orderId, order: orderReply.ok ? orderReply.data?.order || null : null,
      dispatches: Array.isArray(record.data?.dispatches) ? record.data.dispatches : [] };
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
    box.dataset.orderId = lastRecord.order_id;
    if (order) {
      const addr = order.address || {};
      const hasHome = Number.isFinite(addr.lat) && Number.isFinite(addr.lng);
      const home = hasHome ? toMap(addr.lat, addr.lng) : null;
      if (home) orderMarker = L.marker(home, { icon: badgeIcon("home", t("marker.order")).icon, title: addr.text || "" }).addTo(map);
      const late = lateOf(order);
      parts.push(h("div", { class: "card-head" }, h("strong", { text: `${order.order_id} · ${order.service?.name || ""}` }),
        late ? h("span", { class: "late-badge", text: lateText(late) }) : null,
        h("span", { class: `state-badge s-${order.state}`, text: stateLabel(order.state) })),
      h("div", { class: "muted", text: addr.text || "" }),
      jobFacts(order));
      const pts = home ? [L.latLng(home)] : [];
      for (const d of dispatches) {
        if (!home) break;
        for (const c of d.candidates || []) {
          const x = techs.get(c.technician_id);
          if (!x) continue;
          pts.push(x.marker.getLatLng());
          candidateLines.push(L.polyline([home, x.marker.getLatLng()], {
            color: c.status === "accepted" ? "#1a7f37" : "#8c959f", weight: c.status === "accepted" ? 3 : 1.5,
            dashArray: c.status === "accepted" ? null : "4 4", interactive: false,
          }).addTo(map));
        }
      }
      if (pts.length) map.fitBounds(L.latLngBounds(pts).pad(0.2), { maxZoom: 15, animate: false });
    }
    if (!dispatches.length) parts.push(h("p", { class: "empty", id: "dispatch-none", text: t("ops.no_dispatch") }));
    for (const d of [...dispatches].reverse()) {
      const candidates = Array.isArray(d?.candidates) ? d.candidates : [];
      parts.push(h("section", { class: "round", dataset: { status: d?.status || "" } },
        h("div", { class: "round-head" },
          h("strong", { text: `${t(`dispatch.${d?.strategy}`)} · ${t(`dispatch.status.${d?.status}`)}` }),
          h("span", { class: "muted", text: `${fmtTime(d?.created_ts)} · ${t("ops.radius", { r: fmtDistance(d?.radius_m) })}` })),
        d?.assigned_to ? h("div", {}, `${t("ops.assigned_to")}: `, h("strong", { text: nameOf(d.assigned_to) })) : null,
        h("table", { class: "candidates" },
          h("thead", {}, h("tr", {}, ...["ops.col.tech", "ops.col.dist", "ops.col.status", "ops.col.reason", "ops.col.arrival"]
            .map((k) => h("th", { text: t(k) })))),
          h("tbody", {}, ...candidates.map((c) => h("tr", { class: `c-${c?.status}`, dataset: { tech: c?.technician_id || "", reason: c?.reason || "" } },
            h("td", { text: nameOf(c?.technician_id), title: c?.technician_id || "" }),
            h("td", { text: fmtDistance(c?.distance_m) }),
            h("td", { text: t(`cand.${c?.status}`) + (c?.answered_ts ? ` ${fmtTime(c.answered_ts)}` : "") }),
            h("td", { text: c?.reason ? t(`reason.${c.reason}`) : "—" }),
            h("td", { class: "arrival", text: arrivalText(c) })))))));
    }
    box.replaceChildren(...parts);
  }

  function nameOf(id) {
    return techs.get(id)?.data.name || names.get(id) || id || "";
  }

  // When the candidate could be there: a clock time and/or the drive.
  function arrivalText(c) {
    const at = Number.isFinite(c?.arrival_ts) ? clock(c.arrival_ts) : "";
    const drive = Number.isFinite(c?.arrival_s) ? fmtEta(c.arrival_s) : "";
    return at && drive ? `${at} (${drive})` : at || drive || "—";
  }

  function lateText(late) {
    return late.minutes ? t("ops.late_n", { n: late.minutes }) : t("ops.late");
  }

  /** Window, what happened when, and the projection: a job's facts in one line each. */
  function jobFacts(job) {
    const w = job?.window;
    const lines = [];
    if (Number.isFinite(w?.start_ts) && Number.isFinite(w?.end_ts)) {
      lines.push(h("div", { class: "fact" }, `${t("ops.window")}: `, h("strong", { text: `${clock(w.start_ts)}–${clock(w.end_ts)}` })));
    }
    const times = job?.times && typeof job.times === "object" ? job.times : {};
    const done = ["en_route", "arrived", "in_service", "completed"].filter((s) => Number.isFinite(times[s]));
    if (done.length) lines.push(h("div", { class: "fact muted", text: done.map((s) => `${stateLabel(s)} ${clock(times[s])}`).join(" · ") }));
    const late = lateOf(job);
    if (late) {
      lines.push(h("div", { class: "fact late-text", text: late.projected_arrival_ts
        ? `${lateText(late)} · ${t("ops.projected", { time: clock(late.projected_arrival_ts) })}` : lateText(late) }));
    }
    return lines.length ? h("div", { class: "facts" }, ...lines) : null;
  }

  // -- the technicians' day: one row each, jobs as bars on a time axis ----------------------------------
  // Times on it are the technicians' wall clock (the `day` reply's timezone).
  let day = null;              // {date, timezone, from_ts, to_ts, rows: Map(tech id -> Map(order id -> job))}
  let dayAsked = null;         // the date asked for (null: the server's today)
  let dayLoading = 0;
  let dayBuffered = [];        // job pushes that arrived while a `day` request was out
  let selectedJob = null;
  const wanted = new URLSearchParams(location.search).get("date");
  if (wanted && /^\d{4}-\d{2}-\d{2}$/.test(wanted)) { dayAsked = wanted; $("#day-date").value = wanted; }

  const clockFormats = new Map();
  function clock(ts) {
    if (!Number.isFinite(ts)) return "";
    const tz = day?.timezone;
    const key = `${lang}|${tz || ""}`;
    let f = clockFormats.get(key);
    if (!f) {
      try {
        f = new Intl.DateTimeFormat(lang === "en" ? "en-GB" : "zh-CN", { hour: "2-digit", minute: "2-digit", hour12: false, ...(tz ? { timeZone: tz } : {}) });
      } catch {
        f = new Intl.DateTimeFormat(lang === "en" ? "en-GB" : "zh-CN", { hour: "2-digit", minute: "2-digit", hour12: false });
      }
      clockFormats.set(key, f);
    }
    return f.format(new Date(ts));
  }

  async function loadDay() {
    if (!opsSock.connected) return;
    const mine = ++dayLoading;
    dayBuffered = [];
    $("#day").dataset.state = "loading";
    const r = await call(opsSock, "day", dayAsked ? { date: dayAsked } : {});
    if (mine !== dayLoading) return;  // a newer request answers
    const pending = dayBuffered;
    dayBuffered = [];
    dayLoading = 0;
    if (!r.ok) {
      day = null;
      $("#day").dataset.state = "error";
      $("#day-rows").replaceChildren(h("li", { class: "empty error", text: r.error?.message || "" }));
      $("#day-axis").replaceChildren();
      return;
    }
    const d = r.data || {};
    day = { date: d.date, timezone: d.timezone, from_ts: d.from_ts, to_ts: d.to_ts, truncated: d.truncated === true, rows: new Map() };
    if (!Number.isFinite(day.from_ts) || !Number.isFinite(day.to_ts) || day.to_ts <= day.from_ts) {
      const start = new Date(); start.setHours(0, 0, 0, 0);
      day.from_ts = start.getTime();
      day.to_ts = day.from_ts + 24 * HOUR;
    }
    for (const row of Array.isArray(d.technicians) ? d.technicians : []) {
      if (typeof row?.technician_id !== "string") continue;
      const jobs = new Map();
      for (const job of Array.isArray(row.jobs) ? row.jobs : []) {
        if (typeof job?.order_id !== "string") continue;
        jobs.set(job.order_id, { ...job, technician_id: row.technician_id });
        noteLate({ ...job, technician_id: row.technician_id });
      }
      day.rows.set(row.technician_id, jobs);
    }
    if (typeof d.date === "string") $("#day-date").value = d.date;
    for (const job of pending) placeJob(job);
    paintLate();
    renderDay();
  }

  // A job is on the day its window starts (as the `day` reply counts it).
  function onDay(job) {
    const w = job?.window;
    return !!day && Number.isFinite(w?.start_ts) && Number.isFinite(w?.end_ts)
      && w.start_ts >= day.from_ts && w.start_ts < day.to_ts;
  }

  /** A job's new state on the day: it moves rows on a re-assignment, leaves when cancelled. */
  function placeJob(job) {
    if (!day) return;
    // Wherever it was (the push of a re-assignment names the previous technician;
    // a missed push must not leave a bar behind either), then where it is now.
    for (const [tid, jobs] of day.rows) if (tid !== job.technician_id) unplace(tid, jobs, job.order_id);
    const tid = job.technician_id;
    if (typeof tid !== "string") return;
    if (GONE.has(job.state) || !onDay(job)) {
      if (day.rows.has(tid)) unplace(tid, day.rows.get(tid), job.order_id);
      return;
    }
    if (!day.rows.has(tid)) day.rows.set(tid, new Map());
    day.rows.get(tid).set(job.order_id, job);
  }

  // A row whose last job left goes too: as the next `day` reply would have it.
  function unplace(tid, jobs, orderId) {
    if (jobs.delete(orderId) && jobs.size === 0) day.rows.delete(tid);
  }

  opsSock.on("job", (job) => {
    if (!job || typeof job.order_id !== "string") return;
    noteLate(job);
    paintLate();
    if (dayLoading) { dayBuffered.push(job); return; }
    placeJob(job);
    renderDay();
    if (lastRecord?.order_id === job.order_id && lastRecord.order) {
      lastRecord.order = { ...lastRecord.order, state: job.state ?? lastRecord.order.state, late: job.late ?? null,
        times: job.times ?? lastRecord.order.times, technician_id: job.technician_id ?? lastRecord.order.technician_id };
      renderDispatch();
    }
  });

  /** The hours on show: the working day, widened to every job, within the day. */
  function dayRange() {
    let lo = day.from_ts + DAY_VIEW[0] * HOUR, hi = day.from_ts + DAY_VIEW[1] * HOUR;
    for (const jobs of day.rows.values()) {
      for (const j of jobs.values()) {
        if (!onDay(j)) continue;
        lo = Math.min(lo, j.window.start_ts);
        hi = Math.max(hi, j.window.end_ts);
      }
    }
    lo = day.from_ts + Math.floor((Math.max(lo, day.from_ts) - day.from_ts) / HOUR) * HOUR;
    hi = Math.min(day.to_ts, day.from_ts + Math.ceil((Math.min(hi, day.to_ts) - day.from_ts) / HOUR) * HOUR);
    return hi > lo ? [lo, hi] : [day.from_ts, day.to_ts];
  }

  function renderDay() {
    const box = $("#day");
    if (!day) return;
    box.dataset.state = "ready";
    box.dataset.date = day.date || "";
    // The server sends at most so many jobs a day: say when some are not shown.
    $("#day-tz").textContent = [day.timezone ? t("ops.day_tz", { tz: day.timezone }) : "",
      day.truncated ? t("ops.day_truncated") : ""].filter(Boolean).join(" · ");
    const [lo, hi] = dayRange();
    const pct = (ts) => `${(((Math.min(hi, Math.max(lo, ts)) - lo) / (hi - lo)) * 100).toFixed(3)}%`;
    const hours = (hi - lo) / HOUR;
    const step = hours > 16 ? 2 : 1;
    const ticks = [];
    for (let k = 0; k <= hours; k += step) {
      const ts = lo + k * HOUR;
      ticks.push(h("span", { class: "tick", style: `left: ${pct(ts)}`, text: clock(ts) }));
    }
    const now = Date.now();
    const nowLine = () => (now >= lo && now <= hi ? h("span", { class: "now-line", style: `left: ${pct(now)}` }) : null);
    $("#day-axis").replaceChildren(h("span", { class: "day-name" }), h("div", { class: "day-scale" }, ...ticks));
    const ids = [...day.rows.keys()].sort((a, b) => nameOf(a).localeCompare(nameOf(b)));
    const rows = ids.map((tid) => {
      const jobs = [...day.rows.get(tid).values()].filter(onDay).sort((a, b) => a.window.start_ts - b.window.start_ts);
      const lateCount = jobs.filter((j) => lateOf(j)).length;
      return h("li", { class: `day-row${lateCount ? " late" : ""}`, dataset: { techId: tid } },
        h("span", { class: "day-name", title: tid, text: nameOf(tid) }),
        h("div", { class: "day-track" }, nowLine(), ...jobs.map((j) => bar(j, pct))));
    });
    $("#day-rows").replaceChildren(...(rows.length ? rows : [h("li", { class: "empty", text: t("ops.day_empty") })]));
  }

  function bar(job, pct) {
    const w = job.window;
    const late = lateOf(job);
    const left = pct(w.start_ts);
    const width = `max(6px, calc(${pct(w.end_ts)} - ${left}))`;
    const state = typeof job.state === "string" ? job.state : "";
    const title = [
      `${job.order_id} · ${job.service?.name || ""}`,
      `${clock(w.start_ts)}–${clock(w.end_ts)} · ${stateLabel(state)}`,
      late ? lateText(late) : null,
    ].filter(Boolean).join("\n");
    return h("button", {
      type: "button",
      class: `bar s-${state}${late ? " late" : ""}${selectedJob === job.order_id ? " selected" : ""}`,
      style: `left: ${left}; width: ${width}`,
      title,
      dataset: { orderId: job.order_id, state, late: late ? "1" : "0" },
      onclick: () => openJob(job.order_id),
    }, h("span", { class: "bar-label", text: `${clock(w.start_ts)} ${job.service?.name || job.order_id}` }));
  }

  function openJob(orderId) {
    selectedJob = orderId;
    $("#dispatch-order").value = orderId;
    renderDay();
    loadDispatch(orderId);
    $("#dispatch-card").scrollIntoView({ block: "nearest" });
  }

  $("#day-date").addEventListener("change", () => {
    const v = $("#day-date").value;
    dayAsked = /^\d{4}-\d{2}-\d{2}$/.test(v) ? v : null;
    loadDay();
  });
  $("#day-today").addEventListener("click", () => { dayAsked = null; loadDay(); });
  opsSock.on("connect", () => { loadDay(); loadLate(); });
  opsSock.on("resync", () => { loadDay(); loadLate(); });
  setInterval(() => { if (day) renderDay(); }, 60_000);  // the now line moves on

  onLangChange(() => { clockFormats.clear(); render(); snapshot(); renderDispatch(); renderDay(); });
  render();
}
