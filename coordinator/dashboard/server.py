"""The dashboard's web server: an aiohttp app on the coordinator's own event loop.

Everything but the login page (and its stylesheet and icon) needs a session, opened by
logging in with the operator token or the read-only dashboard token (`sessions`; the
volunteers' join token opens nothing here). Pages are
static HTML and JavaScript; the data comes as JSON (`/api/...`, GET only, read-only) and
live as server-sent events (`/api/events`): a fresh snapshot when it changed, checked
every second. `/metrics` serves the Prometheus exposition to a session or to
`Authorization: Bearer <token>`. Tokens and session ids never appear in a page, a URL or a
log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from coordinator.dashboard.sessions import SESSION_S, LoginLimiter, SessionStore, tokens_match
from coordinator.dashboard.snapshots import Snapshots
from coordinator.job_record import JobError
from coordinator.jobs import JobManager
from coordinator.link_survey import LinkProber
from coordinator.registry import Registry

log = logging.getLogger("archipelago.coordinator")

STATIC = Path(__file__).parent / "static"
COOKIE = "archipelago_session"
DEFAULT_ADDRESS = "127.0.0.1:7080"
# Served without a session: the login page needs them before anyone has logged in.
PUBLIC = frozenset({"/login", "/static/login.css", "/static/favicon.svg"})
PAGES = {"/workers": "workers.html", "/links": "links.html", "/jobs": "jobs.html"}
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
}
VIEWS = ("workers", "links", "jobs", "job")

Exposition = Callable[[], Awaitable[tuple[bytes, str]]]


@dataclass(frozen=True)
class DashboardConfig:
    """How the dashboard is served (built from the coordinator's command line)."""

    token: str  # the operator token: it opens a session too
    read_only_token: str = ""  # --dashboard-token: opens a session and nothing else
    host: str = "127.0.0.1"
    port: int = 7080
    session_s: float = SESSION_S
    # How often a live page's snapshot is built and compared with the last one sent.
    poll_s: float = 1.0
    # A comment line this often keeps proxies from closing an idle event stream.
    keepalive_s: float = 15.0
    # Mark the cookie Secure (the dashboard is reached over HTTPS through a proxy).
    secure_cookie: bool = False

    @property
    def tokens(self) -> tuple[str, ...]:
        return tuple(t for t in (self.token, self.read_only_token) if t)


def parse_address(text: str) -> tuple[str, int]:
    """HOST:PORT (an IPv6 host in brackets) as (host, port); ValueError names the text."""
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--dashboard {text!r}: expected HOST:PORT (or off)")
    return host, int(port)


class Dashboard:
    """The dashboard app, its sessions, and the site serving it once started."""

    def __init__(
        self,
        *,
        manager: JobManager,
        registry: Registry,
        links: LinkProber | None,
        config: DashboardConfig,
        metrics: Exposition | None = None,
    ) -> None:
        self.config = config
        self.snapshots = Snapshots(manager=manager, registry=registry, links=links)
        self.manager = manager
        self.metrics = metrics
        self.sessions = SessionStore(lifetime_s=config.session_s)
        self.limiter = LoginLimiter()
        self.app = self._build_app()
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._closing = asyncio.Event()

    @property
    def url(self) -> str:
        host = self.config.host
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{self.port}/"

    async def start(self) -> int:
        """Listen on the configured address; returns the port bound (OSError if it cannot)."""
        runner = web.AppRunner(
            self.app, access_log=None, handle_signals=False, shutdown_timeout=1.0
        )
        await runner.setup()
        site = web.TCPSite(runner, self.config.host, self.config.port)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        return self.port

    async def stop(self) -> None:
        """End the event streams and stop serving."""
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.snapshots.close()

    # -- the app ---------------------------------------------------------------------------

    def _build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth], client_max_size=64 << 10)
        app.on_response_prepare.append(_secure_headers)
        r = app.router
        r.add_get("/login", self._login_page)
        r.add_post("/login", self._login)
        r.add_post("/logout", self._logout)
        r.add_get("/", self._home)
        for path, page in PAGES.items():
            r.add_get(path, self._page(page))
        r.add_get("/jobs/{job_id}", self._job_page)
        r.add_get("/api/workers", self._json(self.snapshots.workers))
        r.add_get("/api/links", self._json(self._links_now))
        r.add_get("/api/jobs", self._json(self._jobs_now))
        r.add_get("/api/jobs/{job_id}", self._job_json)
        r.add_get("/api/jobs/{job_id}/dag", self._dag_json)
        r.add_get("/api/events", self._events)
        r.add_get("/metrics", self._metrics)
        r.add_static("/static", STATIC, show_index=False, follow_symlinks=False)
        return app

    @web.middleware
    async def _auth(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Refuse everything but the public paths to a request without a live session;
        `/metrics` also takes a bearer token."""
        path = request.path
        if path in PUBLIC or self.sessions.valid(request.cookies.get(COOKIE)):
            return await handler(request)
        if path == "/metrics" and self._bearer_ok(request):
            return await handler(request)
        if request.method == "GET" and not path.startswith(("/api/", "/static/", "/metrics")):
            return _redirect("/login")
        raise web.HTTPUnauthorized(text="log in first\n")

    def _bearer_ok(self, request: web.Request) -> bool:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            return False
        client = request.remote or "?"
        if self.limiter.blocked(client):
            return False
        if tokens_match(given.strip(), self.config.tokens):
            return True
        self.limiter.failed(client)
        log.warning("dashboard: a /metrics request from %s had a wrong token", client)
        return False

    # -- logging in and out ----------------------------------------------------------------

    async def _login_page(self, request: web.Request) -> web.Response:
        if self.sessions.valid(request.cookies.get(COOKIE)):
            return _redirect("/workers")
        return _login_response("", 200)

    async def _login(self, request: web.Request) -> web.Response:
        client = request.remote or "?"
        wait_s = self.limiter.blocked(client)
        if wait_s > 0:
            return _login_response(
                f"Too many failed logins from this address: try again in {wait_s:.0f} s.", 429
            )
        form = await request.post()
        given = form.get("token", "")
        if isinstance(given, str) and tokens_match(given, self.config.tokens):
            self.limiter.succeeded(client)
            session = self.sessions.open()
            response = _redirect("/workers")
            response.set_cookie(
                COOKIE,
                session,
                max_age=int(self.config.session_s),
                path="/",
                httponly=True,
                samesite="Strict",
                secure=self.config.secure_cookie,
            )
            log.info("dashboard: a session opened from %s", client)
            return response
        self.limiter.failed(client)
        log.warning("dashboard: a failed login from %s", client)
        # The form again, as a page (200, as form logins answer): the browser shows it
        # without logging a failed resource.
        return _login_response("That token is not accepted.", 200)

    async def _logout(self, request: web.Request) -> web.Response:
        self.sessions.close(request.cookies.get(COOKIE))
        response = _redirect("/login")
        response.del_cookie(COOKIE, path="/")
        return response

    # -- pages -----------------------------------------------------------------------------

    async def _home(self, request: web.Request) -> web.Response:
        return _redirect("/workers")

    def _page(self, name: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def page(request: web.Request) -> web.StreamResponse:
            return _html_file(name)

        return page

    async def _job_page(self, request: web.Request) -> web.StreamResponse:
        if request.match_info["job_id"] not in self.manager.jobs:
            raise web.HTTPNotFound(text="no such job\n")
        return _html_file("job.html")

    # -- JSON ------------------------------------------------------------------------------

    async def _links_now(self) -> dict[str, Any]:
        return self.snapshots.link_matrix()

    async def _jobs_now(self) -> dict[str, Any]:
        return self.snapshots.jobs()

    def _json(
        self, build: Callable[[], Awaitable[dict[str, Any]]]
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def answer(request: web.Request) -> web.StreamResponse:
            return _json_response({"now": time.time(), "data": await build()})

        return answer

    async def _job_json(self, request: web.Request) -> web.StreamResponse:
        try:
            data = await self.snapshots.job(request.match_info["job_id"])
        except JobError as e:
            raise web.HTTPNotFound(text=f"{e}\n") from None
        return _json_response({"now": time.time(), "data": data})

    async def _dag_json(self, request: web.Request) -> web.StreamResponse:
        try:
            data = await self.snapshots.dag(request.match_info["job_id"])
        except JobError as e:
            raise web.HTTPNotFound(text=f"{e}\n") from None
        return _json_response({"now": time.time(), "data": data})

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        if self.metrics is None:
            raise web.HTTPNotFound(text="this coordinator serves no metrics\n")
        body, content_type = await self.metrics()
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type
        return response

    # -- live pages ------------------------------------------------------------------------

    async def snapshot(self, view: str, job_id: str = "") -> dict[str, Any]:
        """What the live feed of `view` sends now (`job_id`: the job of the "job" view)."""
        if view == "workers":
            return await self.snapshots.workers()
        if view == "links":
            return self.snapshots.link_matrix()
        if view == "jobs":
            return self.snapshots.jobs()
        try:
            return await self.snapshots.job(job_id)
        except JobError as e:
            return {"gone": str(e)}

    async def _events(self, request: web.Request) -> web.StreamResponse:
        """A page's live feed: a snapshot whenever it differs from the last one sent, a
        keep-alive comment when nothing changed for a while; it ends with the session."""
        view, job_id = request.query.get("view", ""), request.query.get("job", "")
        if view not in VIEWS:
            raise web.HTTPBadRequest(text=f"view must be one of {', '.join(VIEWS)}\n")
        session = request.cookies.get(COOKIE)
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-store",
                "X-Accel-Buffering": "no",  # nginx: pass each event on at once
            }
        )
        await response.prepare(request)
        last_body, last_write = "", time.monotonic()
        try:
            while not self._closing.is_set():
                if not self.sessions.valid(session):
                    await response.write(b"event: logout\ndata: {}\n\n")
                    break
                body = json.dumps(await self.snapshot(view, job_id), separators=(",", ":"))
                if body != last_body:
                    message = f'{{"now":{time.time():.3f},"data":{body}}}'
                    await response.write(f"event: snapshot\ndata: {message}\n\n".encode())
                    last_body, last_write = body, time.monotonic()
                elif time.monotonic() - last_write > self.config.keepalive_s:
                    await response.write(b": keep-alive\n\n")
                    last_write = time.monotonic()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), self.config.poll_s)
        except (ConnectionResetError, asyncio.CancelledError):
            return response  # the page went away, or the server stops
        return response


async def _secure_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer, errors included: no framing, no sniffing, no referrer, only our own
    scripts and styles, nothing cached."""
    response.headers.update(SECURITY_HEADERS)
    if not request.path.startswith("/static/"):
        response.headers.setdefault("Cache-Control", "no-store")


def _redirect(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


def _html_file(name: str) -> web.StreamResponse:
    return web.FileResponse(STATIC / name, headers={"Content-Type": "text/html; charset=utf-8"})


def _json_response(data: dict[str, Any]) -> web.Response:
    return web.Response(
        text=json.dumps(data, separators=(",", ":")), content_type="application/json"
    )


def _login_response(error: str, status: int) -> web.Response:
    """The login page, with `error` shown above the form (escaped; never the token)."""
    page = (STATIC / "login.html").read_text()
    shown = f'<p class="error" role="alert">{html.escape(error)}</p>' if error else ""
    return web.Response(
        text=page.replace("<!--error-->", shown), status=status, content_type="text/html"
    )


async def open_dashboard(
    *,
    manager: JobManager,
    registry: Registry,
    links: LinkProber | None,
    config: DashboardConfig,
    required: bool,
    metrics: Exposition | None = None,
) -> Dashboard | None:
    """Start the dashboard. When its address cannot be bound, a `required` one (asked for
    on the command line) is an OSError naming it; the default one is a warning, and the
    coordinator runs without a dashboard (another coordinator on this host has it)."""
    dashboard = Dashboard(
        manager=manager, registry=registry, links=links, config=config, metrics=metrics
    )
    address = f"{config.host}:{config.port}"
    try:
        await dashboard.start()
    except OSError as e:
        if required:
            raise OSError(f"dashboard: cannot listen on {address}: {e.strerror or e}") from None
        log.warning(
            "dashboard: cannot listen on %s (%s); running without a dashboard "
            "(--dashboard HOST:PORT picks another address)",
            address,
            e.strerror or e,
        )
        return None
    return dashboard
