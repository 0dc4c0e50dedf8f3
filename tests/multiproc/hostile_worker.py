"""A hostile volunteer, for tests only: the real `archipelago worker`, with its send path
patched to corrupt what it sends from a given step on. Nothing in the product knows it.

    python tests/multiproc/hostile_worker.py MODE FROM_STEP worker --coordinator ...

MODE is what it does to the float tensors it sends from step FROM_STEP on:
- `nan`: every activation, gradient and replica share holds NaN;
- `scale`: the gradients it sends back (to earlier stages), the activations it sends on
  (so that it is hostile wherever the planner puts it) and its replica shares are scaled
  by 1e4;
- `flip`: the same, with their sign flipped;
- `shift`: the activations it sends on have 0.05 added to every value, after it computed
  them right (far inside the value guards' bounds: only a spot check finds it);
- `hide`: the same, and it answers no spot check (its evidence is "gone");
- `gscale`: the gradients it sends back are scaled by 1.05, after it computed them right.
Its own training, reports and checkpoints are left honest: what it corrupts is only what
its peers receive from it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

from archipelago.cli import main
from opdag.values import Value
from worker.replica_sync import LOSS, ReplicaSync
from worker.spot_evidence import EvidenceGone, SpotEvidence
from worker.stage_job import StageJob
from worker.transfer_kind import TransferKind

# What `shift` adds to every activation value it sends.
SHIFT = 0.05
MODES = ("nan", "scale", "flip", "shift", "hide", "gscale")


def corrupt(value: Any, mode: str) -> Any:
    """`value` with every float tensor in it corrupted by `mode`."""
    if isinstance(value, torch.Tensor) and value.dtype.is_floating_point:
        if mode == "nan":
            return torch.full_like(value, float("nan"))
        if mode in ("shift", "hide"):
            return value + SHIFT
        if mode == "gscale":
            return value * 1.05
        return value * (1e4 if mode == "scale" else -1.0)
    if isinstance(value, (tuple, list)):
        return type(value)(corrupt(v, mode) for v in value)
    return value


def patch(mode: str, from_step: int) -> None:
    """Corrupt what the stage job and its sync group send, from `from_step` on."""
    send = StageJob._send
    share = ReplicaSync._send

    def hostile_send(
        self: StageJob,
        kind: TransferKind,
        dst: int,
        step: int,
        mb: int,
        values: dict[str, Value],
        sent: dict[int, int],
    ) -> Any:
        forward = kind == TransferKind.FORWARD
        if step >= from_step and (
            mode in ("nan", "scale") or (forward if mode in ("shift", "hide") else not forward)
        ):
            values = {k: corrupt(v, mode) for k, v in values.items()}
        return send(self, kind, dst, step, mb, values, sent)

    async def hostile_share(
        self: ReplicaSync, replica: int, step: int, own: Sequence[tuple[str, torch.Tensor]]
    ) -> None:
        if step >= from_step and mode not in ("shift", "hide", "gscale"):
            own = [(n, t if n == LOSS else corrupt(t, mode)) for n, t in own]
        await share(self, replica, step, own)

    def withheld(self: SpotEvidence, step: int, *rest: Any) -> Any:
        raise EvidenceGone(f"step {step} is not kept")

    if mode == "hide":
        SpotEvidence.inputs = withheld  # type: ignore[method-assign,assignment]
        SpotEvidence.params = withheld  # type: ignore[method-assign]
    StageJob._send = hostile_send  # type: ignore[method-assign]
    ReplicaSync._send = hostile_share  # type: ignore[method-assign]


def run(argv: Sequence[str]) -> int:
    mode, from_step, *rest = argv
    if mode not in MODES:
        raise SystemExit(f"mode must be one of {MODES}, got {mode!r}")
    patch(mode, int(from_step))
    return main(rest)


def hostile_command(mode: str, from_step: int, args: Sequence[str]) -> list[str]:
    """The argv that runs this hostile worker with `archipelago` arguments `args`."""
    return [sys.executable, str(Path(__file__).resolve()), mode, str(from_step), *args]


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
