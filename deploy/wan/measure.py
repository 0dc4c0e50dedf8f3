"""Measuring a testbed as built: for each directed host pair, the idle round-trip time and
the TCP throughput, next to what the spec asks for.

Pairs are measured one at a time so that they do not share the CPU or the bridge. Each
measurement runs the probe of `deploy.wan.iperf`: its receiver inside the destination's
namespace, its sender inside the source's, and is bounded in time.

TCP's payload is what is measured, so a path shaped to R carries a little less than R of
data (about 96 % at Ethernet's 1500-byte packets: headers take the rest).
"""

from __future__ import annotations

import json
import select
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from deploy.wan.errors import TestbedError
from deploy.wan.spec import format_rate
from deploy.wan.subproc import module_command, module_env
from deploy.wan.testbed import Testbed

PROBE = "deploy.wan.iperf"
DEFAULT_WARMUP_S = 0.5
DEFAULT_SECONDS = 1.5
PINGS = 10
START_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class PairMeasurement:
    """One directed pair: what the spec asks, what was measured."""

    src: str
    dst: str
    spec_bps: int
    measured_bps: float
    spec_rtt_s: float  # twice the one-way latency
    measured_rtt_s: float

    @property
    def ratio(self) -> float:
        return self.measured_bps / self.spec_bps


def measure_pair(
    tb: Testbed,
    src: str,
    dst: str,
    *,
    warmup_s: float = DEFAULT_WARMUP_S,
    seconds: float = DEFAULT_SECONDS,
) -> PairMeasurement:
    """Throughput and round-trip time from `src` to `dst`."""
    path = tb.spec.path(src, dst)
    timeout = START_TIMEOUT_S + warmup_s + seconds + 4 * path.latency_s * PINGS
    env = module_env()
    receive_args = ["receive", "--warmup", str(warmup_s), "--seconds", str(seconds)]
    receiver = tb.popen(
        dst,
        module_command(PROBE, *receive_args, "--timeout", str(timeout)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    sender: subprocess.Popen[bytes] | None = None
    try:
        port = _announced_port(receiver)
        send_args = ["send", str(tb.address(dst)), str(port), "--pings", str(PINGS)]
        sender = tb.popen(
            src,
            module_command(PROBE, *send_args, "--timeout", str(timeout)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        sent = _result(sender, timeout, f"sender on {src}")
        got = _result(receiver, timeout, f"receiver on {dst}")
    finally:
        for proc in (receiver, sender):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    return PairMeasurement(
        src, dst, path.bandwidth_bps, float(got["bytes_per_s"]) * 8,
        2 * path.latency_s, float(sent["rtt_s"]),
    )  # fmt: skip


def measure_all(
    tb: Testbed,
    *,
    warmup_s: float = DEFAULT_WARMUP_S,
    seconds: float = DEFAULT_SECONDS,
    progress: Callable[[PairMeasurement], None] | None = None,
) -> list[PairMeasurement]:
    """Every directed pair, one after another."""
    rows = []
    for src in tb.hosts:
        for dst in tb.hosts:
            if src != dst:
                row = measure_pair(tb, src, dst, warmup_s=warmup_s, seconds=seconds)
                rows.append(row)
                if progress is not None:
                    progress(row)
    return rows


def format_table(rows: list[PairMeasurement]) -> str:
    """The measurements as an aligned text table, spec next to measured."""
    header = ("src", "dst", "spec", "measured", "ratio", "spec RTT", "measured RTT")
    lines = [header]
    for r in rows:
        lines.append(
            (
                r.src,
                r.dst,
                format_rate(r.spec_bps),
                f"{r.measured_bps / 1e6:.2f} Mbit/s",
                f"{r.ratio:.3f}",
                f"{r.spec_rtt_s * 1e3:.1f} ms",
                f"{r.measured_rtt_s * 1e3:.2f} ms",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.ljust(w) if i < 2 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in lines
    )


def _announced_port(receiver: subprocess.Popen[bytes]) -> int:
    assert receiver.stdout is not None
    ready, _, _ = select.select([receiver.stdout], [], [], START_TIMEOUT_S)
    line = receiver.stdout.readline() if ready else b""
    if not line.startswith(b"port "):
        receiver.kill()
        _, err = receiver.communicate()
        raise TestbedError(
            f"the probe's receiver did not start: {err.decode(errors='replace').strip()}"
        )
    return int(line.split()[1])


def _result(proc: subprocess.Popen[bytes], timeout: float, who: str) -> dict[str, Any]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise TestbedError(f"the probe's {who} did not finish in {timeout:g} s") from None
    if proc.returncode != 0:
        raise TestbedError(f"the probe's {who} failed: {err.decode(errors='replace').strip()}")
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result
