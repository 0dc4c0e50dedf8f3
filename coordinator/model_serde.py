"""The coordinator's side of the users'-own-model messages (SubmitModelJob, ExportModel).

A serde module like `coordinator.serde`, kept apart: the upload's header is read into a
`ModelJobUpload` (its strings and counts bounded before use) with the stream's chunks still
to come, and an export is written as a header of tensor descriptions, then their bytes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence

import torch

from coordinator.model_upload import ModelJobUpload
from proto import coordinator_pb2
from proto.errors import StreamError
from proto.tensor_stream import MAX_TENSORS, header_of, iter_chunks

ModelJobPart = coordinator_pb2.ModelJobPart
ExportRequest = coordinator_pb2.ExportRequest
ExportPart = coordinator_pb2.ExportPart
DescribeDatasetRequest = coordinator_pb2.DescribeDatasetRequest

# Export names per upload at most (a tensor may have several: tied weights), and their length.
MAX_EXPORT_NAMES = 2 * MAX_TENSORS
MAX_NAME_CHARS = 300


async def open_model_job(
    parts: AsyncIterator[ModelJobPart], *, max_spec_bytes: int
) -> tuple[ModelJobUpload, AsyncIterator[bytes]]:
    """A SubmitModelJob stream's header, and its chunks still to come; StreamError for a
    stream that does not start with a header or whose header is out of bounds."""
    try:
        first = await anext(parts)
    except StopAsyncIteration:
        raise StreamError("empty stream") from None
    if first.WhichOneof("part") != "header":
        raise StreamError("the stream must start with its header")
    h = first.header
    if len(h.spec_yaml.encode()) > max_spec_bytes:
        raise StreamError(f"the job spec exceeds {max_spec_bytes} bytes")
    if len(h.export_names) > MAX_EXPORT_NAMES:
        raise StreamError(f"{len(h.export_names)} export names (at most {MAX_EXPORT_NAMES})")
    names = tuple((n.name, n.tensor) for n in h.export_names)
    if any(len(a) > MAX_NAME_CHARS or len(b) > MAX_NAME_CHARS for a, b in names):
        raise StreamError(f"an export name exceeds {MAX_NAME_CHARS} characters")
    upload = ModelJobUpload(spec_yaml=h.spec_yaml, model_bytes=h.model_bytes, export_names=names)
    return upload, _chunks(parts)


async def _chunks(parts: AsyncIterator[ModelJobPart]) -> AsyncIterator[bytes]:
    async for part in parts:
        if part.WhichOneof("part") != "chunk":
            raise StreamError("only chunks may follow the header")
        yield part.chunk


def export_job_id(r: ExportRequest) -> str:
    return r.job_id


def dataset_name(r: DescribeDatasetRequest) -> str:
    """The dataset asked about (its name is checked where it is looked up)."""
    return r.name[:MAX_NAME_CHARS]


def export_parts(
    job_id: str, step: int, tensors: Sequence[tuple[str, torch.Tensor]]
) -> Iterator[ExportPart]:
    """An ExportModel answer: the header describing every tensor, then their bytes."""
    header = coordinator_pb2.ExportHeader(
        job_id=job_id, step=step, tensors=[header_of(n, t) for n, t in tensors]
    )
    yield ExportPart(header=header)
    for chunk in iter_chunks([t for _, t in tensors]):
        yield ExportPart(chunk=chunk)
