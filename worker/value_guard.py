"""Bounds on the values a stage receives from its peers: finite, never absurdly large, and
not far above what the same edge carried lately.

Every float tensor a stage receives (a peer stage's activations or gradients, a replica's
share of an average) is checked after its structure (`worker.inbox.check_value`) and before
anything uses it:

- every element finite, and |x| below an absolute ceiling (`ValueBounds.ceiling`, 1e30):
  always, from the first step;
- its L2 norm at most `factor` (100) times the median of the norms that edge (sender,
  kind, value name) carried lately (`window` of them), once the edge has carried `warmup`
  values. The median, not the mean: a few large honest values move it little, and a
  sender cannot raise the bound quickly by creeping up (each accepted value is one sample
  of `window`).

A refused value is never put in the inbox nor counted in the edge's statistics; the guard
names its sender, with the evidence, to `on_refusal` once per sender (the stage reports it
to the coordinator, `worker.stage_job`), and raises `SuspectValue` (a
`CodecError`: the transfer is refused).

What this cannot see: a value within the bounds that is still wrong (a flipped sign, a
gradient of other data, small steady bias); a sender hostile from its first value sets its
edge's history (only the ceiling holds during the warm-up). Replicas' shares are also
compared with each other (`worker.robust_aggregate`, under `sync.aggregate: median` or
`trimmed-mean`), which catches a flipped sign where a group has three replicas or more.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch

from opdag.errors import CodecError
from opdag.values import Value

# Kinds of value a stage receives, as reports name them.
ACTIVATION, GRADIENT, SHARE = "activation", "gradient", "share"


@dataclass(frozen=True)
class ValueBounds:
    """How far a received value may go: `ceiling` on any |x|; `factor` times the median of
    the edge's last `window` norms, once it carried `warmup` values."""

    factor: float = 100.0
    warmup: int = 8
    window: int = 64
    ceiling: float = 1e30

    def __post_init__(self) -> None:
        if not (self.factor > 1 and self.warmup >= 1 and self.window >= self.warmup):
            raise ValueError(f"value bounds need factor > 1 and window >= warmup >= 1: {self}")
        if not 0 < self.ceiling <= 1e38:
            raise ValueError(f"value ceiling must be in (0, 1e38], got {self.ceiling}")


@dataclass(frozen=True)
class Suspicion:
    """A refused value: who sent it (stage and replica), what and when, and why."""

    kind: str  # ACTIVATION | GRADIENT | SHARE
    stage: int
    replica: int
    step: int
    evidence: str  # one line a person reads
    norm: float = math.nan
    bound: float = math.nan


class SuspectValue(CodecError):
    """A received value out of bounds; `suspicion` names its sender and the evidence."""

    def __init__(self, suspicion: Suspicion) -> None:
        super().__init__(suspicion.evidence)
        self.suspicion = suspicion


class RunningNorms:
    """The recent norms of one edge, and their median."""

    def __init__(self, window: int) -> None:
        self._recent: deque[float] = deque(maxlen=window)

    def __len__(self) -> int:
        return len(self._recent)

    def add(self, norm: float) -> None:
        self._recent.append(norm)

    def median(self) -> float:
        return statistics.median(self._recent) if self._recent else math.nan


def tensor_figures(t: torch.Tensor) -> tuple[float, float]:
    """(largest |x|, L2 norm) of a float tensor, NaN when it holds a NaN; the norm is taken
    on the tensor scaled by its largest value, so 1e20s do not overflow to inf."""
    x = t.detach()
    if x.dtype != torch.float64:
        x = x.float()
    if x.numel() == 0:
        return 0.0, 0.0
    top = float(x.abs().amax())  # amax propagates NaN
    if not math.isfinite(top) or top == 0.0:
        return top, top
    return top, float(torch.linalg.vector_norm(x / top)) * top


def float_tensors(name: str, value: Value) -> Iterator[tuple[str, torch.Tensor]]:
    """The float tensors inside a value (a tensor, or tuples and lists of them)."""
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point:
            yield name, value
    elif isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            yield from float_tensors(f"{name}[{i}]", v)


class ValueGuard:
    """One stage's checks of what it receives, with each edge's running norms."""

    def __init__(
        self,
        bounds: ValueBounds | None = None,
        *,
        on_refusal: Callable[[Suspicion], None] | None = None,
    ) -> None:
        self.bounds = bounds or ValueBounds()
        self.on_refusal = on_refusal
        self._norms: dict[tuple[str, int, int, str], RunningNorms] = {}
        self._reported: set[tuple[int, int]] = set()  # senders named to `on_refusal`

    def check(
        self, kind: str, stage: int, replica: int, step: int, values: Mapping[str, Value]
    ) -> None:
        """Refuse (SuspectValue, after `on_refusal`) values of `step` from (stage, replica)
        that are not finite or out of bounds; else count their norms in the edge's history.
        Nothing is counted unless every value passes."""
        b = self.bounds
        seen: list[tuple[RunningNorms, float]] = []
        for key, value in values.items():
            for name, t in float_tensors(key, value):
                top, norm = tensor_figures(t)
                what = f"{kind} {name!r} of step {step} from stage {stage} replica {replica}"
                if not math.isfinite(top):
                    self._refuse(Suspicion(kind, stage, replica, step, f"{what} is not finite"))
                if top >= b.ceiling:
                    self._refuse(
                        Suspicion(
                            kind,
                            stage,
                            replica,
                            step,
                            f"{what}: |x| {top:.3g} >= {b.ceiling:.3g}",
                            norm,
                            b.ceiling,
                        )
                    )
                norms = self._norms.setdefault((kind, stage, replica, name), RunningNorms(b.window))
                if len(norms) >= b.warmup:
                    median = norms.median()
                    bound = b.factor * median
                    if norm > bound:
                        self._refuse(
                            Suspicion(
                                kind,
                                stage,
                                replica,
                                step,
                                f"{what}: norm {norm:.3g} > {b.factor:g} x median {median:.3g}",
                                norm,
                                bound,
                            )
                        )
                seen.append((norms, norm))
        for norms, norm in seen:
            norms.add(norm)

    def report(self, suspicion: Suspicion) -> None:
        """Name the sender of a value found bad elsewhere (a share left out of an average by
        the outlier test) to `on_refusal`, once per sender; nothing is raised."""
        # Named once per sender: what it sends next is refused too, but one report says it.
        sender = (suspicion.stage, suspicion.replica)
        if self.on_refusal is not None and sender not in self._reported:
            self._reported.add(sender)
            self.on_refusal(suspicion)

    def _refuse(self, suspicion: Suspicion) -> None:
        self.report(suspicion)
        raise SuspectValue(suspicion)
