"""The client's half of users' own models: what `archipelago submit` uploads for a spec
whose model is a Python file or an `.opdag` file, and the file `archipelago export` writes.

The upload is the captured model's `.opdag` bytes and the name each tensor has in the
user's module (`archipelago.model_source`); a tensor the forward never reads is not part
of the graph, and a note on stderr says the exported file will lack it. The export is a
`.safetensors` file (the `safetensors` package: named tensors, no code) under the names of
the user's own module, written whole or not at all, with the job and step in its metadata.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from archipelago.errors import UsageError

if TYPE_CHECKING:  # the command line's parser is built without torch
    from archipelago.client import CoordinatorClient
    from archipelago.model_serde import ExportedModel
    from coordinator.planning.jobspec import JobSpec

# Bytes of an export read at most (the coordinator's upload bound, with room for state
# that grew: buffers are the model's own, so a checkpoint is the model's size).
MAX_EXPORT_BYTES = 16 << 30


def prepare_upload(
    spec: JobSpec, spec_path: Path, client: CoordinatorClient
) -> tuple[bytes, list[tuple[str, str]]]:
    """The `.opdag` bytes and export names of the spec's own model (paths in the spec are
    relative to its file's folder; a stored dataset's shapes come from the coordinator);
    UsageError naming what is wrong."""
    from archipelago.client import ClientError
    from archipelago.model_source import ModelSourceError, prepare_model

    try:
        manifest = client.dataset_manifest(spec.data.dataset) if spec.data.dataset else None
    except ClientError as e:
        raise UsageError(str(e)) from None
    try:
        prepared = prepare_model(spec, spec_path.resolve().parent, manifest)
        blob = prepared.encode()
    except ModelSourceError as e:
        raise UsageError(str(e)) from None
    if prepared.missing:
        shown = ", ".join(prepared.missing[:3])
        print(
            f"note: the forward never reads {len(prepared.missing)} tensor(s) of the model "
            f"({shown}); they are not trained and `archipelago export` leaves them out",
            file=sys.stderr,
        )
    return blob, prepared.names


def write_export(exported: ExportedModel, out: Path) -> str:
    """Write the tensors to `out` as safetensors (atomically); a line saying what."""
    from safetensors.torch import save_file

    tensors = {name: t.contiguous() for name, t in exported.tensors}
    if len(tensors) != len(exported.tensors):
        raise UsageError(f"the export of job {exported.job_id} names a tensor twice")
    tmp = out.with_name(out.name + ".partial")
    metadata = {"job": exported.job_id, "step": str(exported.step), "format": "pt"}
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        tmp.replace(out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UsageError(f"cannot write {str(out)!r}: {e.strerror or e}") from None
    return (
        f"{out}: {len(tensors)} tensors of job {exported.job_id}, checkpoint of step "
        f"{exported.step}"
    )


def add_export_command(sub: argparse._SubParsersAction) -> None:
    """`export JOB --out FILE`, with the coordinator, operator token and TLS options of
    every user's command."""
    from archipelago.credential_args import add_operator_arg
    from archipelago.servicecmds import _coordinator_arg
    from archipelago.tls_args import add_client_tls_args

    p = sub.add_parser("export", help="write a job's trained model as a .safetensors file")
    p.add_argument("job", help="a job id")
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    _coordinator_arg(p)
    add_operator_arg(p)
    add_client_tls_args(p)
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from archipelago.client import ClientError
    from archipelago.servicecmds import _client

    client = _client(args)
    try:
        exported = client.export(args.job, max_bytes=MAX_EXPORT_BYTES)
    except ClientError as e:
        raise UsageError(str(e)) from None
    finally:
        client.close()
    print(write_export(exported, Path(args.out)))
    return 0
