"""The bounds a coordinator sets on the jobs it accepts: `SpecLimits`, and the flag of each.

A spec can be valid and still ask for more than a coordinator will spend: a batch of four
billion samples, a trillion-parameter model the coordinator would build in its own memory.
The YAML text's bounds (size, nesting, values) are kept by `spec_yaml` as it is read; the
job's by `job_size.check_job_size`, from its figures alone, before anything is built. Every
refusal names the field, the bound and the flag that sets it.

Imports nothing heavy: the command line reads the defaults from here.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

GB = 1 << 30


@dataclass(frozen=True)
class SpecLimits:
    """What one job may ask for; every bound is a coordinator flag (`FLAGS`)."""

    # The YAML text: a job spec is a screenful, so these leave ample room.
    max_bytes: int = 64 << 10
    max_depth: int = 16  # mappings and lists inside one another
    max_nodes: int = 2000  # scalars, mappings and lists in the document
    # The job's figures.
    max_batch_size: int = 65_536
    max_micro_batches: int = 1024
    max_steps: int = 10_000_000
    # The model, predicted from its config (`job_size`): the coordinator builds and
    # captures every job's model itself, at 4 bytes a parameter.
    max_parameters: int = 1_000_000_000
    max_memory_bytes: int = 64 * GB  # to train it in one process, one micro-batch at a time
    max_operators: int = 20_000  # in its captured graph (capture takes ~3 ms each)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{FLAGS[f.name]} must be a whole number >= 1, got {value!r}")


# The coordinator flag that sets each bound (named in every refusal).
FLAGS: dict[str, str] = {
    "max_bytes": "--max-spec-bytes",
    "max_depth": "--max-spec-depth",
    "max_nodes": "--max-spec-nodes",
    "max_batch_size": "--max-batch-size",
    "max_micro_batches": "--max-micro-batches",
    "max_steps": "--max-steps",
    "max_parameters": "--max-model-params",
    "max_memory_bytes": "--max-model-memory-gb",
    "max_operators": "--max-model-operators",
}
