"""The serialisation of what the coordinator keeps as history: a job's (or the cluster's)
events and a job's stored step records, as the ListEvents and JobRecords answers carry them.

Beside `coordinator.serde` (the rest of the coordinator's messages), the only other
coordinator module that touches generated classes. Stored values were written by this
coordinator, but are still checked as they are encoded: a field that does not fit its
message field is sent as 0, never raised on.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from proto import coordinator_pb2

EventsRequest = coordinator_pb2.EventsRequest
EventList = coordinator_pb2.EventList
RecordsRequest = coordinator_pb2.RecordsRequest
RecordPage = coordinator_pb2.RecordPage


@dataclass(frozen=True)
class EventsQuery:
    """Whose events a user asks for (job_id "": the cluster's), after which, how many."""

    job_id: str
    after_seq: int
    limit: int


def events_query_from_pb(r: EventsRequest, *, max_limit: int) -> EventsQuery:
    limit = min(r.limit, max_limit) if r.limit else max_limit
    return EventsQuery(r.job_id, min(r.after_seq, 2**62), limit)


def _event_uint(value: object, limit: int = 2**32) -> int:
    """A stored count as a message's unsigned field (0 when it has none or it does not fit)."""
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < limit:
        return int(value)
    return 0


def _real(value: object) -> float:
    """A stored figure as a message's double (0 when it has none)."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def event_list_pb(events: Sequence[Mapping[str, Any]]) -> EventList:
    out = EventList()
    for e in events:
        pb = out.events.add(
            seq=_event_uint(e.get("seq")),
            at=_real(e.get("at")),
            kind=str(e.get("kind", "")),
            text=str(e.get("text", "")),
            epoch=_event_uint(e.get("epoch")),
            step=_event_uint(e.get("step")),
            worker_id=str(e.get("worker_id", "")),
            worker_name=str(e.get("worker_name", "")),
            reason=str(e.get("reason", "")),
        )
        loss = e.get("loss")
        if isinstance(loss, int | float) and not isinstance(loss, bool):
            pb.loss = float(loss)
    return out


def records_query_from_pb(r: RecordsRequest) -> tuple[str, int]:
    """The job and first step a JobRecords call asks for."""
    return r.job_id, r.since_step


def record_pages(records: Sequence[Mapping[str, Any]], per_page: int) -> Iterator[RecordPage]:
    """Stored step records as pages of `per_page` messages."""
    for start in range(0, len(records), per_page):
        page = RecordPage()
        for r in records[start : start + per_page]:
            pb = page.records.add(
                step=_event_uint(r.get("step")),
                stage=_event_uint(r.get("stage")),
                replica=_event_uint(r.get("replica", 0)),
                epoch=_event_uint(r.get("epoch")),
                step_seconds=_real(r.get("step_seconds")),
                compute_seconds=_real(r.get("compute_seconds")),
                samples=_real(r.get("samples")),
                bytes=_event_uint(r.get("bytes"), 2**64),
                sync_bytes=_event_uint(r.get("sync_bytes"), 2**64),
                sync_seconds=_real(r.get("sync_seconds")),
                staleness=_event_uint(r.get("staleness")),
                shares=_event_uint(r.get("shares")),
                at=_real(r.get("at")),
                speaker=bool(r.get("speaker", False)),
            )
            for name in ("loss", "replica_loss"):
                value = r.get(name)
                if isinstance(value, int | float) and not isinstance(value, bool):
                    setattr(pb, name, float(value))
        yield page
