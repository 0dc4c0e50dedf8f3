"""`archipelago events [JOB]`: a job's timeline, or the cluster's, in the terminal.

Each event is one line: its local time, its kind and what happened. `--follow` keeps
asking for the events after the last one printed, once a second, until the job ends (or,
for the cluster's events, until Ctrl-C).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from archipelago.client import CoordinatorClient
from archipelago.views import EventView

FOLLOW_INTERVAL_S = 1.0


def event_line(e: EventView) -> str:
    """One event: "HH:MM:SS  kind        text"."""
    return f"{time.strftime('%H:%M:%S', time.localtime(e.at))}  {e.kind:<12} {e.text}"


def print_events(
    client: CoordinatorClient,
    job_id: str,
    *,
    follow: bool,
    out: Callable[[str], None] = print,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Print the events of `job_id` ("" for the cluster) and, with `follow`, those that
    come after them; returns the exit status (0)."""
    seen = 0
    while True:
        while True:  # every page the coordinator has
            page = client.events(job_id, after_seq=seen)
            for e in page:
                out(event_line(e))
            if not page:
                break
            seen = page[-1].seq
        if not follow or (job_id and client.job(job_id).terminal):
            return 0
        sleep(FOLLOW_INTERVAL_S)
