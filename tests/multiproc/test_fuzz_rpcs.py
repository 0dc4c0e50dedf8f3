"""Every RPC of a real coordinator and a real worker process, fed seeded random bytes.

For each method, 1,000 requests go out as raw bytes (grpc generic calls, no serializer):
pure noise, raw edits of a valid request, and field-level changes of one (which still parse,
so they reach the handlers' own checks, deep inside graphs and tensor headers). About half
carry the credential the method's role needs (the join token to register, a worker's own
credential, the operator token, the coordinator's credential toward the worker, the join
token and a probe ticket); the rest carry forged identities: another worker's id, a stale
credential, an id that does not exist, a credential of another role, a wrong one, none.
Every one of those must be refused (UNAUTHENTICATED or PERMISSION_DENIED). Every call
must end in OK or a deliberate error status - never an exception escaping a handler
(UNKNOWN), never a hang, never a refusal lost on its way - and afterwards both processes
are alive, their logs hold no handler's traceback, and the service still works.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import torch
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from archipelago.client import ClientError
from coordinator.planning.jobspec import parse_job_spec
from proto import coordinator_pb2, worker_pb2
from proto.certificates import new_key, signing_request
from proto.rpc import (
    Metadata,
    coordinator_metadata,
    operator_metadata,
    probe_metadata,
    token_metadata,
    worker_metadata,
)
from proto.tensor_stream import encode_values, header_of, iter_chunks
from tests.multiproc.cluster import (
    Cluster,
    coordinator_channel,
    coordinator_credential,
    probe_ticket,
    wait_for,
    worker_channel,
)
from tests.multiproc.test_worker_rejects_bad_messages import build_stage_hand_out

# A chunk the fuzz offers to and asks of the dataset store.
FUZZ_CHUNK_SHA = hashlib.sha256(b"fuzz!").hexdigest()

pytestmark = pytest.mark.multiproc

CALLS_PER_METHOD = 1000
WINDOW = 96  # calls in flight at once
DEADLINE_S = 60.0
SEED = 20240611

FUZZ_JOB = "fuzz-job"
FUZZ_EPOCH = 1
# Small enough that the coordinator captures a mutated-but-valid copy in milliseconds, and
# asks for two stages: with one real worker an accepted fuzz job waits in the queue (one
# whose stage count a mutation dropped may run on the worker; all are cancelled after).
FUZZ_SPEC = """
name: fuzz
model: {zoo: gpt, args: {layers: 1, d_model: 16, heads: 2, context: 8}}
data: {corpus: stdlib-text, batch_size: 2, micro_batches: 1, max_bytes: 20000}
optimizer: {name: adamw, lr: 1.0e-3}
steps: 2
parallel: {stages: 2}
checkpoint: {every: 2}
"""
STAGE_SPEC = """
name: fuzz-stage
model: {zoo: gpt, args: {layers: 1, d_model: 16, heads: 2, context: 8}}
data: {corpus: stdlib-text, batch_size: 4, micro_batches: 2, max_bytes: 20000}
optimizer: {name: adamw, lr: 1.0e-3}
steps: 100
parallel: {stages: 2}
checkpoint: {every: 100}
"""
# The coordinator's own check of a registering worker's fields (coordinator/service.py).
ADDRESS = re.compile(r"^[A-Za-z0-9_.:\[\]-]{1,255}:\d{1,5}$")

# grpc.aio answers bytes that are no protobuf message of the method's request type with
# UNKNOWN, "Unexpected <class '...DecodeError'>: Error parsing message with type ...", and
# logs the DecodeError's traceback (grpc._cython.cygrpc, "raised by servicer method"). It is
# grpc's deserializer that raises, before the handler runs (unary requests) or as the
# handler pulls the next message (streams); no handler code fails. These are told apart
# from handler crashes by that exception, and are the only UNKNOWNs and tracebacks allowed.
PARSE_ERROR = "DecodeError'>: Error parsing message with type 'archipelago.v1."


# -- requests ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """One RPC: its path, its shape, and a valid request (one message, or a stream)."""

    service: str
    name: str
    shape: str  # unary | client-stream | server-stream
    valid: tuple[Message, ...]

    @property
    def path(self) -> str:
        return f"/archipelago.v1.{self.service}/{self.name}"


INTS: tuple[int, ...] = (
    0,
    1,
    2,
    3,
    7,
    8,
    16,
    255,
    256,
    1 << 16,
    2**31 - 1,
    2**31,
    2**32 - 1,
    2**53,
)
INTS += (2**62, 2**63 - 1, 2**64 - 1, -1, -2, -(2**31), -(2**63))
INT_RANGES = {
    FieldDescriptor.CPPTYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.CPPTYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.CPPTYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.CPPTYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.CPPTYPE_ENUM: (0, 2**31 - 1),
}
FLOATS = (0.0, -0.0, 1.0, -1.0, 0.5, 1e-300, 1e308, math.inf, -math.inf, math.nan)
TEXTS: tuple[str, ...] = (
    "",
    "0",
    "-1",
    "1e309",
    ".nan",
    ".inf",
    "null",
    "~",
    "true",
    "[",
    "{",
    "}",
    ":",
)
TEXTS += ("\n", "- ", "'", '"', "\x00", "\u202e", "é", "名前", "99999999999999999999")
TEXTS += ("127.0.0.1:9", "localhost:70000", "[::1]:1", "../../etc/passwd", "%s%n")
TEXTS += ("!!python/object/apply:os.system ['true']", "&a [*a, *a]", "float32", "int64")
TEXTS += ("builtins.eval", "torch.load", "os.system", "raw", "bogus")


def mutate_text(text: str, rng: random.Random) -> str:
    """`text` with one edit: a token swapped in or inserted, a run cut or repeated, a
    character changed, or a long run of one character."""
    pos = rng.randrange(len(text) + 1)
    end = pos + rng.randint(1, 8)
    op = rng.randrange(7)
    if op == 0:
        return rng.choice(TEXTS)
    if op == 1:
        return text[:pos] + rng.choice(TEXTS) + text[pos:]
    if op == 2:
        return text[:pos] + rng.choice(TEXTS) + text[end:]
    if op == 3:
        return text[:pos] + text[end:]
    if op == 4:
        return text[:end] + text[pos:]
    if op == 5:
        return rng.choice("x9é\x00 ") * rng.choice((64, 101, 256, 4097, 70_000))
    char = chr(rng.choice((rng.randrange(32, 127), rng.randrange(0x80, 0x3000))))
    return text[:pos] + char + text[pos + 1 :]


def random_scalar(f: FieldDescriptor, rng: random.Random, current: Any) -> Any:
    """A new value for scalar field `f`: an edge case, a neighbour or an edit of `current`."""
    if f.cpp_type in INT_RANGES:
        lo, hi = INT_RANGES[f.cpp_type]
        value = rng.choice(INTS) if rng.random() < 0.7 else int(current or 0) + rng.randint(-3, 3)
        return min(max(value, lo), hi)
    if f.cpp_type in (FieldDescriptor.CPPTYPE_DOUBLE, FieldDescriptor.CPPTYPE_FLOAT):
        return rng.choice((*FLOATS, float(current or 0) * rng.uniform(-4, 4)))
    if f.cpp_type == FieldDescriptor.CPPTYPE_BOOL:
        return not current
    if f.type == FieldDescriptor.TYPE_BYTES:
        data = bytes(current or b"")
        return rng.choice(
            (
                b"",
                data[: rng.randrange(len(data) + 1)],
                data + rng.randbytes(rng.randint(1, 64)),
                rng.randbytes(len(data)),
                rng.randbytes(rng.randint(1, 4096)),
            )
        )
    return mutate_text(str(current or ""), rng)


def mutate_message(msg: Message, rng: random.Random, depth: int = 0) -> None:
    """Change one or two fields of `msg` in place, often deep inside it (a node of a
    graph, one tensor header, one value of a transfer): the result still parses, so it
    reaches the handler's own checks."""
    fields: list[Any] = list(msg.DESCRIPTOR.fields)
    if not fields:
        return
    for _ in range(rng.randint(1, 2)):
        present: list[Any] = [f for f, _ in msg.ListFields()]
        f = rng.choice(present if present and rng.random() < 0.7 else fields)
        is_message = f.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE
        if f.is_repeated:
            items = getattr(msg, f.name)
            roll = rng.random()
            i = rng.randrange(len(items)) if len(items) else 0
            if len(items) and roll < 0.55:
                if is_message:
                    mutate_message(items[i], rng, depth + 1)
                else:
                    items[i] = random_scalar(f, rng, items[i])
            elif len(items) and roll < 0.75:
                del items[i]
            elif is_message:
                added = items.add()
                if len(items) > 1:
                    added.CopyFrom(items[i])
                if depth < 8:
                    mutate_message(added, rng, depth + 1)
            else:
                items.append(random_scalar(f, rng, None))
        elif is_message:
            if msg.HasField(f.name) and rng.random() < 0.15:
                msg.ClearField(f.name)
            elif depth < 8:
                getattr(msg, f.name).SetInParent()
                mutate_message(getattr(msg, f.name), rng, depth + 1)
        else:
            setattr(msg, f.name, random_scalar(f, rng, getattr(msg, f.name)))


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    """`data` with one or two raw edits: bit flips, byte overwrites, insertions,
    deletions, truncation, repeated runs."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 2)):
        pos = rng.randrange(len(out) + 1)
        op = rng.randrange(6)
        if op == 0 and out:
            out[min(pos, len(out) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1 and out:
            out[min(pos, len(out) - 1)] = rng.choice((0x00, 0x01, 0x7F, 0x80, 0xFF))
        elif op == 2:
            out[pos:pos] = rng.randbytes(rng.randint(1, 8))
        elif op == 3 and out:
            del out[pos : pos + rng.randint(1, 8)]
        elif op == 4:
            del out[pos:]
        else:
            out[pos:pos] = out[pos : pos + rng.randint(1, 16)]
    return bytes(out)


def fuzz_request(method: Method, rng: random.Random) -> list[bytes]:
    """The messages of one fuzz call: noise (a fifth), raw edits of a valid request (a
    quarter), or field-level changes of one (the rest)."""
    roll = rng.random()
    if roll < 0.2:
        count = 1 if method.shape != "client-stream" else rng.randint(0, 3)
        return [rng.randbytes(rng.randint(0, 200)) for _ in range(count)]
    messages = list(method.valid)
    if method.shape == "client-stream":
        edit = rng.random()
        if edit < 0.08:
            del messages[rng.randrange(len(messages))]
        elif edit < 0.16:
            messages.insert(rng.randrange(len(messages) + 1), rng.choice(messages))
        elif edit < 0.24:
            rng.shuffle(messages)
    encoded = [m.SerializeToString() for m in messages]
    if messages:
        i = 0 if rng.random() < 0.7 else rng.randrange(len(messages))
        if roll < 0.45:
            encoded[i] = mutate_bytes(encoded[i], rng)
        else:
            changed = type(messages[i])()
            changed.CopyFrom(messages[i])
            mutate_message(changed, rng)
            encoded[i] = changed.SerializeToString()
    return encoded


# What a fuzz call may carry: (whether it is the credential the method's role needs, the
# call's metadata), one drawn per call.
Credentials = Sequence[tuple[bool, Metadata]]
REFUSED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


@dataclass(frozen=True)
class Identities:
    """The credentials of the fuzz: the cluster's tokens, the real worker's id and the
    coordinator's credential toward it, a fuzz worker's own current and stale ones, and the
    coordinator's ticket for the fuzz worker to probe the real one."""

    token: str
    operator: str
    real_id: str
    coordinator: str
    fuzz_id: str = ""
    credential: str = ""
    stale: str = ""
    probe: str = ""

    def forged(self) -> list[tuple[bool, Metadata]]:
        """Calls that prove no role a method needs (each method adds what does)."""
        return [
            (False, ()),
            (False, token_metadata("wrong-token")),
            (False, operator_metadata("a-wrong-operator-token")),
            (False, worker_metadata(self.real_id, self.credential)),  # another worker's id
            (False, worker_metadata(self.fuzz_id, self.stale)),  # a stale credential
            (False, worker_metadata("no-such-worker", self.credential)),
            (False, coordinator_metadata("a-forged-coordinator-credential")),
        ]

    def for_method(self, method: Method) -> list[tuple[bool, Metadata]]:
        """Half the weight on the method's own credential, half on the forged ones."""
        worker = worker_metadata(self.fuzz_id, self.credential)
        join, operator = token_metadata(self.token), operator_metadata(self.operator)
        coordinator = coordinator_metadata(self.coordinator)
        if method.service == "Worker":
            if method.name in ("Activations", "Gradients", "ReplicaGradients"):
                right: list[Metadata] = [join]  # and the pair's secret, in the header
                other = [coordinator, worker]
            elif method.name == "Probe":
                right = [join + probe_metadata(self.fuzz_id, self.probe), coordinator]
                other = [join, join + probe_metadata("other-prober", self.probe), worker]
            else:
                right, other = [coordinator], [join, worker, operator]
        elif method.name == "Register":
            right, other = [join], [join + worker_metadata(self.real_id, self.stale)]
        elif method.name in (
            "Heartbeat",
            "Leave",
            "ReportProgress",
            "UploadCheckpoint",
            "GetDatasetManifest",
            "GetDatasetChunk",
        ):
            right, other = [worker], [join, operator]
        else:
            right, other = [operator], [join, worker]
        wrong = self.forged() + [(False, m) for m in other]
        return [(True, m) for m in right] * max(1, len(wrong) // len(right)) + wrong


@dataclass
class Outcome:
    method: str
    with_token: bool  # carried the credential of the method's role
    code: grpc.StatusCode
    details: str

    @property
    def unparseable(self) -> bool:
        """grpc refused the bytes as no message of the request type (see PARSE_ERROR)."""
        return self.code == grpc.StatusCode.UNKNOWN and PARSE_ERROR in self.details


def _settle(result: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    try:
        result()
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


def fuzz_method(
    channel: grpc.Channel,
    method: Method,
    credentials: Credentials,
    rng: random.Random,
    *,
    calls: int = CALLS_PER_METHOD,
    keep: Callable[[list[bytes]], bool] = lambda _: True,
) -> list[Outcome]:
    """`calls` fuzz calls of one method, `WINDOW` at a time, each under a deadline; a
    request `keep` turns down is drawn again."""
    raw: dict[str, Any] = {"request_serializer": None, "response_deserializer": None}
    unary = channel.unary_unary(method.path, **raw)
    client_stream = channel.stream_unary(method.path, **raw)
    server_stream = channel.unary_stream(method.path, **raw)
    outcomes: list[Outcome] = []
    pending: list[tuple[bool, Callable[[], object]]] = []

    def drain() -> None:
        for with_token, result in pending:
            code, details = _settle(result)
            outcomes.append(Outcome(method.path, with_token, code, details))
        pending.clear()

    for _ in range(calls):
        messages = fuzz_request(method, rng)
        while not keep(messages):
            messages = fuzz_request(method, rng)
        with_token, metadata = rng.choice(credentials)
        if method.shape == "unary":
            f: Future[object] = unary.future(messages[0], timeout=DEADLINE_S, metadata=metadata)
            pending.append((with_token, f.result))
        elif method.shape == "client-stream":
            f = client_stream.future(iter(messages), timeout=DEADLINE_S, metadata=metadata)
            pending.append((with_token, f.result))
        else:
            call = server_stream(messages[0], timeout=DEADLINE_S, metadata=metadata)
            pending.append((with_token, functools.partial(list, call)))
        if len(pending) >= WINDOW:
            drain()
    drain()
    return outcomes


def small_job_or_refused(messages: list[bytes]) -> bool:
    """Whether a SubmitJob request is refused by the spec check, or names a model small
    enough to build. The coordinator builds a job's whole model in memory before it
    answers, with no bound on its size (a reported limitation): a fuzzed `layers` or
    `d_model` in the millions would only measure this machine's memory."""
    try:
        spec = parse_job_spec(coordinator_pb2.SubmitJobRequest.FromString(messages[0]).spec_yaml)
    except Exception:
        return True  # refused before any model is built

    def numbers(value: object) -> Iterator[float]:
        if isinstance(value, (int, float)):
            yield value
        elif isinstance(value, (tuple, list)):
            for v in value:
                yield from numbers(v)

    args = spec.model.args_dict()
    sizes = [n for v in args.values() for n in numbers(v)]
    return (
        all(n <= 256 for n in sizes)
        and all(
            n <= 8
            for k, v in args.items()
            if k in ("layers", "mlp_ratio", "experts")
            for n in numbers(v)
        )
        and spec.data.max_bytes <= 1_000_000
        and spec.steps <= 20
    )


# -- the valid requests the mutations start from ---------------------------------------------


def coordinator_methods(worker_id: str = "0123456789ab") -> list[Method]:
    """The coordinator's methods; the worker calls' requests name `worker_id`."""
    job = coordinator_pb2.JobRequest(job_id="0123456789", with_metrics=True)
    weights = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    checkpoint = [
        coordinator_pb2.CheckpointPart(
            header=coordinator_pb2.CheckpointHeader(
                worker_id=worker_id,
                job_id="0123456789",
                epoch=1,
                stage=0,
                num_stages=2,
                step=10,
                tensors=[header_of("lm_head.weight", weights)],
            )
        ),
        *(coordinator_pb2.CheckpointPart(chunk=c) for c in iter_chunks([weights])),
    ]
    unary: dict[str, Message] = {
        "Register": coordinator_pb2.RegisterRequest(
            name="fuzz-worker",
            address="127.0.0.1:9",
            resources=coordinator_pb2.WorkerResources(
                gflops=12.5, memory_bytes=1 << 33, device="cpu", threads=2
            ),
            csr=signing_request(new_key()[0]),
        ),
        "Heartbeat": coordinator_pb2.HeartbeatRequest(
            worker_id=worker_id, job_id="0123456789", epoch=1, step=3, state="running"
        ),
        "Leave": coordinator_pb2.LeaveRequest(worker_id=worker_id),
        "ReportProgress": coordinator_pb2.ProgressReport(
            worker_id=worker_id,
            job_id="0123456789",
            epoch=1,
            stage=1,
            step=4,
            has_loss=True,
            loss=2.5,
            step_seconds=0.25,
            sent=[coordinator_pb2.LinkBytes(dst_stage=0, bytes=4096)],
        ),
        "SubmitJob": coordinator_pb2.SubmitJobRequest(spec_yaml=FUZZ_SPEC),
        "GetJob": job,
        "ListJobs": coordinator_pb2.ListJobsRequest(),
        "CancelJob": job,
        "ListWorkers": coordinator_pb2.ListWorkersRequest(),
        "ListLinks": coordinator_pb2.ListLinksRequest(),
        "GetPlan": job,
        "ListEvents": coordinator_pb2.EventsRequest(job_id="0123456789", after_seq=1, limit=10),
        # Users' own data and models.
        "MissingDatasetChunks": coordinator_pb2.DatasetChunksQuery(
            dataset_bytes=5, sha256=[FUZZ_CHUNK_SHA]
        ),
        "PutDatasetChunk": coordinator_pb2.DatasetChunk(
            sha256=FUZZ_CHUNK_SHA, data=b"fuzz!", dataset_bytes=5
        ),
        "PutDataset": coordinator_pb2.DatasetManifest(manifest_json=b'{"version": 1}'),
        "GetDatasetManifest": coordinator_pb2.DatasetRequest(sha256=FUZZ_CHUNK_SHA),
        "GetDatasetChunk": coordinator_pb2.DatasetChunkRequest(
            dataset_sha256=FUZZ_CHUNK_SHA, index=0
        ),
        "DescribeDataset": coordinator_pb2.DescribeDatasetRequest(name="fuzz-data"),
    }
    methods = [Method("Coordinator", name, "unary", (m,)) for name, m in unary.items()]
    methods.append(Method("Coordinator", "UploadCheckpoint", "client-stream", tuple(checkpoint)))
    methods.append(Method("Coordinator", "WatchJob", "server-stream", (job,)))
    upload = (
        coordinator_pb2.ModelJobPart(
            header=coordinator_pb2.ModelJobHeader(spec_yaml=FUZZ_SPEC, model_bytes=5)
        ),
        coordinator_pb2.ModelJobPart(chunk=b"fuzz!"),
    )
    methods.append(Method("Coordinator", "SubmitModelJob", "client-stream", upload))
    export = coordinator_pb2.ExportRequest(job_id="0123456789")
    methods.append(Method("Coordinator", "ExportModel", "server-stream", (export,)))
    records = coordinator_pb2.RecordsRequest(job_id="0123456789", since_step=3)
    methods.append(Method("Coordinator", "JobRecords", "server-stream", (records,)))
    return methods


def worker_methods(worker_address: str) -> tuple[list[Method], tuple[Message, ...]]:
    """The worker's methods with valid requests about a stage of `FUZZ_JOB`, and the
    stage hand-over itself (the fuzz loads it before the calls that need it)."""
    hand_out = build_stage_hand_out(
        spec_yaml=STAGE_SPEC,
        job_id=FUZZ_JOB,
        epoch=FUZZ_EPOCH,
        stage=1,
        addresses=["127.0.0.1:9", worker_address],
    )
    a = hand_out.assignment
    metas = {n.name: n.meta for n in a.graph.nodes}
    names = [r.name for r in a.receives] + [n for n in a.graph.inputs if n not in a.receives]
    values = {}
    for name in names:
        shape = tuple(metas[name].shape)
        values[name] = (
            torch.ones(shape)
            if metas[name].dtype == "float32"
            else torch.zeros(shape, dtype=torch.long)
        )
    named, tensors = encode_values(values)
    header = worker_pb2.TransferHeader(
        job_id=FUZZ_JOB,
        epoch=FUZZ_EPOCH,
        pair_secret=next(ps.secret for ps in a.pair_secrets if ps.stage == 0),
        # Inside the stage's in-flight window (it waits at step 0 and keeps steps 0 and 1).
        step=1,
        micro_batch=1,
        src_stage=0,
        values=named,
        tensors=[header_of(n, t) for n, t in tensors],
    )
    transfer = (
        worker_pb2.TransferPart(header=header),
        *(worker_pb2.TransferPart(chunk=c) for c in iter_chunks([t for _, t in tensors])),
    )
    # A replica's gradient share for the fuzz stage (which has no replica group, so even
    # an intact one is refused; mutations exercise the stream's checks on the way there).
    grads = [(p.name, torch.ones(tuple(p.shape))) for p in a.graph.params]
    replica_header = worker_pb2.ReplicaGradientsHeader(
        job_id=FUZZ_JOB,
        epoch=FUZZ_EPOCH,
        sync_secret=a.sync_secret,
        step=5,
        stage=1,
        src_replica=1,
        tensors=[header_of(n, t) for n, t in grads],
    )
    replica_share = (
        worker_pb2.ReplicaGradientsPart(header=replica_header),
        *(worker_pb2.ReplicaGradientsPart(chunk=c) for c in iter_chunks([t for _, t in grads])),
    )
    load_stage = tuple(hand_out.parts())
    control = worker_pb2.JobControl(job_id=FUZZ_JOB, epoch=FUZZ_EPOCH)
    methods = [
        Method("Worker", "LoadStage", "client-stream", load_stage),
        Method("Worker", "Activations", "client-stream", transfer),
        # The same values sent back as gradients: stage 1, the last, expects none.
        Method("Worker", "Gradients", "client-stream", transfer),
        Method("Worker", "ReplicaGradients", "client-stream", replica_share),
        Method("Worker", "Status", "unary", (worker_pb2.StatusRequest(),)),
        Method("Worker", "Probe", "unary", (worker_pb2.ProbeRequest(payload=b"p" * 64),)),
        # The cluster's workers probe only loopback (--probe-networks 127.0.0.0/8), so no
        # mutation of the target can send a byte off this machine; port 9 refuses at once.
        Method(
            "Worker",
            "MeasureLinks",
            "unary",
            (
                worker_pb2.MeasureLinksRequest(
                    targets=[worker_pb2.LinkTarget(worker_id="peer", address="127.0.0.1:9")],
                    max_bytes=1 << 16,
                    target_seconds=0.05,
                ),
            ),
        ),
        Method("Worker", "StopJob", "unary", (control,)),
        Method("Worker", "StartJob", "unary", (control,)),
        # The coordinator's spot check fetching a recent micro-batch's evidence.
        Method(
            "Worker",
            "SpotEvidence",
            "server-stream",
            (
                worker_pb2.SpotRequest(
                    job_id=FUZZ_JOB, epoch=FUZZ_EPOCH, step=0, micro_batch=0, params=True
                ),
            ),
        ),
    ]
    return methods, load_stage


# -- the test ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    # Every fuzzed registration that passes the checks is admitted: the per-address rate
    # limit (its own test: test_denial_of_service) would refuse most of the thousand.
    c = Cluster(
        tmp_path_factory.mktemp("fuzz") / "cluster",
        extra_coordinator_args=["--registrations-per-minute", "1000000"],
    )
    try:
        c.start_coordinator()
        c.start_worker("real")
        yield c
    finally:
        c.close()


def _assert_outcomes(outcomes: Sequence[Outcome], method: Method) -> None:
    codes = Counter(o.code for o in outcomes)
    assert len(outcomes) == CALLS_PER_METHOD, method.path
    crashed = [
        o.details for o in outcomes if o.code == grpc.StatusCode.UNKNOWN and not o.unparseable
    ]
    assert not crashed, f"{method.path}: a handler raised {crashed[:3]}"
    hung = [o for o in outcomes if o.code == grpc.StatusCode.DEADLINE_EXCEEDED]
    assert not hung, f"{method.path}: {len(hung)} calls hung past {DEADLINE_S} s"
    # No request is near the message limit: this would be a refusal whose details (quoting
    # a long field) overflowed the trailer and never reached the caller.
    lost = [o.details for o in outcomes if o.code == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert not lost, f"{method.path}: refusals lost on the way: {lost[:3]}"
    # Without its role's credential a call gets nothing but a refusal (or grpc's own parse
    # error): a forged identity changes nothing.
    for o in outcomes:
        if not o.with_token:
            assert o.code in REFUSED or o.unparseable, (method.path, o)
    # The fuzz reached the handler, not just the parser: tokened calls got handler answers.
    reached = sum(1 for o in outcomes if o.with_token and not o.unparseable)
    assert reached >= 150, f"{method.path}: only {reached} calls reached the handler {codes}"


def assert_only_parse_error_tracebacks(log: str, name: str) -> None:
    """Every traceback in `log` is grpc's report of undecodable request bytes."""
    lines = log.splitlines()
    for i, line in enumerate(lines):
        if not line.startswith("Traceback (most recent call last):"):
            continue
        raised = next((x for x in lines[i + 1 :] if x and not x.startswith(" ")), "<end>")
        where = "\n".join(lines[max(0, i - 1) : i + 16])
        assert "raised by servicer method" in lines[i - 1], f"{name}:\n{where}"
        assert raised.startswith("google.protobuf.message.DecodeError: Error parsing"), (
            f"{name}: a handler crashed:\n{where}"
        )


def register_fuzz_worker(channel: grpc.Channel, ids: Identities) -> Identities:
    """Register a worker of the fuzz's own (at an address that answers nothing), then again
    under its id with its credential: `ids` with its id, current and stale credentials."""
    register = channel.unary_unary(
        "/archipelago.v1.Coordinator/Register",
        request_serializer=coordinator_pb2.RegisterRequest.SerializeToString,
        response_deserializer=coordinator_pb2.RegisterReply.FromString,
    )
    request = coordinator_pb2.RegisterRequest(
        name="fuzz-identity", address="127.0.0.1:9", csr=signing_request(new_key()[0])
    )
    first = register(request, metadata=token_metadata(ids.token), timeout=30)
    request.worker_id = first.worker_id
    again = register(
        request,
        metadata=token_metadata(ids.token) + worker_metadata(first.worker_id, first.credential),
        timeout=30,
    )
    assert again.worker_id == first.worker_id and again.credential != first.credential
    return dataclasses.replace(
        ids, fuzz_id=first.worker_id, credential=again.credential, stale=first.credential
    )


def test_coordinator_refuses_a_job_whose_model_cannot_be_built(cluster: Cluster) -> None:
    spec = FUZZ_SPEC.replace("d_model: 16", "d_model: 1000000000000")
    client = cluster.client()
    try:
        # Refused from its predicted size, before the coordinator tries to build it.
        with pytest.raises(ClientError, match=r"job refused: model\.args: gpt .* parameters"):
            client.submit(spec)
        assert all(j.name != "fuzz" for j in client.jobs())
    finally:
        client.close()


def test_every_rpc_survives_random_and_mutated_requests(cluster: Cluster) -> None:
    began = time.monotonic()
    (real,) = cluster.workers_safe()
    worker = next(p for p in cluster.procs if p.name == "real")
    rng = random.Random(SEED)
    results: dict[str, Counter[grpc.StatusCode]] = {}
    ids = Identities(
        token=cluster.token,
        operator=cluster.operator_token,
        real_id=real.worker_id,
        coordinator=coordinator_credential(cluster, real.worker_id),
    )

    def fuzz(channel: grpc.Channel, method: Method, **kw: Any) -> None:
        outcomes = fuzz_method(channel, method, ids.for_method(method), rng, **kw)
        _assert_outcomes(outcomes, method)
        results[method.path] = Counter(o.code for o in outcomes)

    with coordinator_channel(cluster) as channel:
        fuzz(channel, coordinator_methods()[0])  # Register
        # A worker of the fuzz's own, registered twice: its first credential is stale.
        ids = register_fuzz_worker(channel, ids)
        ids = dataclasses.replace(ids, probe=probe_ticket(cluster, ids.fuzz_id, ids.real_id))
        methods = coordinator_methods(ids.fuzz_id)
        # Workers the fuzz registered never heart-beat: wait until none looks free, so no
        # job is planned on an address that answers nothing.
        wait_for(
            "the fuzz-registered workers to be declared lost",
            lambda: all(w.state != "idle" for w in cluster.workers_safe() if w.name != "real"),
            30,
        )
        for method in methods[1:]:
            keep = small_job_or_refused if method.name == "SubmitJob" else lambda _: True
            fuzz(channel, method, keep=keep)

    # A fuzz job the coordinator accepted and could plan (one stage) may hold the worker.
    client = cluster.client()
    try:
        for job in client.jobs():
            if not job.terminal:
                client.cancel(job.job_id)
    finally:
        client.close()
    wait_for(
        "the real worker to be idle",
        lambda: any(w.name == "real" and w.state == "idle" for w in cluster.workers_safe()),
        30,
    )

    methods, load_stage = worker_methods(real.address)
    valid_transfers: Counter[grpc.StatusCode] = Counter()
    valid_details: set[str] = set()
    with worker_channel(cluster, real.address, real.worker_id) as channel:
        load = channel.stream_unary(
            "/archipelago.v1.Worker/LoadStage",
            request_serializer=worker_pb2.LoadStagePart.SerializeToString,
            response_deserializer=worker_pb2.LoadStageReply.FromString,
        )

        def load_fuzz_stage() -> None:
            # The coordinator has a worker drop a job it never planned (at its next
            # heartbeat), so the fuzz hands the stage over again before each round.
            reply = load(
                iter(load_stage), metadata=coordinator_metadata(ids.coordinator), timeout=DEADLINE_S
            )
            assert (reply.job_id, reply.stage) == (FUZZ_JOB, 1)

        for method in methods:
            if method.name in (
                "Activations",
                "Gradients",
                "ReplicaGradients",
                "StartJob",
                "StopJob",
            ):
                rounds = 10
                outcomes: list[Outcome] = []
                for _ in range(rounds):
                    load_fuzz_stage()
                    if method.name == "Activations":
                        # The valid transfer itself, at once: the worker drops the stage at
                        # its next heartbeat, which a loaded machine may reach before any
                        # fuzzed call that happens to be valid arrives.
                        send = channel.stream_unary(
                            method.path, request_serializer=None, response_deserializer=None
                        )
                        code, details = _settle(
                            functools.partial(
                                send,
                                iter([m.SerializeToString() for m in method.valid]),
                                timeout=DEADLINE_S,
                                metadata=token_metadata(ids.token),
                            )
                        )
                        valid_transfers[code] += 1
                        valid_details.add(details)
                    outcomes += fuzz_method(
                        channel,
                        method,
                        ids.for_method(method),
                        rng,
                        calls=CALLS_PER_METHOD // rounds,
                    )
                _assert_outcomes(outcomes, method)
                results[method.path] = Counter(o.code for o in outcomes)
            else:
                fuzz(channel, method)

    # Transfers got deep enough to be judged on their content, not only on their job.
    for name in ("Activations", "Gradients"):
        codes = results[f"/archipelago.v1.Worker/{name}"]
        assert codes[grpc.StatusCode.INVALID_ARGUMENT] >= 50, (name, codes)
        assert codes[grpc.StatusCode.PERMISSION_DENIED] > 0, (name, codes)
    # A valid transfer is taken (the first after each hand-over; a repeat of the same
    # micro-batch is refused as arriving twice).
    assert valid_transfers[grpc.StatusCode.OK] > 0, (valid_transfers, valid_details)

    # Both processes lived through it, and nothing escaped a handler into their logs.
    assert cluster.coordinator is not None
    for proc in (cluster.coordinator, worker):
        assert proc.alive, f"{proc.name} died:\n{proc.tail()}"
        assert_only_parse_error_tracebacks(proc.log.read_text(errors="replace"), proc.name)

    # The service still works, and only workers that passed the checks were registered.
    client = cluster.client()
    try:
        for job in client.jobs():
            assert job.name, job
            if not job.terminal:
                client.cancel(job.job_id)
        workers = client.workers()
    finally:
        client.close()
    assert [w.name for w in workers if w.address == real.address] == ["real"]
    assert next(w for w in workers if w.name == "real").state in ("idle", "busy")
    for w in workers:
        if w.name != "real":  # registered by a fuzz call that passed validation
            assert 0 < len(w.name) <= 100 and w.name.isprintable(), w
            assert ADDRESS.match(w.address), w
            assert w.state in ("lost", "left"), w
    with worker_channel(cluster, real.address, real.worker_id) as channel:
        status = channel.unary_unary(
            "/archipelago.v1.Worker/Status",
            request_serializer=worker_pb2.StatusRequest.SerializeToString,
            response_deserializer=worker_pb2.WorkerStatus.FromString,
        )(worker_pb2.StatusRequest(), metadata=coordinator_metadata(ids.coordinator), timeout=30)
    assert (status.name, status.worker_id) == ("real", real.worker_id)
    print(f"fuzzed {len(results)} methods in {time.monotonic() - began:.1f} s")
    for path, codes in sorted(results.items()):
        print(path, {c.name: n for c, n in codes.most_common()})


def test_every_coordinator_method_is_fuzzed() -> None:
    service = coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"]
    assert {m.name for m in coordinator_methods()} == set(service.methods_by_name)
