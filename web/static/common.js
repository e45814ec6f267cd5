// What every page shares: configuration, language, sign-in, sockets, formatting, maps.
// Plain modern JS, no build step. `io` (socket.io-client) and `L` (Leaflet) are the
// globals of the vendor scripts the pages load before this module.
import { DICT } from "./i18n.js";

export const CONFIG = readConfig();

function readConfig() {
  const el = document.getElementById("rt-config");
  try {
    return { dev: false, tile_url: null, tile_attribution: null, coord_sys: "wgs84", ...JSON.parse(el.textContent) };
  } catch {
    return { dev: false, tile_url: null, tile_attribution: null, coord_sys: "wgs84" };
  }
}

// -- language ----------------------------------------------------------------
const LANG_KEY = "rt.lang";
export let lang = pickLang();
const langListeners = [];

function pickLang() {
  const asked = new URLSearchParams(location.search).get("lang");
  if (asked === "en" || asked === "zh") {
    localStorage.setItem(LANG_KEY, asked);
    return asked;
  }
  return localStorage.getItem(LANG_KEY) === "en" ? "en" : "zh";
}

export function t(key, vars = {}) {
  const text = DICT[lang]?.[key] ?? DICT.zh[key] ?? key;
  return text.replace(/\{(\w+)\}/g, (m, k) => (k in vars ? String(vars[k]) : m));
}

export function onLangChange(fn) { langListeners.push(fn); }

export function applyI18n(root = document) {
  document.documentElement.lang = lang === "en" ? "en" : "zh-CN";
  root.querySelectorAll("[data-i18n]").forEach((el) => { el.textContent = t(el.dataset.i18n); });
  root.querySelectorAll("[data-i18n-ph]").forEach((el) => { el.placeholder = t(el.dataset.i18nPh); });
  root.querySelectorAll("[data-i18n-title]").forEach((el) => { el.title = t(el.dataset.i18nTitle); });
  if (document.body.dataset.titleKey) document.title = t(document.body.dataset.titleKey);
}

export function setLang(next) {
  lang = next;
  localStorage.setItem(LANG_KEY, next);
  applyI18n();
  for (const fn of langListeners) fn();
}

export function setupLangToggle(button) {
  const label = () => { button.textContent = lang === "en" ? "中文" : "EN"; };
  label();
  button.addEventListener("click", () => { setLang(lang === "en" ? "zh" : "en"); label(); });
}

// -- DOM -----------------------------------------------------------------------
// Text always goes in as text (never innerHTML): names and messages are user data.
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "text") el.textContent = v;
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

export const $ = (sel, root = document) => root.querySelector(sel);

export function toast(text, kind = "info") {
  let box = $("#toasts");
  if (!box) { box = h("div", { id: "toasts", "aria-live": "polite" }); document.body.append(box); }
  const el = h("div", { class: `toast ${kind}`, text });
  box.append(el);
  setTimeout(() => el.remove(), 4000);
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

export function newId(prefix = "m-") {
  const b = crypto.getRandomValues(new Uint8Array(12));
  return prefix + Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

// -- sign-in ---------------------------------------------------------------------
// The token arrives in the URL fragment (#token=...; never sent to any server),
// is kept in this tab's sessionStorage and removed from the address bar.
const TOKEN_KEY = "rt.token";

export function decodeClaims(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const bin = atob(part.padEnd(Math.ceil(part.length / 4) * 4, "="));
    return JSON.parse(new TextDecoder().decode(Uint8Array.from(bin, (c) => c.charCodeAt(0))));
  } catch {
    return null;
  }
}

function tokenFromFragment() {
  const frag = new URLSearchParams(location.hash.slice(1));
  const token = frag.get("token");
  if (token) {
    sessionStorage.setItem(TOKEN_KEY, token);
    frag.delete("token");
    const rest = frag.toString();
    history.replaceState(null, "", location.pathname + location.search + (rest ? `#${rest}` : ""));
  }
  return sessionStorage.getItem(TOKEN_KEY);
}

export function signOut() {
  sessionStorage.removeItem(TOKEN_KEY);
  location.reload();
}

function usable(claims, roles) {
  return claims && roles.includes(claims.role) && (!claims.exp || claims.exp * 1000 > Date.now() + 5000);
}

/** Resolves with {token, claims} for one of `roles`, asking the user when needed. */
export async function signIn(roles, suggested = {}) {
  const token = tokenFromFragment();
  const claims = token ? decodeClaims(token) : null;
  if (usable(claims, roles)) return { token, claims };
  let why = "";
  if (claims && !roles.includes(claims.role)) why = t("signin.wrong_role", { role: t(`role.${claims.role}`) });
  else if (claims) why = t("signin.expired");
  return showSignIn(roles, suggested, why);
}

/** Shown when the server refuses the token (expired, revoked, wrong secret). */
export function authFailed(error) {
  sessionStorage.removeItem(TOKEN_KEY);
  const box = $("#signin");
  if (box) return;
  showSignIn([], {}, t("signin.refused", { message: error?.message || "" })).then(() => location.reload());
}

function showSignIn(roles, suggested, why) {
  return new Promise((resolve) => {
    const done = (token) => {
      const claims = decodeClaims(token);
      if (roles.length && !usable(claims, roles)) {
        msg.textContent = claims ? t("signin.wrong_role", { role: t(`role.${claims.role}`) }) : t("signin.bad_token");
        return;
      }
      sessionStorage.setItem(TOKEN_KEY, token);
      overlay.remove();
      resolve({ token, claims });
    };
    const msg = h("p", { class: "signin-msg", role: "alert", text: why });
    const pasted = h("textarea", { id: "signin-token", rows: 3, placeholder: t("signin.paste_ph") });
    const pasteForm = h("form", { class: "signin-paste", onsubmit: (e) => { e.preventDefault(); if (pasted.value.trim()) done(pasted.value.trim()); } },
      h("label", { for: "signin-token", text: t("signin.paste") }), pasted,
      h("button", { type: "submit", class: "primary", text: t("signin.use_token") }));
    const role0 = roles[0] || "customer";
    const devForm = CONFIG.dev ? devSignInForm(roles.length ? roles : ["customer", "technician", "agent", "admin"], suggested, role0, done, msg) : null;
    const hint = h("p", { class: "hint" }, t("signin.hint"), " ",
      h("code", { text: `python -m realtime token --role ${role0} --sub ${suggested.sub || "u1"}` }));
    const overlay = h("div", { id: "signin", class: "overlay" },
      h("div", { class: "dialog", role: "dialog", "aria-modal": "true", "aria-labelledby": "signin-title" },
        h("h2", { id: "signin-title", text: t("signin.title") }), msg, devForm, pasteForm, hint));
    document.body.append(overlay);
  });
}

function devSignInForm(roles, suggested, role0, done, msg) {
  const role = h("select", { id: "dev-role" }, roles.map((r) => h("option", { value: r, text: t(`role.${r}`), selected: r === role0 })));
  const sub = h("input", { id: "dev-sub", required: true, value: suggested.sub || `${role0.slice(0, 1)}-dev`, pattern: "[A-Za-z0-9_.:@\\-]{1,64}" });
  const name = h("input", { id: "dev-name", value: suggested.name || "", placeholder: t("signin.name_ph") });
  role.addEventListener("change", () => { if (!suggested.sub) sub.value = `${role.value.slice(0, 1)}-dev`; });
  return h("form", {
    class: "signin-dev",
    onsubmit: async (e) => {
      e.preventDefault();
      const body = { role: role.value, sub: sub.value.trim() };
      if (name.value.trim()) body.name = name.value.trim();
      const reply = await api("/api/dev/token", null, { method: "POST", body });
      if (reply.ok) done(reply.data.token);
      else msg.textContent = `${t("signin.failed")}: ${reply.error.message}`;
    },
  },
  h("h3", { text: t("signin.dev") }),
  h("div", { class: "row" },
    h("label", {}, t("signin.role"), role),
    h("label", {}, t("signin.sub"), sub),
    h("label", {}, t("signin.name"), name)),
  h("button", { type: "submit", class: "primary", id: "dev-signin", text: t("signin.dev_go") }));
}

// -- server calls -------------------------------------------------------------------
export async function api(path, token, { method = "GET", body } = {}) {
  const headers = {};
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  try {
    const resp = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    const reply = await resp.json().catch(() => null);
    return reply || { ok: false, error: { code: `http_${resp.status}`, message: resp.statusText } };
  } catch (e) {
    return { ok: false, error: { code: "network", message: t("err.network") } };
  }
}

/** Connects to a namespace; every namespace of a page shares one connection. */
export function connect(namespace, token) {
  const socket = io(namespace, {
    auth: { token },
    transports: ["websocket", "polling"],
    tryAllTransports: true,
    reconnectionDelay: 500,
    reconnectionDelayMax: 3000,
    timeout: 8000,
  });
  socket.on("connect_error", (err) => {
    const code = err?.data?.code;
    if (code === "unauthorized" || code === "forbidden") authFailed(err.data);
  });
  socket.on("disconnect", (reason) => {
    // The server hung up on us (not a network failure): come back by ourselves.
    if (reason === "io server disconnect") setTimeout(() => socket.connect(), 1000);
  });
  return socket;
}

/** An acked emit; always resolves with {ok, data} | {ok: false, error}. */
export async function call(socket, event, payload, timeoutMs = 10000) {
  try {
    const reply = await socket.timeout(timeoutMs).emitWithAck(event, payload);
    return reply && typeof reply === "object" ? reply : { ok: false, error: { code: "invalid", message: "bad reply" } };
  } catch {
    return { ok: false, error: { code: "timeout", message: t("err.timeout") } };
  }
}

/** The "reconnecting" banner; body[data-online] says whether all sockets are up. */
export function watchConnection(sockets) {
  const banner = $("#conn");
  let everUp = false, slow = false, down = false;
  const update = () => {
    const up = sockets.every((s) => s.connected);
    document.body.dataset.online = up ? "1" : "0";
    if (up) everUp = true;
    if (!banner) return;
    if (!up && (everUp || slow)) {
      // Lost the connection (or the first one takes long): say so while we retry.
      banner.textContent = t("conn.reconnecting");
      banner.className = "conn down";
      banner.hidden = false;
      down = true;
    } else if (up && down) {
      down = false;
      banner.textContent = t("conn.back");
      banner.className = "conn up";
      setTimeout(() => { if (!down) banner.hidden = true; }, 1500);
    }
  };
  for (const s of sockets) { s.on("connect", update); s.on("disconnect", update); }
  // The browser knows first when the network is gone (a phone in a lift): drop the
  // connection now and let it reconnect and catch up, instead of waiting for the
  // heartbeat to time out while looking connected.
  window.addEventListener("offline", () => {
    for (const m of new Set(sockets.map((s) => s.io))) m.engine?.close();
  });
  setTimeout(() => { slow = true; update(); }, 3000);
  return update;
}

// -- formatting -------------------------------------------------------------------------
export function fmtTime(ts) {
  if (!ts) return "";
  return new Date(ts).toLocaleTimeString(lang === "en" ? "en-GB" : "zh-CN", { hour: "2-digit", minute: "2-digit" });
}

export function fmtDateTime(ts) {
  if (!ts) return "";
  return new Date(ts).toLocaleString(lang === "en" ? "en-GB" : "zh-CN",
    { month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit" });
}

export function fmtEta(seconds) {
  if (seconds === null || seconds === undefined) return "";
  if (seconds <= 0) return t("eta.here");
  const min = Math.max(1, Math.round(seconds / 60));
  return t("eta.min", { n: min });
}

export function fmtDistance(m) {
  if (m === null || m === undefined) return "";
  return m >= 1000 ? t("dist.km", { n: (m / 1000).toFixed(1) }) : t("dist.m", { n: Math.round(m) });
}

export function fmtWait(ms) {
  const s = Math.max(0, Math.floor(ms / 1000));
  const m = Math.floor(s / 60);
  return m ? t("wait.ms", { m, s: String(s % 60).padStart(2, "0") }) : t("wait.s", { s });
}

export function stateLabel(state) { return t(`state.${state}`); }

// -- maps ----------------------------------------------------------------------------------
// Positions come from the server in the map's coordinate system (we ask for it);
// order addresses are stored in WGS-84 and shifted here for GCJ-02 tiles.
export function toMap(lat, lng) {
  return CONFIG.coord_sys === "gcj02" ? wgs84ToGcj02(lat, lng) : [lat, lng];
}

function wgs84ToGcj02(lat, lng) {
  if (lng < 72.004 || lng > 137.8347 || lat < 0.8293 || lat > 55.8271) return [lat, lng];
  const a = 6378245.0, ee = 0.00669342162296594323;
  const x = lng - 105.0, y = lat - 35.0;
  let dLat = -100.0 + 2.0 * x + 3.0 * y + 0.2 * y * y + 0.1 * x * y + 0.2 * Math.sqrt(Math.abs(x));
  dLat += (20.0 * Math.sin(6.0 * x * Math.PI) + 20.0 * Math.sin(2.0 * x * Math.PI)) * 2.0 / 3.0;
  dLat += (20.0 * Math.sin(y * Math.PI) + 40.0 * Math.sin(y / 3.0 * Math.PI)) * 2.0 / 3.0;
  dLat += (160.0 * Math.sin(y / 12.0 * Math.PI) + 320 * Math.sin(y * Math.PI / 30.0)) * 2.0 / 3.0;
  let dLng = 300.0 + x + 2.0 * y + 0.1 * x * x + 0.1 * x * y + 0.1 * Math.sqrt(Math.abs(x));
  dLng += (20.0 * Math.sin(6.0 * x * Math.PI) + 20.0 * Math.sin(2.0 * x * Math.PI)) * 2.0 / 3.0;
  dLng += (20.0 * Math.sin(x * Math.PI) + 40.0 * Math.sin(x / 3.0 * Math.PI)) * 2.0 / 3.0;
  dLng += (150.0 * Math.sin(x / 12.0 * Math.PI) + 300.0 * Math.sin(x / 30.0 * Math.PI)) * 2.0 / 3.0;
  const rad = lat / 180.0 * Math.PI;
  let magic = Math.sin(rad);
  magic = 1 - ee * magic * magic;
  const sq = Math.sqrt(magic);
  dLat = (dLat * 180.0) / ((a * (1 - ee)) / (magic * sq) * Math.PI);
  dLng = (dLng * 180.0) / (a / sq * Math.cos(rad) * Math.PI);
  return [lat + dLat, lng + dLng];
}

// Graph paper under everything: the map draws (and pans visibly) with no tiles at all.
const PlainGrid = () => {
  const Grid = L.GridLayer.extend({
    createTile() {
      const tile = document.createElement("canvas");
      const size = this.getTileSize();
      tile.width = size.x;
      tile.height = size.y;
      const g = tile.getContext("2d");
      for (let i = 0; i < 4; i++) {
        g.strokeStyle = i === 0 ? "rgba(70, 90, 110, 0.16)" : "rgba(70, 90, 110, 0.07)";
        g.beginPath();
        g.moveTo(i * 64 + 0.5, 0); g.lineTo(i * 64 + 0.5, size.y);
        g.moveTo(0, i * 64 + 0.5); g.lineTo(size.x, i * 64 + 0.5);
        g.stroke();
      }
      return tile;
    },
  });
  return new Grid({ pane: "tilePane", zIndex: 0 });
};

/** A Leaflet map with the configured tiles, or a plain background without them. */
export function makeMap(el, center = [31.2304, 121.4737], zoom = 14) {
  const map = L.map(el, { zoomControl: true, attributionControl: true });
  map.attributionControl.setPrefix(false);
  PlainGrid().addTo(map);
  el.dataset.tiles = "none";
  if (CONFIG.tile_url) {
    const tiles = L.tileLayer(CONFIG.tile_url, {
      maxZoom: 19, subdomains: "abc", zIndex: 1,
      attribution: CONFIG.tile_attribution || "",
    });
    let loaded = 0, failed = 0;
    tiles.on("tileload", () => { loaded++; el.dataset.tiles = "ok"; });
    tiles.on("tileerror", () => {
      // Unreachable tile server: fall back to the plain background, once.
      if (++failed >= 4 && loaded === 0 && map.hasLayer(tiles)) {
        map.removeLayer(tiles);
        el.dataset.tiles = "unreachable";
        toast(t("map.no_tiles"));
      }
    });
    tiles.addTo(map);
    el.dataset.tiles = "loading";
  }
  map.setView(center, zoom);
  return map;
}

/** A div marker: a round badge with a short label (no images needed). */
export function badgeIcon(cls, label, attrs = {}) {
  const el = h("div", { class: `badge ${cls}`, ...attrs }, h("span", { text: label }));
  return { icon: L.divIcon({ html: el, className: "badge-icon", iconSize: [30, 30], iconAnchor: [15, 15] }), el };
}

/** Moves a marker smoothly to each new fix instead of jumping. */
export class Mover {
  constructor(marker, el) {
    this.marker = marker;
    this.el = el;
    this.frame = 0;
  }

  moveTo(latlng, ms = 900) {
    cancelAnimationFrame(this.frame);
    const from = this.marker.getLatLng();
    const to = L.latLng(latlng);
    const start = performance.now();
    const step = (now) => {
      const f = Math.min(1, (now - start) / ms);
      const e = f < 0.5 ? 2 * f * f : 1 - ((-2 * f + 2) ** 2) / 2;
      const cur = L.latLng(from.lat + (to.lat - from.lat) * e, from.lng + (to.lng - from.lng) * e);
      this.marker.setLatLng(cur);
      this.mark(cur);
      if (f < 1) this.frame = requestAnimationFrame(step);
    };
    if (document.hidden || ms <= 0) { this.marker.setLatLng(to); this.mark(to); return; }
    this.frame = requestAnimationFrame(step);
  }

  mark(ll) {
    if (!this.el) return;
    this.el.dataset.lat = ll.lat.toFixed(6);
    this.el.dataset.lng = ll.lng.toFixed(6);
  }
}

/** Fails loudly when the npm files are missing (scripts/setup not run). */
export function checkVendor() {
  if (typeof io === "function" && typeof L === "object") return true;
  document.body.prepend(h("div", { class: "conn down", role: "alert", text: t("vendor.missing") }));
  return false;
}

export function setupTopbar(claims) {
  const who = $("#who");
  if (who) who.textContent = `${claims.name || claims.sub} · ${t(`role.${claims.role}`)}`;
  const out = $("#signout");
  if (out) out.addEventListener("click", signOut);
  const lt = $("#lang");
  if (lt) setupLangToggle(lt);
  onLangChange(() => { if (who) who.textContent = `${claims.name || claims.sub} · ${t(`role.${claims.role}`)}`; });
}

// -- technicians' ratings (the console's order card, the ops map's tooltips) -------------------------
/** A technician's rating aggregate, fetched when first shown and kept a minute. */
export class RatingCache {
  constructor(token, ttlMs = 60_000) {
    this.token = token;
    this.ttl = ttlMs;
    this.map = new Map();  // technician id -> {at, data (undefined: loading, null: unavailable), pending, onLoad}
  }

  get(techId, onLoad) {
    const c = this.map.get(techId);
    if (c && (c.pending || Date.now() - c.at < this.ttl)) {
      if (c.pending && onLoad) c.onLoad = onLoad;
      return c.data;
    }
    const entry = { at: Date.now(), data: c?.data, pending: true, onLoad };
    this.map.set(techId, entry);
    api(`/api/technicians/${encodeURIComponent(techId)}/ratings`, this.token).then((r) => {
      entry.pending = false;
      entry.at = Date.now();
      entry.data = r.ok && r.data?.aggregate ? r.data.aggregate : null;
      entry.onLoad?.();
    });
    return entry.data;
  }
}

export function ratingText(agg) {
  if (agg === undefined) return t("rating.loading");
  if (agg === null) return t("rating.unavailable");
  if (!agg.count) return t("rating.none");
  const recent = agg.last_30d?.count
    ? t("rating.recent", { mean: Number(agg.last_30d.mean).toFixed(2), n: agg.last_30d.count })
    : t("rating.no_recent");
  return t("rating.line", { bayes: Number(agg.bayes).toFixed(2), count: agg.count, recent });
}
