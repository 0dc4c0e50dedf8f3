"""The client's side of the users'-own-model messages: the SubmitModelJob stream it sends
(header, then the `.opdag` bytes in chunks) and the ExportModel stream it reads back
(tensor descriptions, then their bytes, each checked against its description).

A serde module like `archipelago.serde`, kept apart.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from opdag.data.manifest import Manifest
from proto import coordinator_pb2
from proto.errors import StreamError
from proto.tensor_stream import CHUNK_BYTES, TensorAssembler


def model_job_parts(
    spec_yaml: str, blob: bytes, names: Sequence[tuple[str, str]]
) -> Iterator[coordinator_pb2.ModelJobPart]:
    """A SubmitModelJob stream: the spec, the blob's length and the export names, then the
    blob in chunks."""
    header = coordinator_pb2.ModelJobHeader(
        spec_yaml=spec_yaml,
        model_bytes=len(blob),
        export_names=[coordinator_pb2.ExportName(name=n, tensor=t) for n, t in names],
    )
    yield coordinator_pb2.ModelJobPart(header=header)
    view = memoryview(blob)
    for offset in range(0, len(blob), CHUNK_BYTES):
        yield coordinator_pb2.ModelJobPart(chunk=bytes(view[offset : offset + CHUNK_BYTES]))


def export_request(job_id: str) -> coordinator_pb2.ExportRequest:
    return coordinator_pb2.ExportRequest(job_id=job_id)


def describe_dataset_request(name: str) -> coordinator_pb2.DescribeDatasetRequest:
    return coordinator_pb2.DescribeDatasetRequest(name=name)


# A manifest is a few KB per MB of data; this bounds even a huge dataset's.
MAX_MANIFEST_BYTES = 64 << 20


def manifest_from_pb(m: coordinator_pb2.DatasetManifest) -> Manifest:
    """The manifest the coordinator sent, checked in full (`opdag.data.manifest`)."""
    if len(m.manifest_json) > MAX_MANIFEST_BYTES:
        raise StreamError(f"a manifest of {len(m.manifest_json)} bytes")
    return Manifest.from_json(bytes(m.manifest_json))


@dataclass(frozen=True)
class ExportedModel:
    """A job's trained model as the coordinator sent it: the checkpoint's step and the
    tensors by the names the model's own module has."""

    job_id: str
    step: int
    tensors: list[tuple[str, torch.Tensor]]


def read_export(parts: Iterable[coordinator_pb2.ExportPart], *, max_bytes: int) -> ExportedModel:
    """The tensors of an ExportModel stream; WireError for a stream that is not a header
    then exactly the bytes it declares (at most `max_bytes`)."""
    stream = iter(parts)
    first = next(stream, None)
    if first is None or first.WhichOneof("part") != "header":
        raise StreamError("the export must start with its header")
    header = first.header
    assembler = TensorAssembler(header.tensors, max_bytes=max_bytes)
    for part in stream:
        if part.WhichOneof("part") != "chunk":
            raise StreamError("only chunks may follow the export's header")
        assembler.feed(part.chunk)
    return ExportedModel(job_id=header.job_id, step=header.step, tensors=assembler.finish())
