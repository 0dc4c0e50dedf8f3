"""The users'-own-model RPCs of a real coordinator, called raw over its TLS: each is the
operator token's alone (the join token is refused, a wrong token unauthenticated), and
every malformed upload - no header, chunks first, a length past the bound, bytes short of
or beyond what the header declares, a corrupt `.opdag` - is refused naming the problem,
with nothing stored.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from archipelago.model_source import prepare_model
from coordinator.planning.jobspec import parse_job_spec
from coordinator.store import open_store
from proto import coordinator_pb2, coordinator_pb2_grpc
from proto.rpc import operator_metadata, token_metadata
from tests.multiproc.cluster import OPERATOR_TOKEN, TOKEN, Cluster, coordinator_channel
from tests.user_models import write_model

pytestmark = pytest.mark.multiproc

SPEC = """
name: raw
model: {file: mymodel.py, context: 16}
data: {corpus: stdlib-text, batch_size: 4, micro_batches: 2, max_bytes: 200000}
steps: 3
"""


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path / "cluster")
    c.start_coordinator()
    yield c
    c.close()


def parts(
    spec: str, blob: bytes, declared: int | None = None
) -> list[coordinator_pb2.ModelJobPart]:
    header = coordinator_pb2.ModelJobHeader(
        spec_yaml=spec, model_bytes=len(blob) if declared is None else declared
    )
    chunks = [blob[i : i + (1 << 20)] for i in range(0, len(blob), 1 << 20)]
    return [
        coordinator_pb2.ModelJobPart(header=header),
        *(coordinator_pb2.ModelJobPart(chunk=c) for c in chunks),
    ]


def refusal(call: object, *args: object, metadata: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = call(*args, metadata=metadata, timeout=60)  # type: ignore[operator]
        if hasattr(result, "__iter__") and not isinstance(result, coordinator_pb2.JobInfo):
            list(result)
    return info.value


def test_only_the_operator_token_may_call_them(cluster: Cluster) -> None:
    stub = coordinator_pb2_grpc.CoordinatorStub(coordinator_channel(cluster))
    export = coordinator_pb2.ExportRequest(job_id="0123456789")
    describe = coordinator_pb2.DescribeDatasetRequest(name="nothing")
    calls = [
        (stub.SubmitModelJob, iter(parts(SPEC, b"x")), "SubmitModelJob"),
        (stub.ExportModel, export, "ExportModel"),
        (stub.DescribeDataset, describe, "DescribeDataset"),
    ]
    for call, request, rpc in calls:
        e = refusal(call, request, metadata=token_metadata(TOKEN))
        assert e.code() == grpc.StatusCode.PERMISSION_DENIED, e
        assert f"{rpc} needs the operator token" in str(e.details())
    for call, request, _ in calls[1:]:
        e = refusal(call, request, metadata=operator_metadata("not-the-operator-token" * 2))
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED
    # With the operator token: what is not there is named.
    operator = operator_metadata(OPERATOR_TOKEN)
    e = refusal(stub.ExportModel, export, metadata=operator)
    assert e.code() == grpc.StatusCode.NOT_FOUND and "no job '0123456789'" in str(e.details())
    e = refusal(stub.DescribeDataset, describe, metadata=operator)
    assert e.code() == grpc.StatusCode.NOT_FOUND and "no dataset 'nothing'" in str(e.details())


def test_malformed_uploads_are_refused_and_store_nothing(cluster: Cluster, tmp_path: Path) -> None:
    write_model(tmp_path)
    blob = prepare_model(parse_job_spec(SPEC), tmp_path).encode()
    stub = coordinator_pb2_grpc.CoordinatorStub(coordinator_channel(cluster))
    operator = operator_metadata(OPERATOR_TOKEN)
    whole = parts(SPEC, blob)
    corrupt = bytearray(blob)
    corrupt[len(blob) // 3] ^= 0x55
    cases = {
        "empty stream": ([], "empty stream"),
        "chunks first": (whole[1:], "must start with its header"),
        "a header twice": ([whole[0], *whole], "only chunks may follow the header"),
        "past the bound": (parts(SPEC, blob, declared=1 << 50), "declares"),
        "short": (parts(SPEC, blob, declared=len(blob) + 100), "ended after"),
        "beyond": (parts(SPEC, blob + b"extra", declared=len(blob)), "more than"),
        "corrupt": (parts(SPEC, bytes(corrupt)), "not a valid .opdag"),
        "a zoo spec": (
            parts(SPEC.replace("{file: mymodel.py, context: 16}", "{zoo: gpt}"), blob),
            "is a zoo model",
        ),
    }
    for name, (messages, says) in cases.items():
        e = refusal(stub.SubmitModelJob, iter(messages), metadata=operator)
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, e)
        assert says in str(e.details()), (name, e.details())
        with open_store(cluster.store) as store:
            assert store.list_jobs() == [], name
    # The same upload, whole, is taken.
    info = stub.SubmitModelJob(iter(whole), metadata=operator, timeout=60)
    with open_store(cluster.store) as store:
        assert [j["job_id"] for j in store.list_jobs()] == [info.job_id]
