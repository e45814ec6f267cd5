// /book: the customer picks a service, a place on the map and a free time in the next
// 7 days (live: a time taken elsewhere greys out as it goes), holds it while paying,
// and, once paid, follows the order on /track/{order_id}.
import {
  $, api, applyI18n, badgeIcon, call, checkVendor, CONFIG, connect, h, lang, makeMap,
  onLangChange, setupTopbar, signIn, t, toast, toMap, watchConnection,
} from "./common.js";
import { DICT } from "./i18n.js";

// Times are shown in the city's time: where the technician comes, whatever the
// browser's own zone (scheduling's default calendar timezone).
const TZ = "Asia/Shanghai";
const DAYS = 7;
const CENTRE = [31.2304, 121.4737];  // People's Square, the demo city's centre (WGS-84)
const HOLD_KEY = "rt.book.hold";
// What can be booked here: the skill a technician needs, and how long the job takes.
const SERVICES = [
  { code: "aircon_repair", skill: "aircon", key: "book.svc.aircon", minutes: 60 },
  { code: "plumbing", skill: "plumbing", key: "book.svc.plumbing", minutes: 60 },
  { code: "housekeeping", skill: "cleaning", key: "book.svc.cleaning", minutes: 120 },
  { code: "appliance_repair", skill: "appliance", key: "book.svc.appliance", minutes: 60 },
];

applyI18n();
if (checkVendor()) await main();

// -- days and times in the city's timezone ----------------------------------------------
function dayOf(ts) {  // "YYYY-MM-DD"
  const parts = new Intl.DateTimeFormat("en-US", { timeZone: TZ, year: "numeric", month: "2-digit", day: "2-digit" })
    .formatToParts(new Date(ts));
  const get = (type) => parts.find((p) => p.type === type).value;
  return `${get("year")}-${get("month")}-${get("day")}`;
}

function addDays(day, n) {
  const [y, m, d] = day.split("-").map(Number);
  return new Date(Date.UTC(y, m - 1, d + n)).toISOString().slice(0, 10);
}

function locale() { return lang === "en" ? "en-GB" : "zh-CN"; }

function dayLabel(day, n) {
  if (n === 0) return t("book.today");
  if (n === 1) return t("book.tomorrow");
  const [y, m, d] = day.split("-").map(Number);
  return new Date(Date.UTC(y, m - 1, d, 12)).toLocaleDateString(locale(), { timeZone: "UTC", weekday: "short" });
}

function dateLabel(day) {
  const [, m, d] = day.split("-").map(Number);
  return `${m}/${d}`;
}

function timeLabel(ts) {
  return new Date(ts).toLocaleTimeString(locale(), { timeZone: TZ, hour: "2-digit", minute: "2-digit", hourCycle: "h23" });
}

function whenLabel(ts) {
  const day = dayOf(ts);
  const n = Math.round((Date.parse(day) - Date.parse(dayOf(Date.now()))) / 86_400_000);
  return `${dayLabel(day, n)} ${dateLabel(day)} ${timeLabel(ts)}`;
}

function mmss(ms) {
  const s = Math.max(0, Math.ceil(ms / 1000));
  return `${String(Math.floor(s / 60)).padStart(2, "0")}:${String(s % 60).padStart(2, "0")}`;
}

// Map coordinates back to WGS-84 (the tiles may be GCJ-02; addresses are WGS-84):
// the shift is smooth, so one step of the forward transform undoes it to a metre.
function fromMap(lat, lng) {
  const [mlat, mlng] = toMap(lat, lng);
  return [2 * lat - mlat, 2 * lng - mlng];
}

async function main() {
  const { token, claims } = await signIn(["customer"], { sub: "c-dev" });
  setupTopbar(claims);
  const sock = connect("/booking", token);
  window.__rt = { sockets: { booking: sock } };
  watchConnection([sock]);

  let service = SERVICES[0];
  let place = { lat: CENTRE[0], lng: CENTRE[1] };
  let slots = new Map();      // start_ts -> {start_ts, end_ts, count}
  let loaded = false;
  let day = null;             // the day shown ("YYYY-MM-DD"), chosen by the user or the first with slots
  let hold = null;            // the live hold: the hold reply + what it was for
  let busy = false;           // a hold or payment under way
  let leaving = false;

  // -- service ----------------------------------------------------------------------------
  const serviceButtons = SERVICES.map((s) => h("button", {
    type: "button", class: "chip", "data-code": s.code, "data-skill": s.skill, "data-i18n": s.key,
    onclick: () => { if (service !== s) { service = s; renderServices(); watch(); } },
  }, t(s.key)));
  $("#services").append(...serviceButtons);
  function renderServices() {
    for (const b of serviceButtons) b.setAttribute("aria-pressed", String(b.dataset.code === service.code));
    $("#duration").textContent = t("book.minutes", { n: service.minutes });
  }
  renderServices();

  // -- place --------------------------------------------------------------------------------
  const map = makeMap($("#map"), toMap(...CENTRE), 13);
  window.__rt.map = map;
  const pin = badgeIcon("home", t("marker.home"), { id: "place-marker" });
  const marker = L.marker(toMap(place.lat, place.lng), { icon: pin.icon, keyboard: false }).addTo(map);
  function markPlace() {
    pin.el.dataset.lat = place.lat.toFixed(6);
    pin.el.dataset.lng = place.lng.toFixed(6);
  }
  markPlace();
  let placeTimer = 0;
  function setPlace(lat, lng) {
    place = { lat: +lat.toFixed(6), lng: +lng.toFixed(6) };
    marker.setLatLng(toMap(place.lat, place.lng));
    markPlace();
    clearTimeout(placeTimer);
    placeTimer = setTimeout(watch, 250);  // a few taps in a row: one new view
  }
  map.on("click", (e) => setPlace(...fromMap(e.latlng.lat, e.latlng.lng)));
  window.__rt.setPlace = setPlace;

  // -- the live view of free times ------------------------------------------------------------
  // One view per socket: every watch replaces the last. Pushes that arrive before
  // the newest watch answers belong to a view it replaced, and are dropped.
  let watchSeq = 0, watching = false, watchedFrom = null;
  async function watch() {
    if (!sock.connected) return;
    const mine = ++watchSeq;
    watching = true;
    if (!loaded) renderSlots();
    watchedFrom = dayOf(Date.now());
    const r = await call(sock, "watch_availability", {
      lat: place.lat, lng: place.lng, skill: service.skill, from_date: watchedFrom,
      days: DAYS, duration_min: service.minutes,
    });
    if (mine !== watchSeq) return;  // a newer watch is on its way
    watching = false;
    if (!r.ok) {
      toast(r.error.message, "error");
      return;
    }
    slots = new Map(r.data.slots.map((s) => [s.start_ts, { ...s }]));
    loaded = true;
    renderSlots();
  }

  sock.on("connect", () => { watch(); checkHold(); });
  sock.on("resync", watch);
  sock.on("availability_changed", ({ changes }) => {
    if (watching) return;
    for (const { start_ts: ts, count } of changes) {
      const s = slots.get(ts);
      if (s) s.count = count;  // 0: gone, shown greyed out while it is being looked at
      else if (count > 0) slots.set(ts, { start_ts: ts, end_ts: ts + service.minutes * 60_000, count });
    }
    renderSlots();
  });

  function days() {
    const first = dayOf(Date.now());
    return Array.from({ length: DAYS }, (_, n) => addDays(first, n));
  }

  function renderSlots() {
    const now = Date.now();
    const byDay = new Map(days().map((d) => [d, []]));
    for (const s of [...slots.values()].sort((a, b) => a.start_ts - b.start_ts)) {
      byDay.get(dayOf(s.start_ts))?.push(s);
    }
    const open = (s) => s.count > 0 && s.start_ts > now;
    if (!day || !byDay.has(day)) {
      day = [...byDay.keys()].find((d) => byDay.get(d).some(open)) || [...byDay.keys()][0];
    }
    $("#days").replaceChildren(...[...byDay.entries()].map(([d, list], n) => {
      const free = list.filter(open).length;
      return h("button", {
        type: "button", role: "tab", class: d === day ? "active" : "", "aria-selected": String(d === day),
        "data-day": d, "data-free": free, onclick: () => { day = d; renderSlots(); },
      }, h("span", { class: "d", text: dayLabel(d, n) }), h("span", { class: "date", text: dateLabel(d) }),
      h("span", { class: "n", text: loaded ? (free ? t("book.day_n", { n: free }) : t("book.day_full")) : "" }));
    }));
    const list = byDay.get(day) || [];
    const status = $("#slots-status");
    const grid = $("#slots");
    grid.dataset.state = loaded ? "ready" : "loading";
    status.textContent = !loaded ? t("book.loading") : list.some(open) ? "" : t("book.none_day");
    status.hidden = !status.textContent;
    grid.replaceChildren(...list.map((s) => {
      const held = hold && hold.start_ts === s.start_ts && hold.skill === service.skill;
      const usable = open(s) || held;
      const note = held ? t("book.slot_mine") : !usable ? t("book.slot_full")
        : t("book.slot_count", { n: s.count });
      return h("button", {
        type: "button", class: `slot${held ? " mine" : ""}`, disabled: !usable || busy,
        "data-start": s.start_ts, "data-count": s.count, "aria-pressed": held ? "true" : null,
        title: whenLabel(s.start_ts), onclick: () => { if (!held) take(s.start_ts); },
      }, h("span", { class: "t", text: timeLabel(s.start_ts) }), h("span", { class: "n", text: note }));
    }));
  }
  // Times that have passed stop being offered; after midnight, the next 7 days.
  setInterval(() => { if (watchedFrom && dayOf(Date.now()) !== watchedFrom) watch(); else renderSlots(); }, 30_000);

  // -- hold, release, pay ---------------------------------------------------------------------------
  async function take(ts) {
    if (busy) return;
    busy = true;
    renderSlots();
    const before = hold;
    const r = await call(sock, "hold", {
      start_ts: ts, duration_min: service.minutes, lat: place.lat, lng: place.lng, skill: service.skill,
    });
    busy = false;
    if (!r.ok) {
      renderSlots();
      refused(r.error);
      return;
    }
    setHold({ ...r.data, code: service.code, key: service.key, skill: service.skill, lat: place.lat, lng: place.lng });
    // Changed their mind: the new time is held first, then the old one goes back.
    if (before && before.hold_id !== r.data.hold_id) await call(sock, "release", { hold_id: before.hold_id });
  }

  function refused(error) {
    const d = error.details || {};
    if (error.code === "conflict" && d.reason === "hold_limit") toast(t("book.hold_limit"), "error");
    else if (error.code === "conflict" && d.next?.length) toast(t("book.taken_next", { time: whenLabel(d.next[0]) }), "error");
    else if (error.code === "conflict") toast(t("book.taken"), "error");
    else toast(error.message, "error");
  }

  let tick = 0;
  function setHold(next) {
    hold = next;
    if (hold) sessionStorage.setItem(HOLD_KEY, JSON.stringify(hold));
    else sessionStorage.removeItem(HOLD_KEY);
    clearInterval(tick);
    if (hold) tick = setInterval(renderHold, 1000);
    renderHold();
    renderSlots();
  }

  function renderHold() {
    const box = $("#hold");
    box.hidden = !hold;
    if (!hold) return;
    box.dataset.holdId = hold.hold_id;
    const left = hold.expires_ts - Date.now();
    const cd = $("#hold-countdown");
    cd.textContent = mmss(left);
    cd.dataset.leftS = String(Math.max(0, Math.ceil(left / 1000)));
    $("#hold-what").textContent = `${t(hold.key)} · ${whenLabel(hold.start_ts)}–${timeLabel(hold.end_ts)}`;
    $("#hold-note").textContent = left > 0 ? t(CONFIG.dev ? "book.dev_note" : "book.pay_in_app")
      : t("book.expiring");
    $("#pay").hidden = !CONFIG.dev;
    $("#pay").disabled = busy;
    $("#release").disabled = busy;
  }

  function ended(reason) {
    setHold(null);
    toast(t(reason === "expired" ? "book.expired" : "book.released"));
  }

  sock.on("hold_ended", (e) => {
    if (!hold || e.hold_id !== hold.hold_id) return;  // an old hold, already let go here
    if (e.reason === "confirmed") {  // paid (maybe in another tab): on to its order
      if (e.order_id) track(e.order_id);
      else checkHold();  // the hold's record names the order
      return;
    }
    ended(e.reason);
  });

  // After a reconnect (or a reload) the hold may have ended meanwhile, unheard.
  async function checkHold() {
    if (!hold) return;
    const r = await api(`/api/holds/${encodeURIComponent(hold.hold_id)}`, token);
    if (!hold || !r.ok || r.data.hold.hold_id !== hold.hold_id) return;
    const st = r.data.hold.state;
    if (st === "confirmed" && r.data.hold.order_id) track(r.data.hold.order_id);
    else if (st !== "live" || r.data.hold.expires_ts <= Date.now()) ended(st === "released" ? "released" : "expired");
  }

  $("#release").addEventListener("click", async () => {
    if (!hold || busy) return;
    const r = await call(sock, "release", { hold_id: hold.hold_id });
    if (r.ok || r.error.code === "not_found") setHold(null);
    else toast(r.error.message, "error");
  });

  $("#pay").addEventListener("click", async () => {
    if (!hold || busy) return;
    busy = true;
    renderHold();
    $("#pay").textContent = t("book.paying");
    const text = $("#address-text").value.trim()
      || t("book.pinned", { lat: hold.lat.toFixed(5), lng: hold.lng.toFixed(5) });
    const r = await api("/api/dev/pay", token, {
      method: "POST",
      body: {
        hold_id: hold.hold_id,
        service: { code: hold.code, name: DICT.zh[hold.key] },
        address: { lat: hold.lat, lng: hold.lng, text },
      },
    });
    busy = false;
    $("#pay").textContent = t("book.pay");
    if (r.ok) { track(r.data.order.order_id); return; }
    renderHold();
    toast(t("book.pay_failed", { message: r.error.message }), "error");
    if (r.error.code === "conflict") checkHold();
  });

  function track(orderId) {
    if (leaving) return;
    leaving = true;
    sessionStorage.removeItem(HOLD_KEY);
    // Same tab: the token stays in sessionStorage for the tracking page.
    location.assign(`/track/${encodeURIComponent(orderId)}`);
  }

  try {  // a hold from before a reload
    const kept = JSON.parse(sessionStorage.getItem(HOLD_KEY) || "null");
    if (kept && kept.hold_id && kept.expires_ts > Date.now()) {
      service = SERVICES.find((s) => s.skill === kept.skill) || service;
      renderServices();
      setPlace(kept.lat, kept.lng);
      setHold(kept);
      checkHold();
    } else sessionStorage.removeItem(HOLD_KEY);
  } catch { sessionStorage.removeItem(HOLD_KEY); }

  onLangChange(() => { renderServices(); renderSlots(); renderHold(); });
  renderSlots();
}
