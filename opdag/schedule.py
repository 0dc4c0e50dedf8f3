"""The order in which a stage runs its micro-batches: a schedule is plain data.

One-forward-one-backward (1F1B): stage `s` of `S` first runs `S - s - 1 + extra` forwards
(the warm-up that fills the pipeline), then alternates one forward and one backward, then
drains the remaining backwards. Backwards run in micro-batch order, as one process
accumulating gradients would, so every depth computes the same gradients bit for bit.

`extra` (the plan's extra warm-up) puts that many more micro-batches in flight at every
stage: at most `S - s + extra` micro-batches' activations are alive at once. With 0 it is
classic 1F1B; on a link whose transfer of a micro-batch takes about as long as its
compute, a deeper warm-up keeps the stages busy while messages cross; with `extra >=
micro_batches - 1` every stage runs all its forwards first (GPipe). Values flow only to
higher-numbered stages, and warm-ups never grow along the stages, so the schedule cannot
deadlock whatever the stage graph's shape.
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


def one_f_one_b(stage: int, num_stages: int, micro_batches: int, extra: int = 0) -> tuple[Op, ...]:
    """The 1F1B schedule of one stage, with `extra` more forwards in its warm-up."""
    if not 0 <= stage < num_stages:
        raise ValueError(f"stage {stage} is not in 0..{num_stages - 1}")
    if micro_batches < 1:
        raise ValueError(f"micro_batches must be at least 1, not {micro_batches}")
    if isinstance(extra, bool) or not isinstance(extra, int) or extra < 0:
        raise ValueError(f"the extra warm-up must be a non-negative integer, not {extra!r}")
    warmup = min(num_stages - stage - 1 + extra, micro_batches)
    ops = [Op("F", mb) for mb in range(warmup)]
    forward, backward = warmup, 0
    while forward < micro_batches:
        ops.append(Op("F", forward))
        ops.append(Op("B", backward))
        forward += 1
        backward += 1
    ops += [Op("B", mb) for mb in range(backward, micro_batches)]
    return tuple(ops)


def in_flight(stage: int, num_stages: int, micro_batches: int, extra: int = 0) -> int:
    """The most micro-batches whose activations stage `stage` holds at once."""
    return min(num_stages - stage + extra, micro_batches)
