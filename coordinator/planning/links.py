"""Measured network links between workers: the bandwidth matrix the planner reads.

Each directed pair of workers (a -> b may differ from b -> a) has a measured bandwidth in
bytes per second and a round-trip time in seconds. A pair nobody measured falls back, in
this order, to the stated default, else to the slowest measured link (and the largest
measured round trip): guessing low keeps the planner from trusting a link it never saw.
What the planner is given has been cross-checked by both ends (`cross_checked`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Link:
    """One measured direction between two workers."""

    src: str
    dst: str
    bandwidth_Bps: float
    rtt_s: float


@dataclass(frozen=True)
class BandwidthMatrix:
    """Measured bandwidth (bytes/s) and round-trip time (s) between workers, by direction."""

    links: tuple[Link, ...] = ()
    default_bandwidth_Bps: float | None = None
    default_rtt_s: float | None = None
    # Lookups derived from `links`; not part of equality.
    _index: dict[tuple[str, str], Link] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        for link in self.links:
            where = f"link {link.src} -> {link.dst}"
            if link.src == link.dst:
                raise ValueError(f"{where}: a worker has no link to itself")
            if not (math.isfinite(link.bandwidth_Bps) and link.bandwidth_Bps > 0):
                raise ValueError(f"{where}: bandwidth {link.bandwidth_Bps!r} must be > 0")
            if not (math.isfinite(link.rtt_s) and link.rtt_s >= 0):
                raise ValueError(f"{where}: round-trip time {link.rtt_s!r} must be >= 0")
            if (link.src, link.dst) in self._index:
                raise ValueError(f"{where} is measured twice")
            self._index[(link.src, link.dst)] = link
        if self.default_bandwidth_Bps is not None and not self.default_bandwidth_Bps > 0:
            raise ValueError(f"default bandwidth {self.default_bandwidth_Bps!r} must be > 0")
        if self.default_rtt_s is not None and not self.default_rtt_s >= 0:
            raise ValueError(f"default round-trip time {self.default_rtt_s!r} must be >= 0")

    @classmethod
    def of(
        cls,
        measured: Mapping[tuple[str, str], tuple[float, float]],
        *,
        default_bandwidth_Bps: float | None = None,
        default_rtt_s: float | None = None,
    ) -> BandwidthMatrix:
        """From `{(src, dst): (bandwidth_Bps, rtt_s)}`."""
        links = tuple(Link(a, b, float(bw), float(rtt)) for (a, b), (bw, rtt) in measured.items())
        return cls(links, default_bandwidth_Bps, default_rtt_s)

    @classmethod
    def uniform(
        cls, worker_ids: Sequence[str], bandwidth_Bps: float, rtt_s: float
    ) -> BandwidthMatrix:
        """Every ordered pair of `worker_ids` at the same bandwidth and round trip."""
        return cls.of(
            {(a, b): (bandwidth_Bps, rtt_s) for a in worker_ids for b in worker_ids if a != b}
        )

    # lookups

    def measured(self, src: str, dst: str) -> bool:
        return (src, dst) in self._index

    def bandwidth(self, src: str, dst: str) -> float:
        """Bytes per second from `src` to `dst` (infinite on one worker)."""
        if src == dst:
            return math.inf
        link = self._index.get((src, dst))
        if link is not None:
            return link.bandwidth_Bps
        if self.default_bandwidth_Bps is not None:
            return self.default_bandwidth_Bps
        return self._measured_or_fail(src, dst).bandwidth_Bps

    def rtt(self, src: str, dst: str) -> float:
        """Round-trip seconds between `src` and `dst` (zero on one worker)."""
        if src == dst:
            return 0.0
        link = self._index.get((src, dst))
        if link is not None:
            return link.rtt_s
        if self.default_rtt_s is not None:
            return self.default_rtt_s
        return self._measured_or_fail(src, dst).rtt_s

    def latency(self, src: str, dst: str) -> float:
        """One-way delay: half the round trip."""
        return self.rtt(src, dst) / 2

    def _measured_or_fail(self, src: str, dst: str) -> Link:
        # The pessimistic stand-in for an unmeasured pair: slowest rate, longest round trip.
        if not self.links:
            raise KeyError(
                f"no bandwidth known from {src} to {dst}: nothing was measured and no default "
                "was stated"
            )
        return self._worst

    @functools.cached_property
    def _worst(self) -> Link:
        return Link(
            "*",
            "*",
            min(link.bandwidth_Bps for link in self.links),
            max(link.rtt_s for link in self.links),
        )

    @property
    def worker_ids(self) -> tuple[str, ...]:
        """Every worker named by a measurement, in first-seen order."""
        seen: dict[str, None] = {}
        for link in self.links:
            seen.setdefault(link.src)
            seen.setdefault(link.dst)
        return tuple(seen)

    # storage

    def to_dict(self) -> dict[str, Any]:
        return {
            "links": [
                {"src": x.src, "dst": x.dst, "bandwidth_Bps": x.bandwidth_Bps, "rtt_s": x.rtt_s}
                for x in self.links
            ],
            "default_bandwidth_Bps": self.default_bandwidth_Bps,
            "default_rtt_s": self.default_rtt_s,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BandwidthMatrix:
        links = tuple(
            Link(str(x["src"]), str(x["dst"]), float(x["bandwidth_Bps"]), float(x["rtt_s"]))
            for x in d.get("links", ())
        )
        bw, rtt = d.get("default_bandwidth_Bps"), d.get("default_rtt_s")
        return cls(
            links,
            None if bw is None else float(bw),
            None if rtt is None else float(rtt),
        )

    # display

    def format_table(
        self,
        worker_ids: Iterable[str] | None = None,
        *,
        names: Mapping[str, str] | None = None,
    ) -> str:
        """A compact matrix for `archipelago status --links`: a row per sender, a column
        per receiver, each cell `rate rtt` (rate in bit/s); `*` marks a fallback value."""
        ids = list(self.worker_ids if worker_ids is None else worker_ids)
        if not ids:
            return "no links measured"
        label = {w: (names or {}).get(w, w) for w in ids}
        cells: list[list[str]] = []
        for a in ids:
            row = []
            for b in ids:
                if a == b:
                    row.append("-")
                    continue
                try:
                    text = f"{format_rate(self.bandwidth(a, b))} {format_seconds(self.rtt(a, b))}"
                except KeyError:
                    text = "?"
                row.append(text if self.measured(a, b) else f"{text}*")
            cells.append(row)
        first = max(len("from \\ to"), *(len(label[w]) for w in ids))
        widths = [max(len(label[b]), *(len(r[j]) for r in cells)) for j, b in enumerate(ids)]
        lines = [
            "  ".join(
                [
                    "from \\ to".ljust(first),
                    *(label[b].rjust(w) for b, w in zip(ids, widths, strict=True)),
                ]
            )
        ]
        for a, row in zip(ids, cells, strict=True):
            lines.append(
                "  ".join(
                    [label[a].ljust(first), *(c.rjust(w) for c, w in zip(row, widths, strict=True))]
                )
            )
        if any(not self.measured(a, b) for a in ids for b in ids if a != b):
            lines.append(f"* not measured: {self._fallback_rule()}")
        return "\n".join(lines)

    def _fallback_rule(self) -> str:
        if self.default_bandwidth_Bps is not None:
            rtt = "" if self.default_rtt_s is None else f" {format_seconds(self.default_rtt_s)}"
            return f"the stated default {format_rate(self.default_bandwidth_Bps)}{rtt}"
        return "the slowest measured link"


# No link between two volunteers' machines moves more than this (a terabit per second:
# beyond the fastest network cards): a figure above it is refused, not believed.
MAX_BELIEVED_BANDWIDTH_BPS = 1.25e11


def cross_checked(
    measured: Mapping[tuple[str, str], tuple[float, float]],
) -> dict[tuple[str, str], tuple[float, float]]:
    """The link figures the planner may believe, from what each sender measured.

    `measured[(a, b)]` is (bytes/s, rtt s) of a -> b as `a` measured it, so each end of a
    pair measured one direction. A pair is believed only when both ends measured it, and
    then at the slower of the two rates and the longer round trip, both ways: one end
    cannot make a link look faster than its peer saw it (an asymmetric link is priced at
    its slower direction). A figure above MAX_BELIEVED_BANDWIDTH_BPS, or not a positive
    finite rate, is not believed at all.
    """

    def plausible(figure: tuple[float, float]) -> bool:
        bw, rtt = figure
        return (
            math.isfinite(bw)
            and 0 < bw <= MAX_BELIEVED_BANDWIDTH_BPS
            and math.isfinite(rtt)
            and rtt >= 0
        )

    out: dict[tuple[str, str], tuple[float, float]] = {}
    for (a, b), there in measured.items():
        back = measured.get((b, a))
        if a == b or back is None or not plausible(there) or not plausible(back):
            continue
        out[(a, b)] = (min(there[0], back[0]), max(there[1], back[1]))
    return out


def format_rate(bytes_per_s: float) -> str:
    """A bandwidth in bit/s with an SI prefix, as links are sold: `20M`, `9.41G`."""
    if math.isinf(bytes_per_s):
        return "inf"
    bits = bytes_per_s * 8
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if bits >= scale:
            return f"{bits / scale:.3g}{prefix}"
    return f"{bits:.3g}"


def format_seconds(seconds: float) -> str:
    """A short duration: `40ms`, `0.2ms`, `1.5s`."""
    if seconds >= 1:
        return f"{seconds:.3g}s"
    return f"{seconds * 1e3:.3g}ms"
