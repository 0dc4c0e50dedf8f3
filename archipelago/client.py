"""The user's side of the coordinator API (submit, status, watch, cancel), as plain data.

Each method builds its request and reads the answer through `archipelago.serde`; the views
it returns are `archipelago.views`' plain dataclasses (importable from here too). Every
call here is an operator's: it carries the operator token (a client made with only the
join token is refused by every one of them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TypeVar

import grpc

from archipelago import serde
from archipelago.views import EventView, JobView, LinkView, PlanView, RecordView, WorkerView
from proto.cluster_tls import ClientTls
from proto.rpc import open_blocking_channel, operator_metadata, token_metadata

Reply = TypeVar("Reply")


class ClientError(Exception):
    """The coordinator could not be reached or refused the request."""


class CoordinatorClient:
    """Blocking calls to a coordinator, with errors turned into `ClientError`s."""

    def __init__(
        self,
        address: str,
        *,
        operator_token: str = "",
        token: str = "",
        tls: ClientTls | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        """`operator_token` authenticates the calls; without one they carry `token` (the
        join token), which the coordinator refuses for all of them."""
        self.address = address
        self.timeout_s = timeout_s
        self._channel = open_blocking_channel(address, tls)
        self._stub = serde.coordinator_stub(self._channel)
        self._metadata = (
            operator_metadata(operator_token) if operator_token else token_metadata(token)
        )

    def _call(
        self, rpc: Callable[..., Reply], request: object, *, timeout: float | None = None
    ) -> Reply:
        """One unary call of `rpc` (a method of the stub) with the token and a deadline."""
        try:
            return rpc(
                request,
                metadata=self._metadata,
                timeout=self.timeout_s if timeout is None else timeout,
            )
        except grpc.RpcError as e:
            raise self._error(e) from None

    def _error(self, e: grpc.RpcError) -> ClientError:
        code = e.code()
        if code == grpc.StatusCode.UNAVAILABLE:
            return ClientError(f"cannot reach the coordinator at {self.address}")
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return ClientError(
                f"the coordinator refused the token: {e.details()} (set --operator-token or "
                "ARCHIPELAGO_OPERATOR_TOKEN)"
            )
        return ClientError(str(e.details()))

    def submit(self, spec_yaml: str) -> JobView:
        request = serde.submit_request(spec_yaml)
        return serde.job_view(self._call(self._stub.SubmitJob, request, timeout=120))

    def job(self, job_id: str, *, with_metrics: bool = False) -> JobView:
        request = serde.job_request(job_id, with_metrics=with_metrics)
        return serde.job_view(self._call(self._stub.GetJob, request))

    def jobs(self) -> list[JobView]:
        return serde.job_views(self._call(self._stub.ListJobs, serde.list_jobs_request()))

    def cancel(self, job_id: str) -> JobView:
        request = serde.job_request(job_id)
        return serde.job_view(self._call(self._stub.CancelJob, request))

    def watch(self, job_id: str) -> Iterator[JobView]:
        try:
            for info in self._stub.WatchJob(serde.job_request(job_id), metadata=self._metadata):
                yield serde.job_view(info)
        except grpc.RpcError as e:
            raise self._error(e) from None

    def workers(self) -> list[WorkerView]:
        return serde.worker_views(self._call(self._stub.ListWorkers, serde.list_workers_request()))

    def links(self) -> list[LinkView]:
        return serde.link_views(self._call(self._stub.ListLinks, serde.list_links_request()))

    def plan(self, job_id: str) -> PlanView:
        request = serde.job_request(job_id)
        return serde.plan_view(self._call(self._stub.GetPlan, request))

    def events(self, job_id: str = "", *, after_seq: int = 0, limit: int = 0) -> list[EventView]:
        """A job's events (job_id "": the cluster's) numbered above `after_seq`, oldest first;
        at most `limit` (0: as many as the coordinator gives in one answer)."""
        request = serde.events_request(job_id, after_seq, limit)
        return serde.event_views(self._call(self._stub.ListEvents, request))

    def records(self, job_id: str, *, since_step: int = 0) -> list[RecordView]:
        """Every stored step record of the job from `since_step` on (one per step, stage
        and replica), ordered by step, stage, replica."""
        out: list[RecordView] = []
        try:
            # A long job's records take a while to stream: a deadline of several calls.
            stream = self._stub.JobRecords(
                serde.records_request(job_id, since_step),
                metadata=self._metadata,
                timeout=10 * self.timeout_s,
            )
            for page in stream:
                out.extend(serde.record_views(page))
        except grpc.RpcError as e:
            raise self._error(e) from None
        return out

    def close(self) -> None:
        self._channel.close()
