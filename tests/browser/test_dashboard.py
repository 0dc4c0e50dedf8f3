"""The dashboard in a real headless Chromium (Debian's package, driven by Playwright)
against a live local cluster: a coordinator with its dashboard and three workers training
a small GPT in two stages.

One test walks what an operator does: a wrong token shows the login again; log in; see
the workers and the measured links; open the running job and watch its loss curve grow
and its DAG drawn in stage colours; kill -9 a worker of the plan and see it turn lost and
the re-plan appear in the job's timeline. The browser's console must stay free of errors
and warnings throughout. Screenshots go to the test's tmp_path and to /work/notes/shots/.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from archipelago.client import ClientError
from archipelago.localcluster import Cluster, Proc, wait_for

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-gpu",
    "--disable-component-update",
    "--disable-sync",
]
SHOTS = Path("/work/notes/shots")
SPEC = """
name: browser-gpt
model: {zoo: gpt, args: {layers: 2, d_model: 32, heads: 2, context: 16}}
data: {corpus: stdlib-text, batch_size: 8, micro_batches: 2, max_bytes: 2000000}
optimizer: {name: adamw, lr: 1.0e-3}
steps: 3000
parallel: {stages: 2}
checkpoint: {every: 5}
"""
TIMEOUT_MS = 30_000


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[Cluster, dict[str, Proc]]]:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium; `make test` does)")
    c = Cluster(tmp_path / "cluster", dashboard=True)
    try:
        c.start_coordinator()
        workers = {name: c.start_worker(name) for name in ("w0", "w1", "w2")}
        yield c, workers
    finally:
        stop_jobs(c)
        c.close()


def stop_jobs(c: Cluster) -> None:
    """Cancel the jobs still training (the test leaves its long one running): a worker
    stopped while it holds a stage waits to drain, and `close` would wait for it."""
    if c.coordinator is None or not c.coordinator.alive:
        return
    client = c.client()
    try:
        for job in client.jobs():
            if job.state not in ("completed", "failed", "cancelled"):
                client.cancel(job.job_id)
        wait_for(
            "the workers to drop their stages",
            lambda: all(w.state != "busy" for w in c.workers_safe()),
            10,
        )
    except (ClientError, TimeoutError):
        pass  # close() stops the processes either way
    finally:
        client.close()


def test_operator_watches_a_job_lose_a_worker_and_replan(
    cluster: tuple[Cluster, dict[str, Proc]], tmp_path: Path
) -> None:
    from playwright.sync_api import Page, sync_playwright

    c, workers = cluster
    url = c.dashboard_url.rstrip("/")
    console: list[str] = []
    shots: list[Path] = []

    def shot(page: Page, name: str) -> None:
        path = tmp_path / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        shots.append(path)

    def watch(page: Page) -> Page:
        page.on(
            "console",
            lambda m: (
                console.append(f"{m.type}: {m.text}") if m.type in ("error", "warning") else None
            ),
        )
        page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
        return page

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 900})
            context.set_default_timeout(TIMEOUT_MS)
            page = watch(context.new_page())

            # Nothing but the login page without a session; a wrong token (the volunteers'
            # join token is one here) shows it again.
            page.goto(f"{url}/workers")
            assert page.url.endswith("/login")
            page.fill("#token", c.token)
            page.click("button[type=submit]")
            page.wait_for_selector(".error")
            assert page.url.endswith("/login") and page.is_visible("#token")
            assert "not accepted" in page.inner_text(".error")
            shot(page, "login-wrong-token")

            page.fill("#token", c.operator_token)
            page.click("button[type=submit]")
            page.wait_for_url(f"{url}/workers")
            for name in workers:
                page.wait_for_selector(f'tr[data-worker="{name}"][data-state="idle"]')
            shot(page, "workers")

            # Links are measured between idle workers as they join.
            page.goto(f"{url}/links")
            page.wait_for_selector("table.heat td.cell small")
            shot(page, "links")

            job_id = c.submit(SPEC)
            page.goto(f"{url}/jobs")
            page.wait_for_selector(f'tr[data-job="{job_id}"][data-state="running"]')
            shot(page, "jobs")
            # A snapshot updates the row in place: the link a click is about to land
            # on stays the same element while the job's progress moves.
            link = page.query_selector(f'tr[data-job="{job_id}"] a')
            assert link is not None
            steps = page.inner_text(f'tr[data-job="{job_id}"] td:nth-child(5)')
            page.wait_for_function(
                "([sel, was]) => { const c = document.querySelector(sel);"
                " return c !== null && c.innerText !== was; }",
                arg=[f'tr[data-job="{job_id}"] td:nth-child(5)', steps],
            )
            assert link.evaluate("a => a.isConnected")
            page.click(f'tr[data-job="{job_id}"] a')
            page.wait_for_url(f"{url}/jobs/{job_id}")

            # The loss curve grows while we watch.
            page.wait_for_function(
                "() => Number(document.querySelector('#loss-chart').dataset.points) >= 3"
            )
            before = int(page.get_attribute("#loss-chart", "data-points") or 0)
            page.wait_for_function(
                f"() => Number(document.querySelector('#loss-chart').dataset.points) > {before}"
            )
            page.wait_for_selector("#loss-chart canvas")
            # The DAG, coloured by stage: two stages, two distinct fills.
            page.wait_for_selector("svg.dag rect[data-stage='1']")
            fills = page.eval_on_selector_all(
                "svg.dag rect:not([data-stage='none'])",
                "rs => [...new Set(rs.map(r => r.dataset.stage + '=' + r.getAttribute('fill')))]",
            )
            stage_fills = dict(f.split("=") for f in fills)
            assert set(stage_fills) == {"0", "1"} and len(set(stage_fills.values())) == 2
            assert page.locator("svg.dag path.cut").count() >= 1
            page.wait_for_selector("#links tbody tr")
            page.wait_for_selector('#events li[data-kind="planned"]')
            shot(page, "job")

            # Kill -9 a worker of the plan: the workers page shows it lost, the job's
            # timeline the re-plan.
            view = c.job(job_id)
            victim = view.stages[1].worker_name
            lost_page = watch(context.new_page())
            lost_page.goto(f"{url}/workers")
            lost_page.wait_for_selector(f'tr[data-worker="{victim}"][data-state="busy"]')
            c.kill(workers[victim])
            lost_page.wait_for_selector(f'tr[data-worker="{victim}"][data-state="lost"]')
            lost_page.wait_for_selector('#events li[data-kind="lost"]')
            shot(lost_page, "workers-lost")
            page.wait_for_selector('#events li[data-kind="replanning"]')
            page.wait_for_function(
                "() => document.querySelectorAll('#events li[data-kind=\"planned\"]').length >= 2"
            )
            wait_for(
                "the job to run again on its new plan",
                lambda: (j := c.job(job_id)).state == "running" and j.epoch >= 2,
                60,
            )
            page.wait_for_selector("svg.dag rect[data-stage='1']")
            shot(page, "job-replanned")
            timeline = page.inner_text("#events")
            assert victim in timeline
        finally:
            browser.close()

    SHOTS.mkdir(parents=True, exist_ok=True)
    for path in shots:
        shutil.copy(path, SHOTS / path.name)
    assert console == [], "the browser's console:\n" + "\n".join(console)
