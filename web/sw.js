// The service worker: shows Web Push notifications (docs/notifications.md) and
// opens their page when tapped. Served at /sw.js (realtime/pages.py) so that its
// scope is the whole site, /track/... included. It caches nothing: every page
// still comes from the network, as without a worker.
//
// A push's payload is the notification as the inbox has it (outbox/relay.py
// notification_out): {id, kind, title, body, lang, link, collapse_key, priority, ...}.

const FALLBACK_TITLE = { "zh-CN": "订单通知", en: "Order update" };

// A new version takes over at once: it holds no state an older page relies on.
self.addEventListener("install", () => self.skipWaiting());
self.addEventListener("activate", (event) => event.waitUntil(self.clients.claim()));

/** The link as an absolute URL of this site; anything else opens the site's root. */
function sameOrigin(link) {
  try {
    const url = new URL(typeof link === "string" && link ? link : "/", self.location.origin);
    if (url.origin === self.location.origin) return url.href;
  } catch { /* not a URL: fall through */ }
  return new URL("/", self.location.origin).href;
}

self.addEventListener("push", (event) => {
  let n = {};
  if (event.data) {
    try { n = event.data.json() || {}; } catch { n = { body: event.data.text() }; }
  }
  const lang = n.lang === "en" ? "en" : "zh-CN";
  const options = {
    body: typeof n.body === "string" ? n.body : "",
    lang,
    data: { link: sameOrigin(n.link), id: n.id || null },
    requireInteraction: n.priority === "high",
  };
  // One notification per order or conversation: a newer one replaces the older,
  // and still rings (renotify needs a tag).
  if (typeof n.collapse_key === "string" && n.collapse_key) {
    options.tag = n.collapse_key;
    options.renotify = true;
  }
  const title = typeof n.title === "string" && n.title ? n.title : FALLBACK_TITLE[lang];
  event.waitUntil(self.registration.showNotification(title, options));
});

self.addEventListener("notificationclick", (event) => {
  event.notification.close();
  const link = sameOrigin(event.notification.data?.link);
  event.waitUntil((async () => {
    const target = new URL(link);
    const windows = await self.clients.matchAll({ type: "window", includeUncontrolled: true });
    // A tab already on that page (the fragment aside, e.g. #chat): bring it forward.
    const same = windows.find((c) => c.url === link)
      || windows.find((c) => { const u = new URL(c.url); return u.origin === target.origin && u.pathname === target.pathname; });
    if (same) {
      await same.focus();
      return;
    }
    await self.clients.openWindow(link);
  })());
});
