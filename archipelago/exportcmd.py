"""The client's half of users' own models: what `archipelago submit` uploads for a spec
whose model is a Python file or an `.opdag` file, and the file `archipelago export` writes.

The upload is the captured model's `.opdag` bytes and the name each tensor has in the
user's module (`archipelago.model_source`); a tensor the forward never reads is not part
of the graph, and a note on stderr says the exported file will lack it. The export is a
`.safetensors` file (the `safetensors` package: named tensors, no code) under the names of
the user's own module, written whole or not at all, with the job and step in its metadata.
"""

from __future__ import annotations

import sys
from pathlib import Path

from archipelago.errors import UsageError
from archipelago.model_serde import ExportedModel
from archipelago.model_source import ModelSourceError, prepare_model
from coordinator.planning.jobspec import JobSpec

# Bytes of an export read at most (the coordinator's upload bound, with room for state
# that grew: buffers are the model's own, so a checkpoint is the model's size).
MAX_EXPORT_BYTES = 16 << 30


def prepare_upload(spec: JobSpec, spec_path: Path) -> tuple[bytes, list[tuple[str, str]]]:
    """The `.opdag` bytes and export names of the spec's own model (paths in the spec are
    relative to its file's folder); UsageError naming what is wrong."""
    try:
        prepared = prepare_model(spec, spec_path.resolve().parent)
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
