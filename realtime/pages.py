"""The web pages the server serves: booking, customer tracking, the agent
console and the ops map (web/*.html, web/static/), the browser libraries from
npm (web/node_modules, installed by scripts/setup) and, in dev mode only, a
sign-in endpoint that mints tokens and a stand-in for the payment backend.

Routes:
- ``GET /book``, ``GET /track/{order_id}``, ``GET /console``, ``GET /ops``: the
  pages. The token travels in the URL fragment (``#token=...``), which browsers
  never send to a server, and lives in the tab's sessionStorage; never in a query.
- ``GET /static/...``: web/static/.
- ``GET /sw.js``: the service worker (web/sw.js) that shows Web Push
  notifications. At the root, so that its scope is the whole site (/track/...);
  revalidated on every load (``no-cache``), so a new version reaches browsers.
- ``GET /static/vendor/{file}``: the few dist files the pages load from
  socket.io-client and leaflet; 503 with a hint to run scripts/setup when
  web/node_modules is missing (the pages themselves still load).
- ``POST /api/dev/token {role, sub, name?, skills?}``: dev mode only
  (REALTIME_DEV=1), 404 otherwise. It takes no token (it is how a developer
  gets one), so it is answered before the API's bearer check.
- ``POST /api/dev/pay {hold_id, service, address}``: dev mode only, 404
  otherwise. The /book page's "pay": with the customer's own token, it plays
  the backend after a payment and confirms the customer's hold as an order
  (``SchedulingService.confirm``, as ``POST /api/holds/{id}/confirm`` does).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Annotated, Any, Final, Literal
from urllib.parse import urlsplit

from aiohttp import web
from pydantic import Field, StringConstraints

from kernel.actor import Actor
from kernel.errors import Forbidden
from realtime.api import SERVICES, AddressIn, Handler, ServiceIn, json_response, parse, principal
from realtime.auth import mint_token
from realtime.errors import WireError, ok, to_error
from realtime.namespaces.models import Id, Inbound
from realtime.settings import Settings

log = logging.getLogger(__name__)

WEB_DIR: Final = Path(__file__).resolve().parent.parent / "web"
STATIC_DIR: Final = WEB_DIR / "static"
# Read at request time, so a test can point it elsewhere.
NODE_MODULES = WEB_DIR / "node_modules"

# /static/vendor/<name> -> (npm package, file inside it). Only what the pages load.
VENDOR: Final = {
    "socket.io.min.js": ("socket.io-client", "dist/socket.io.min.js"),
    "leaflet.js": ("leaflet", "dist/leaflet.js"),
    "leaflet.css": ("leaflet", "dist/leaflet.css"),
    **{f"images/{name}": ("leaflet", f"dist/images/{name}") for name in (
        "layers.png", "layers-2x.png", "marker-icon.png", "marker-icon-2x.png", "marker-shadow.png")},
}
PAGES: Final = {"book": "book.html", "track": "track.html", "console": "console.html",
                "ops": "ops.html"}
SERVICE_WORKER: Final = WEB_DIR / "sw.js"
CONFIG_PLACEHOLDER: Final = "<!--RT-CONFIG-->"
DEV_TOKEN_PATH: Final = "/api/dev/token"
DEV_TOKEN_TTL_S: Final = 12 * 3600
DEV_PAY_PATH: Final = "/api/dev/pay"
# Who confirms a dev payment: the demo's backend (realtime/demo.py signs in as it).
DEV_BACKEND: Final = Actor("demo-backend", "service")

SETTINGS: web.AppKey[Settings] = web.AppKey("pages_settings", Settings)


class DevTokenIn(Inbound):
    role: Literal["customer", "technician", "agent", "admin", "service"]
    sub: Id
    name: Annotated[str, StringConstraints(min_length=1, max_length=64)] | None = None
    skills: Annotated[list[Id], Field(max_length=20)] | None = None


class DevPayIn(Inbound):
    hold_id: Id
    service: ServiceIn
    address: AddressIn


def tile_origin(tile_url: str | None) -> str | None:
    """The origin the tile images come from, for the pages' CSP (`{s}` is any subdomain)."""
    if not tile_url or tile_url.startswith("/"):
        return None
    parts = urlsplit(tile_url.replace("{s}", "tilesubdomain"))
    host = (parts.hostname or "").replace("tilesubdomain", "*")
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}" if host else None


def page_config(settings: Settings) -> dict[str, Any]:
    return {
        "dev": settings.dev,
        "tile_url": settings.tile_url,
        "tile_attribution": settings.tile_attribution,
        "coord_sys": settings.tile_coord_sys,
    }


def security_headers(settings: Settings, host: str | None) -> dict[str, str]:
    img = ["'self'", "data:", "blob:"]
    origin = tile_origin(settings.tile_url)
    if origin:
        img.append(origin)
    connect = ["'self'"]
    if host:
        connect += [f"ws://{host}", f"wss://{host}"]
    csp = "; ".join([
        "default-src 'self'",
        "script-src 'self'",
        # Leaflet positions its panes with inline styles.
        "style-src 'self' 'unsafe-inline'",
        "img-src " + " ".join(img),
        "connect-src " + " ".join(connect),
        # The service worker (/sw.js), ours only.
        "worker-src 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
        "form-action 'self'",
    ])
    return {
        "Content-Security-Policy": csp,
        "Referrer-Policy": "no-referrer",
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-store",
    }


def render_page(name: str, settings: Settings) -> str:
    html = (WEB_DIR / PAGES[name]).read_text(encoding="utf-8")
    config = json.dumps(page_config(settings), ensure_ascii=False, separators=(",", ":"))
    config = config.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return html.replace(CONFIG_PLACEHOLDER,
                        f'<script id="rt-config" type="application/json">{config}</script>', 1)


def page_handler(name: str) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        settings = request.app[SETTINGS]
        return web.Response(text=render_page(name, settings), content_type="text/html",
                            charset="utf-8", headers=security_headers(settings, request.host))

    return handler


async def service_worker(request: web.Request) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    headers = security_headers(settings, request.host)
    # A browser checks for a new worker on navigation; no-cache makes that check
    # reach us (the worker is small), rather than a cached copy for a day.
    headers["Cache-Control"] = "no-cache"
    headers["Service-Worker-Allowed"] = "/"
    return web.Response(text=SERVICE_WORKER.read_text(encoding="utf-8"), content_type="text/javascript",
                        charset="utf-8", headers=headers)


async def vendor(request: web.Request) -> web.StreamResponse:
    entry = VENDOR.get(request.match_info["name"])
    if entry is None:
        raise web.HTTPNotFound(text="not a vendored file")
    package, rel = entry
    path = NODE_MODULES / package / rel
    if not path.is_file():
        return web.Response(
            status=503, content_type="text/plain", charset="utf-8",
            text=(f"{package} is not installed (web/node_modules is missing). "
                  "Run ./scripts/setup (it runs `npm ci` in web/), then reload.\n"))
    return web.FileResponse(path, headers={"Cache-Control": "public, max-age=3600"})


async def dev_token(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    try:
        if not settings.dev:
            raise WireError("not_found", "the dev sign-in exists only in dev mode (REALTIME_DEV=1)")
        if request.method != "POST":
            raise WireError("invalid", "use POST")
        body = await parse(request, DevTokenIn)
        token = mint_token(settings, sub=body.sub, role=body.role, name=body.name,
                           skills=body.skills, ttl_s=DEV_TOKEN_TTL_S)
    except Exception as exc:
        err = to_error(exc)
        return json_response(err.body(), err.http_status)
    log.info("dev sign-in: minted a %s token for %s", body.role, body.sub)
    return json_response(ok({"token": token, "role": body.role, "sub": body.sub,
                             "name": body.name, "expires_in_s": DEV_TOKEN_TTL_S}))


@web.middleware
async def dev_token_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answers POST /api/dev/token ahead of the API middleware, which would ask
    for a bearer token this endpoint exists to hand out."""
    if request.path == DEV_TOKEN_PATH:
        return await dev_token(request)
    return await handler(request)


def paid_order_id(hold_id: str) -> str:
    """The order a dev payment makes of a hold: one per hold, so paying twice
    (a double tap, a retry after a lost reply) answers the same order."""
    return "o-" + hashlib.sha256(hold_id.encode()).hexdigest()[:24]


async def dev_pay(request: web.Request) -> web.Response:
    """Dev mode only: what the business backend does once a customer has paid,
    for the /book page without a payment provider. The caller is the hold's
    customer (their own token, checked here); the confirmation is the
    backend's (DEV_BACKEND). Behind the API middleware: bearer auth, rate
    limits and JSON errors as for any /api/ route."""
    if not request.app[SETTINGS].dev:
        raise WireError("not_found", "the dev payment exists only in dev mode (REALTIME_DEV=1)")
    p = principal(request)
    if p.role != "customer":
        raise Forbidden("a payment is made by the hold's customer")
    body = await parse(request, DevPayIn)
    scheduling = request.app[SERVICES].scheduling
    # not_found for no such hold, forbidden for another customer's.
    hold = await scheduling.get_hold(Actor(p.id, p.role), body.hold_id)
    order, created = await scheduling.confirm(DEV_BACKEND, hold.hold_id, {
        "order_id": paid_order_id(hold.hold_id), "customer_id": hold.customer_id,
        "service": body.service.model_dump(), "address": body.address.model_dump()})
    log.info("dev payment: hold %s of %s confirmed as order %s", hold.hold_id, p.id,
             order["order_id"])
    return json_response(ok({"order": order, "created": created}), 201 if created else 200)


def setup_pages(app: web.Application, settings: Settings) -> None:
    app[SETTINGS] = settings
    app.middlewares.insert(0, dev_token_middleware)
    app.router.add_post(DEV_PAY_PATH, dev_pay)
    app.router.add_get("/book", page_handler("book"))
    app.router.add_get("/track/{order_id:[A-Za-z0-9_.:@-]{1,64}}", page_handler("track"))
    app.router.add_get("/console", page_handler("console"))
    app.router.add_get("/ops", page_handler("ops"))
    app.router.add_get("/sw.js", service_worker)
    app.router.add_get("/static/vendor/{name:.+}", vendor)
    app.router.add_static("/static/", STATIC_DIR, append_version=False)
