"""A job whose model the user captured on their own machine and uploaded with its spec.

`archipelago submit` captures a user's model (`archipelago.model_source`) and streams the
`.opdag` bytes (graph and initial tensors, as named tensor records, never pickled) after a
header holding the spec and the bytes' length. Here they are taken in within bounds (the
length is checked before a byte is read, and no more bytes than it are accepted), decoded
with every record checked (`opdag.model_file`), and the graph checked as a worker would
check it (`opdag.ops.validate_graph`), against the job's data (`opdag.user_model`: the
data's inputs, one micro-batch of them, a scalar loss) and against the coordinator's size
bounds. Only a model that passes all of it is stored with its job (`JobManager.submit_uploaded`);
a refusal stores nothing. The coordinator never sees the user's Python.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from coordinator.job_record import JobError
from coordinator.planning.jobspec import JobSpec
from coordinator.planning.spec_limits import FLAGS, SpecLimits
from opdag import model_file, ops
from opdag.data.manifest import Manifest
from opdag.errors import CodecError, IRError
from opdag.ir import CapturedModel
from opdag.user_model import check_export_names, check_graph_inputs, data_example
from proto.errors import StreamError

# Bytes per parameter an upload may bring at most (float64), beside the graph record.
_BYTES_PER_PARAMETER = 8
# An upload's bytes at most, whatever the parameter bound.
MAX_UPLOAD_BYTES = 8 << 30


@dataclass(frozen=True)
class ModelJobUpload:
    """The header of a SubmitModelJob stream: the spec, the length of the `.opdag` bytes
    that follow, and the name each tensor is exported under ((name, graph tensor))."""

    spec_yaml: str
    model_bytes: int
    export_names: tuple[tuple[str, str], ...]


def max_upload_bytes(limits: SpecLimits) -> int:
    """The most bytes an uploaded model may have under the coordinator's bounds."""
    bound = limits.max_parameters * _BYTES_PER_PARAMETER + model_file.MAX_GRAPH_BYTES
    return min(MAX_UPLOAD_BYTES, bound)


async def read_model_bytes(chunks: AsyncIterator[bytes], declared: int, limit: int) -> bytes:
    """The `declared` bytes the chunks bring; StreamError for more or fewer, JobError
    when `declared` exceeds `limit` (refused before a byte is read)."""
    if declared > limit:
        raise JobError(
            f"model: the upload declares {declared} bytes; this coordinator accepts at most "
            f"{limit} ({FLAGS['max_parameters']})"
        )
    received = bytearray()
    async for chunk in chunks:
        if len(received) + len(chunk) > declared:
            raise StreamError(f"the upload brings more than the {declared} bytes it declared")
        received += chunk
    if len(received) != declared:
        raise StreamError(f"the upload ended after {len(received)} of {declared} bytes")
    return bytes(received)


def check_uploaded(
    spec: JobSpec,
    blob: bytes,
    names: Sequence[tuple[str, str]],
    limits: SpecLimits,
    manifest: Manifest | None = None,
) -> CapturedModel:
    """The uploaded model, if it is whole, allow-listed, fits the job's data (a stored
    dataset's: its `manifest`) and keeps within `limits`; else an OpDagError (JobError,
    CodecError, IRError, UserModelError) naming what is wrong."""
    if not spec.model.uploaded:
        raise JobError(
            f"model: {spec.model.label} is a zoo model; SubmitModelJob brings a user's own "
            "(model.file or model.opdag)"
        )
    try:
        model = model_file.decode_model(blob)
    except CodecError as e:
        raise CodecError(f"model: the uploaded model is not a valid .opdag: {e}") from None
    graph = model.graph
    params = graph.num_params(trainable_only=False)
    if params > limits.max_parameters:
        raise JobError(
            f"model: {spec.model.label} has {params:.3g} parameters; this coordinator accepts "
            f"at most {limits.max_parameters:.3g} ({FLAGS['max_parameters']})"
        )
    operators = len(graph.compute_nodes)
    if operators > limits.max_operators:
        raise JobError(
            f"model: {spec.model.label} has {operators} operators; this coordinator accepts "
            f"at most {limits.max_operators} ({FLAGS['max_operators']})"
        )
    try:
        ops.validate_graph(graph)
    except IRError as e:
        raise IRError(f"model: the uploaded graph is refused: {e}") from None
    check_graph_inputs(graph, data_example(spec.data, spec.context(), manifest))
    check_export_names(graph, names)
    return model
