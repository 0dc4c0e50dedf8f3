"""The user's side of the coordinator API (submit, status, watch, cancel), as plain data.

Each method builds its request and reads the answer through `archipelago.serde`; the views
it returns are `archipelago.views`' plain dataclasses (importable from here too). Every
call here is an operator's: it carries the operator token (a client made with only the
join token is refused by every one of them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, TypeVar

import grpc

from archipelago import dataset_serde, serde
from archipelago.views import EventView, JobView, LinkView, PlanView, RecordView, WorkerView
from proto.cluster_tls import ClientTls
from proto.errors import WireError
from proto.rpc import open_blocking_channel, operator_metadata, token_metadata

if TYPE_CHECKING:  # users' own models need torch; the other commands start without it
    from archipelago.model_serde import ExportedModel
    from opdag.data.manifest import Manifest

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

    # -- users' own models (`archipelago.model_serde`, imported when used: it needs torch) --

    def submit_model(
        self, spec_yaml: str, blob: bytes, names: Sequence[tuple[str, str]]
    ) -> JobView:
        """Submit a job with its model captured here: the `.opdag` bytes `blob` and the name
        each tensor is exported under."""
        from archipelago import model_serde

        parts = model_serde.model_job_parts(spec_yaml, blob, names)
        try:
            # An upload takes a while on a slow link: a deadline of many calls.
            info = self._stub.SubmitModelJob(
                parts, metadata=self._metadata, timeout=max(600.0, 20 * self.timeout_s)
            )
        except grpc.RpcError as e:
            raise self._error(e) from None
        return serde.job_view(info)

    def dataset_manifest(self, name: str) -> Manifest:
        """What the stored dataset `name` holds (to shape a model's inputs as its)."""
        from archipelago import model_serde
        from opdag.errors import OpDagError

        reply = self._call(self._stub.DescribeDataset, model_serde.describe_dataset_request(name))
        try:
            return model_serde.manifest_from_pb(reply)
        except (OpDagError, WireError) as e:
            raise ClientError(f"the coordinator's manifest of {name!r} is malformed: {e}") from None

    def export(self, job_id: str, *, max_bytes: int) -> ExportedModel:
        """The job's newest complete checkpoint, under the model's own tensor names."""
        from archipelago import model_serde

        try:
            stream = self._stub.ExportModel(
                model_serde.export_request(job_id),
                metadata=self._metadata,
                timeout=max(600.0, 20 * self.timeout_s),
            )
            return model_serde.read_export(stream, max_bytes=max_bytes)
        except grpc.RpcError as e:
            raise self._error(e) from None
        except WireError as e:
            raise ClientError(f"the coordinator's export is malformed: {e}") from None

    # -- users' own data (`archipelago data put`; messages in `archipelago.dataset_serde`) --

    def missing_dataset_chunks(self, dataset_bytes: int, shas: list[str]) -> list[str]:
        """Of a dataset's chunks, those the coordinator's store lacks."""
        request = dataset_serde.chunks_query(dataset_bytes, shas)
        return dataset_serde.missing_shas(self._call(self._stub.MissingDatasetChunks, request))

    def put_dataset_chunk(self, sha: str, data: bytes, dataset_bytes: int) -> None:
        self._call(self._stub.PutDatasetChunk, dataset_serde.chunk(sha, data, dataset_bytes))

    def put_dataset(self, manifest_json: bytes) -> tuple[str, str]:
        """Store the manifest (every chunk it names stored already); its (name, sha256)."""
        request = dataset_serde.manifest(manifest_json)
        return dataset_serde.dataset_info(self._call(self._stub.PutDataset, request))

    def close(self) -> None:
        self._channel.close()
