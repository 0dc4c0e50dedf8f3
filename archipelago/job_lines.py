"""The lines `status`, `watch` and `plan show` print about a job: its one-line summary
(with the replica count), one line per replica and per sync group from the recent steps,
and where each stage's step goes."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

from archipelago.views import GroupView, JobView, ReplicaView
from opdag.report import human_bytes


def eta(seconds: float) -> str:
    """Seconds as H:M:S, or "-" when unknown."""
    if seconds <= 0 or math.isinf(seconds):
        return "-"
    return time.strftime("%H:%M:%S", time.gmtime(seconds))


def loss_text(loss: float | None) -> str:
    """A loss as a line shows it: "-" when none was reported yet, "nan" or "inf" when the
    one reported is not finite (a fault to see, not to hide), else 4 decimals."""
    if loss is None:
        return "-"
    return f"{loss:.4f}" if math.isfinite(loss) else str(loss)


def job_line(j: JobView) -> str:
    """A job in one line: state, steps, loss, pace, ETA, and its replicas when it has many."""
    loss = loss_text(j.loss)
    line = (
        f"{j.job_id}  {j.name:<20} {j.state:<10} {j.steps_done:>6}/{j.steps:<6} loss {loss:>7}  "
        f"{j.samples_per_s:6.1f} samples/s  ETA {eta(j.eta_s)}"
    )
    if j.val_loss is not None:
        line += f"  val {loss_text(j.val_loss)} @{j.val_step}"
    return line + (f"  {j.replicas} replicas" if j.replicas > 1 else "")


def replica_line(r: ReplicaView) -> str:
    """One replica: its latest step, pace, averaging cost and staleness."""
    who = " (speaker)" if r.speaker else ""
    return (
        f"replica {r.replica}{who}: step {r.last_step}, {r.samples_per_s:.1f} samples/s, "
        f"averaging {human_bytes(r.sync_bytes_per_step)} in {r.sync_seconds_per_step:.3f} s "
        f"per step, staleness {r.staleness}"
    )


def group_line(g: GroupView) -> str:
    """One stage's sync group: its members, averaging cost, rounds and the latest's shares."""
    members = ", ".join(str(r) for r in g.replicas)
    latest = f", the latest of {g.shares} shares" if g.rounds else ""
    return (
        f"stage {g.stage} sync group (replicas {members}): averaging "
        f"{human_bytes(g.sync_bytes_per_step)} in {g.sync_seconds_per_step:.3f} s per step, "
        f"{g.rounds} of the last {g.steps} steps averaged{latest}, staleness {g.staleness}"
    )


def replica_lines(j: JobView) -> list[str]:
    """A line per replica, then per sync group, of a job with more than one replica (a
    single pipeline averages nothing: its job line says it all)."""
    if j.replicas <= 1 and len(j.replica_metrics) <= 1:
        return []
    return [replica_line(r) for r in j.replica_metrics] + [group_line(g) for g in j.group_metrics]


def format_stage_times(rows: Sequence[tuple[int, float, float, float, float, int]]) -> str:
    """Where each stage's step goes, predicted and measured (seconds per step)."""
    out = [
        "per stage, seconds per step (wait: transfers and other stages; compression runs "
        "beside compute)",
        f"  {'stage':<6}{'compute':^20}{'wait':^20}  steps",
        f"  {'':<6}{'predicted':>10}{'measured':>10}{'predicted':>10}{'measured':>10}",
    ]
    for stage, pc, pw, mc, mw, n in rows:
        shown = (f"{mc:.3f}", f"{mw:.3f}") if n else ("-", "-")
        out.append(f"  {stage:<6}{pc:>10.3f}{shown[0]:>10}{pw:>10.3f}{shown[1]:>10}  {n}")
    return "\n".join(out)
