"""The dashboard's web server through aiohttp's test client: logging in and out, what is
refused without a session, the rate limit on failed logins, security headers, the live
feed, `/metrics`, and that no token or session id ever appears in an answer or a log."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from coordinator.dashboard.server import (
    COOKIE,
    PUBLIC,
    Dashboard,
    DashboardConfig,
    open_dashboard,
    parse_address,
)
from coordinator.dashboard.sessions import LoginLimiter, SessionStore, tokens_match
from tests.unit.test_dashboard_snapshots import TOKEN, SmallCluster, small_cluster

pytestmark = pytest.mark.unit

READ_ONLY = "read-only-dashboard-token"
METRICS_BODY = b"# HELP archipelago_workers Workers.\narchipelago_workers 4.0\n"


async def _metrics() -> tuple[bytes, str]:
    return METRICS_BODY, "text/plain; version=0.0.4; charset=utf-8"


def _dashboard(c: SmallCluster, **config: Any) -> Dashboard:
    return Dashboard(
        manager=c.manager,
        registry=c.registry,
        links=c.links,
        config=DashboardConfig(token=TOKEN, read_only_token=READ_ONLY, poll_s=0.05, **config),
        metrics=_metrics,
    )


Test = Callable[[TestClient, Dashboard, SmallCluster], Awaitable[None]]


def _with_client(test: Test, **config: Any) -> None:
    async def run() -> None:
        c = await small_cluster()
        dashboard = _dashboard(c, **config)
        async with TestClient(TestServer(dashboard.app)) as client:
            await test(client, dashboard, c)

    asyncio.run(run())


async def _login(client: TestClient, token: str = TOKEN) -> str:
    answer = await client.post("/login", data={"token": token}, allow_redirects=False)
    assert answer.status == 303, await answer.text()
    assert answer.headers["Location"] == "/workers"
    return answer.cookies[COOKIE].value


def _get_routes(dashboard: Dashboard, job_id: str) -> list[str]:
    """Every GET path the app serves (a job's paths for `job_id`), static files included."""
    paths = []
    for resource in dashboard.app.router.resources():
        info = resource.get_info()
        if "prefix" in info:  # the static files
            paths += ["/static/app.css", "/static/live.js", "/static/vendor/uPlot.iife.min.js"]
            continue
        path = info.get("path") or info["formatter"].replace("{job_id}", job_id)
        if any(r.method == "GET" for r in resource):
            paths.append(path)
    return paths


def test_every_route_but_the_login_page_refuses_without_a_session() -> None:
    async def test(client: TestClient, dashboard: Dashboard, c: SmallCluster) -> None:
        paths = _get_routes(dashboard, c.job.job_id)
        assert {"/workers", "/api/workers", "/api/events", "/metrics", "/static/app.css"} <= set(
            paths
        )
        for path in paths:
            if path in PUBLIC:
                continue
            answer = await client.get(path, allow_redirects=False)
            if path.startswith(("/api/", "/static/", "/metrics")):
                assert answer.status == 401, path
            else:
                assert answer.status == 303 and answer.headers["Location"] == "/login", path
        # A made-up cookie is no session.
        client.session.cookie_jar.update_cookies({COOKIE: "not-a-session"})
        assert (await client.get("/api/jobs")).status == 401
        assert (await client.get("/login")).status == 200
        assert (await client.get("/static/login.css")).status == 200

    _with_client(test)


def test_wrong_token_shows_the_login_page_again_with_an_error_and_no_cookie() -> None:
    async def test(client: TestClient, dashboard: Dashboard, c: SmallCluster) -> None:
        answer = await client.post("/login", data={"token": "wrong-token"}, allow_redirects=False)
        assert answer.status == 200
        body = await answer.text()
        assert 'name="token"' in body and "not accepted" in body and "wrong-token" not in body
        assert COOKIE not in answer.cookies
        assert (await client.get("/api/workers")).status == 401

    _with_client(test)


def test_join_or_read_only_token_opens_a_session_cookie_that_is_httponly_and_strict() -> None:
    async def test(client: TestClient, dashboard: Dashboard, c: SmallCluster) -> None:
        for token in (TOKEN, READ_ONLY):
            answer = await client.post("/login", data={"token": token}, allow_redirects=False)
            morsel = answer.cookies[COOKIE]
            assert morsel["httponly"] and morsel["samesite"] == "Strict" and morsel["path"] == "/"
            assert int(morsel["max-age"]) == 12 * 3600
            for path in ("/workers", "/links", "/jobs", f"/jobs/{c.job.job_id}"):
                page = await client.get(path)
                assert page.status == 200 and "text/html" in page.headers["Content-Type"], path
            data = await (await client.get("/api/workers")).json()
            assert len(data["data"]["workers"]) == 4
        assert len(dashboard.sessions) == 2
        assert (await client.get("/jobs/no-such-job")).status == 404
        assert (await client.get("/api/jobs/no-such-job")).status == 404

    _with_client(test)


def test_logout_ends_the_session_on_the_server() -> None:
    async def test(client: TestClient, dashboard: Dashboard, c: SmallCluster) -> None:
        session = await _login(client)
        assert (await client.get("/api/jobs")).status == 200
        answer = await client.post("/logout", allow_redirects=False)
        assert answer.status == 303 and answer.headers["Location"] == "/login"
        # Even a browser that kept the cookie is refused: the session is gone.
        client.session.cookie_jar.update_cookies({COOKIE: session})
        assert (await client.get("/api/jobs")).status == 401
        assert len(dashboard.sessions) == 0
        # Logging out is a POST: a GET cannot end a session (nor is there such a route).
        assert (await client.get("/logout", allow_redirects=False)).status in (303, 405)

    _with_client(test)


def test_failed_logins_are_rate_limited_per_client_address() -> None:
    async def test(client: TestClient, dashboard: Dashboard, c: SmallCluster) -> None:
        for _ in range(5):
            answer = await client.post("/login", data={"token": "guess"}, allow_redirects=False)
            assert answer.status == 200 and "not accepted" in await answer.text()
        # Blocked now, even with the right token.
        answer = await client.post("/login", data={"token": TOKEN}, allow_redirects=False)
        assert answer.status == 429 and "try again in" in await answer.text()
        assert COOKIE not in answer.cookies
        # Bearer tokens on /metrics count against the same limit.
        metrics = await client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        assert metrics.status == 401

    _with_client(test)


def test_security_headers_on_every_answer_errors_included() -> None:
    async def test(client: TestClient, dashboard: Dashboard, c: SmallCluster) -> None:
        answers = [await client.get("/login"), await client.get("/api/workers")]
        await _login(client)
        answers += [
            await client.get("/workers"),
            await client.get("/api/jobs"),
            await client.get("/static/live.js"),
            await client.get("/api/jobs/nope"),
        ]
        for answer in answers:
            csp = answer.headers["Content-Security-Policy"]
            assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
            assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
            assert answer.headers["X-Content-Type-Options"] == "nosniff"
            assert answer.headers["Referrer-Policy"] == "no-referrer"
        assert answers[3].headers["Cache-Control"] == "no-store"

    _with_client(test)


def test_json_routes_are_get_only() -> None:
    async def test(client: TestClient, dashboard: Dashboard, c: SmallCluster) -> None:
        await _login(client)
        for path in ("/api/workers", "/api/jobs", f"/api/jobs/{c.job.job_id}", "/api/links"):
            for method in ("POST", "PUT", "DELETE"):
                answer = await client.request(method, path)
                assert answer.status == 405, (method, path)

    _with_client(test)


def test_no_token_or_session_id_in_any_page_json_or_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)

    async def test(client: TestClient, dashboard: Dashboard, c: SmallCluster) -> None:
        await client.post("/login", data={"token": "a-wrong-guess"})
        session = await _login(client)
        bodies = []
        for path in _get_routes(dashboard, c.job.job_id):
            if path == "/api/events":
                continue
            answer = await client.get(path)
            assert answer.status == 200, path
            assert TOKEN not in answer.url.human_repr()
            bodies.append(await answer.text())
        bodies.append(await _first_event(client, "view=job&job=" + c.job.job_id))
        for secret in (TOKEN, READ_ONLY, session, "a-wrong-guess"):
            assert not any(secret in body for body in bodies)
            assert secret not in caplog.text
        assert "a failed login" in caplog.text

    _with_client(test)


async def _first_event(client: TestClient, query: str) -> str:
    answer = await client.get(f"/api/events?{query}")
    assert answer.status == 200 and answer.headers["Content-Type"] == "text/event-stream"
    message = await asyncio.wait_for(answer.content.readuntil(b"\n\n"), 10)
    answer.close()
    return message.decode()


def test_live_feed_sends_a_snapshot_and_another_only_when_it_changed() -> None:
    async def test(client: TestClient, dashboard: Dashboard, c: SmallCluster) -> None:
        await _login(client)
        answer = await client.get("/api/events?view=jobs")
        first = await asyncio.wait_for(answer.content.readuntil(b"\n\n"), 10)
        event, data = first.decode().strip().split("\n")
        assert event == "event: snapshot"
        message = json.loads(data.removeprefix("data: "))
        assert message["data"]["jobs"][0]["steps_done"] == 10 and message["now"] > 0
        # Nothing changed: nothing is sent for a few polls; then a change arrives.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(answer.content.readuntil(b"\n\n"), 0.3)
        c.record_steps(10, 12)
        second = await asyncio.wait_for(answer.content.readuntil(b"\n\n"), 10)
        assert (
            json.loads(second.decode().split("data: ", 1)[1])["data"]["jobs"][0]["steps_done"] == 12
        )
        answer.close()
        assert (await client.get("/api/events?view=nothing")).status == 400

    _with_client(test)


def test_live_feed_ends_when_the_session_does() -> None:
    async def test(client: TestClient, dashboard: Dashboard, c: SmallCluster) -> None:
        session = await _login(client)
        answer = await client.get("/api/events?view=workers")
        await asyncio.wait_for(answer.content.readuntil(b"\n\n"), 10)
        dashboard.sessions.close(session)
        rest = await asyncio.wait_for(answer.content.read(), 10)
        assert b"event: logout" in rest

    _with_client(test)


def test_metrics_take_a_session_or_a_bearer_token() -> None:
    async def test(client: TestClient, dashboard: Dashboard, c: SmallCluster) -> None:
        assert (await client.get("/metrics")).status == 401
        wrong = await client.get("/metrics", headers={"Authorization": "Bearer nope"})
        assert wrong.status == 401
        for token in (TOKEN, READ_ONLY):
            answer = await client.get("/metrics", headers={"Authorization": f"Bearer {token}"})
            assert answer.status == 200 and await answer.read() == METRICS_BODY
            assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        # A bearer token opens /metrics only.
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        assert (await client.get("/api/workers", headers=bearer)).status == 401
        await _login(client)
        assert (await client.get("/metrics")).status == 200

    _with_client(test)


def test_job_json_and_dag_json() -> None:
    async def test(client: TestClient, dashboard: Dashboard, c: SmallCluster) -> None:
        await _login(client)
        job = (await (await client.get(f"/api/jobs/{c.job.job_id}")).json())["data"]
        assert job["job"]["id"] == c.job.job_id and len(job["curves"]["loss"][0]) == 10
        dag = (await (await client.get(f"/api/jobs/{c.job.job_id}/dag")).json())["data"]
        assert dag["nodes"] and any(e["cut"] for e in dag["edges"])

    _with_client(test)


def test_default_address_taken_runs_without_a_dashboard_but_a_given_one_is_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def run() -> None:
        c = await small_cluster()
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            config = DashboardConfig(token=TOKEN, host="127.0.0.1", port=port)
            kwargs: dict[str, Any] = dict(
                manager=c.manager, registry=c.registry, links=c.links, config=config
            )
            assert await open_dashboard(**kwargs, required=False) is None
            assert f"cannot listen on 127.0.0.1:{port}" in caplog.text
            with pytest.raises(OSError, match=f"127.0.0.1:{port}"):
                await open_dashboard(**kwargs, required=True)
        free = DashboardConfig(token=TOKEN, host="127.0.0.1", port=0)
        dashboard = await open_dashboard(
            manager=c.manager, registry=c.registry, links=c.links, config=free, required=True
        )
        assert dashboard is not None and dashboard.port > 0
        assert dashboard.url == f"http://127.0.0.1:{dashboard.port}/"
        await dashboard.stop()

    asyncio.run(run())


def test_parse_address() -> None:
    assert parse_address("127.0.0.1:7080") == ("127.0.0.1", 7080)
    assert parse_address("[::1]:0") == ("::1", 0)
    for bad in ("7080", "host:", ":80", "h:99999", "h:x"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            parse_address(bad)


def test_sessions_expire_and_are_bounded() -> None:
    now = [1000.0]
    sessions = SessionStore(lifetime_s=60, capacity=3, clock=lambda: now[0])
    ids = [sessions.open() for _ in range(4)]
    assert len(set(ids)) == 4 and all(len(i) >= 40 for i in ids)
    assert not sessions.valid(ids[0]) and all(sessions.valid(i) for i in ids[1:])
    now[0] += 61
    assert not any(sessions.valid(i) for i in ids) and len(sessions) == 0
    assert not sessions.valid("") and not sessions.valid(None)


def test_login_limiter_forgets_failures_after_the_window_and_after_a_success() -> None:
    now = [0.0]
    limiter = LoginLimiter(allowed=2, window_s=10, clock=lambda: now[0])
    limiter.failed("a")
    assert limiter.blocked("a") == 0
    limiter.failed("a")
    assert limiter.blocked("a") == pytest.approx(10) and limiter.blocked("b") == 0
    now[0] = 10.5
    assert limiter.blocked("a") == 0
    limiter.failed("a")
    limiter.failed("a")
    limiter.succeeded("a")
    assert limiter.blocked("a") == 0


def test_tokens_match_only_a_whole_accepted_token() -> None:
    assert tokens_match("abc12345", ("abc12345", "other-token"))
    assert tokens_match("other-token", ("abc12345", "other-token"))
    assert not tokens_match("abc1234", ("abc12345",))
    assert not tokens_match("", ("abc12345",))
    assert not tokens_match("", ())
