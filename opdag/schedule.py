"""The order in which a stage runs its micro-batches: a schedule is plain data.

One-forward-one-backward (1F1B): stage `s` of `S` first runs `S - s - 1` forwards (the
warm-up that fills the pipeline), then alternates one forward and one backward, then
drains the remaining backwards. Backwards run in micro-batch order, as one process
accumulating gradients would, and at most `S - s` micro-batches' activations are alive at
once. Values flow only to higher-numbered stages, and warm-ups shrink along the stages, so
the schedule cannot deadlock whatever the stage graph's shape.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Op:
    """One entry of a schedule: the forward ("F") or backward ("B") of a micro-batch."""

    kind: str
    micro_batch: int

    def __str__(self) -> str:
        return f"{self.kind}{self.micro_batch}"


def one_f_one_b(stage: int, num_stages: int, micro_batches: int) -> tuple[Op, ...]:
    """The 1F1B schedule of one stage."""
    if not 0 <= stage < num_stages:
        raise ValueError(f"stage {stage} is not in 0..{num_stages - 1}")
    if micro_batches < 1:
        raise ValueError(f"micro_batches must be at least 1, not {micro_batches}")
    warmup = min(num_stages - stage - 1, micro_batches)
    ops = [Op("F", mb) for mb in range(warmup)]
    forward, backward = warmup, 0
    while forward < micro_batches:
        ops.append(Op("F", forward))
        ops.append(Op("B", backward))
        forward += 1
        backward += 1
    ops += [Op("B", mb) for mb in range(backward, micro_batches)]
    return tuple(ops)
