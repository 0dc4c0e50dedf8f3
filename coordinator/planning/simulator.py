"""The event simulator: when each stage of one pipeline finishes its micro-batches.

It runs the schedule the workers run, `opdag.schedule.one_f_one_b` at the plan's warm-up
depth, with each stage's
forward and backward seconds and each link's occupancy and latency: a stage runs its ops
in order, an op starts when its stage is free and its inputs have arrived, and every link
sends in FIFO order. The estimator calls it for every plan the search prices, so it is
lean: plain lists and floats, the schedule converted once per shape.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from opdag.schedule import one_f_one_b


@functools.lru_cache(maxsize=4096)
def simulated_ops(
    stage: int, num_stages: int, micro_batches: int, extra: int = 0
) -> tuple[tuple[bool, int], ...]:
    """Stage `stage`'s 1F1B schedule (with `extra` more warm-up forwards), as the workers
    run it, in the simulator's form: (is_backward, micro-batch) per op."""
    return tuple(
        (op.kind == "B", op.micro_batch)
        for op in one_f_one_b(stage, num_stages, micro_batches, extra)
    )


def simulate_1f1b(
    fwd: Sequence[float],
    bwd: Sequence[float],
    transfers: Sequence[tuple[int, int, float | None, float | None, float, float | None, float]],
    micro_batches: int,
    extra: int = 0,
) -> list[float]:
    """Event simulation of one pipeline: when each stage finishes its last backward.

    `fwd[s]`, `bwd[s]`: seconds per micro-batch. Each transfer is `(src, dst, data_occ,
    act_occ, fwd_latency, grad_occ, bwd_latency)`: occupancies in seconds per micro-batch
    (None when nothing is sent). Data leave stage 0 when its forward starts, activations
    when the forward ends, gradients when the backward ends; each link sends in FIFO order
    and a message arrives its latency after it has left the link.

    Times follow from the dependencies alone, so stages are advanced in sweeps (up the
    pipeline for forwards, down for backwards), each as far as its inputs allow.
    """
    n, m = len(fwd), micro_batches
    sched = [simulated_ops(s, n, m, extra) for s in range(n)]
    # Per stage: arrival lists its forwards and backwards wait for, and what they send:
    # (arrival list to fill, link index, data occupancy, message occupancy, latency).
    links = [0.0] * (2 * len(transfers))
    arr_f = [[-1.0] * m for _ in transfers]
    arr_b = [[-1.0] * m for _ in transfers]
    need_f: list[list[list[float]]] = [[] for _ in range(n)]
    need_b: list[list[list[float]]] = [[] for _ in range(n)]
    send_f: list[list[tuple[list[float], int, float | None, float | None, float]]] = [
        [] for _ in range(n)
    ]
    send_b: list[list[tuple[list[float], int, float | None, float | None, float]]] = [
        [] for _ in range(n)
    ]
    for t, (a, d, occ_d, occ_a, lat_f, occ_g, lat_b) in enumerate(transfers):
        if not a < d:
            raise ValueError(f"transfer {a} -> {d} does not flow forward")
        if occ_d is not None or occ_a is not None:
            need_f[d].append(arr_f[t])
            send_f[a].append((arr_f[t], 2 * t, occ_d, occ_a, lat_f))
        if occ_g is not None:
            need_b[a].append(arr_b[t])
            send_b[d].append((arr_b[t], 2 * t + 1, None, occ_g, lat_b))
    free = [0.0] * n
    ptr = [0] * n
    left = n
    sweep = [*range(n), *range(n - 1, -1, -1)]
    while left:
        moved = False
        for s in sweep:
            ops, k = sched[s], ptr[s]
            if k == len(ops):
                continue
            now = free[s]
            while k < len(ops):
                backward, mb = ops[k]
                start = now
                for arrivals in need_b[s] if backward else need_f[s]:
                    at = arrivals[mb]
                    if at < 0:
                        break
                    if at > start:
                        start = at
                else:
                    now = start + (bwd[s] if backward else fwd[s])
                    for arrivals, li, occ_d, occ, lat in send_b[s] if backward else send_f[s]:
                        out = links[li]
                        if occ_d is not None:  # data leave when the forward starts
                            out = (start if start > out else out) + occ_d
                        if occ is not None:
                            out = (now if now > out else out) + occ
                        links[li] = out
                        arrivals[mb] = out + lat
                    k += 1
                    continue
                break  # an input has not arrived yet
            if k != ptr[s]:
                moved = True
                ptr[s], free[s] = k, now
                if k == len(ops):
                    left -= 1
        if not moved:
            stuck = [s for s in range(n) if ptr[s] < len(sched[s])]
            raise RuntimeError(f"the simulated schedule deadlocked at stages {stuck}")
    return free
