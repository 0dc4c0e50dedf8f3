"""A tiny TCP probe for the testbed: round-trip time, then throughput, over one connection.

    python -m deploy.wan.iperf receive --warmup 0.5 --seconds 1.5   # prints `port N`, then JSON
    python -m deploy.wan.iperf send ADDRESS PORT --pings 10         # prints JSON

The sender first bounces one-byte pings off the receiver (idle round-trip times), then
streams data. The receiver lets the stream warm up (TCP's slow start, queues filling),
counts the bytes of a fixed window, then resets the connection, which stops the sender.
Both give up by themselves after a timeout, so a probe never hangs.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import struct
import sys
import time

PING = b"p"
BULK = b"b"
CHUNK = 1 << 16
RECV_BUFFER = 1 << 18
DEFAULT_TIMEOUT_S = 20.0


def receive(
    warmup_s: float, seconds: float, timeout_s: float, announce: bool = True
) -> dict[str, float]:
    """Serve one sender: echo its pings, then measure its stream's rate over a window."""
    deadline = time.monotonic() + timeout_s
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("0.0.0.0", 0))
        server.listen(1)
        if announce:
            print(f"port {server.getsockname()[1]}", flush=True)
        server.settimeout(timeout_s)
        conn, _ = server.accept()
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.settimeout(max(0.1, deadline - time.monotonic()))
        while True:
            byte = conn.recv(1)
            if byte == PING:
                conn.sendall(PING)
            elif byte == BULK:
                break
            else:
                raise ConnectionError(f"sender sent {byte!r} before the stream")
        buf = bytearray(RECV_BUFFER)
        window_opens = time.monotonic() + warmup_s
        start = end = 0.0
        counted = 0
        while True:
            n = conn.recv_into(buf)
            if n == 0:
                raise ConnectionError("sender stopped before the window closed")
            now = time.monotonic()
            if now < window_opens:
                continue
            if not start:
                start = now  # bytes of this read arrived before the window: not counted
                continue
            counted += n
            end = now
            if end - start >= seconds:
                break
        # Reset rather than close, so the sender's next write fails and it stops at once.
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return {"bytes": counted, "seconds": end - start, "bytes_per_s": counted / (end - start)}


def send(address: str, port: int, pings: int, timeout_s: float) -> dict[str, object]:
    """Ping the receiver `pings` times, then stream until it resets the connection."""
    deadline = time.monotonic() + timeout_s
    rtts = []
    with socket.create_connection((address, port), timeout=timeout_s) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(pings):
            t0 = time.perf_counter()
            conn.sendall(PING)
            if conn.recv(1) != PING:
                raise ConnectionError("receiver did not echo a ping")
            rtts.append(time.perf_counter() - t0)
        conn.sendall(BULK)
        data = b"\0" * CHUNK
        sent = 0
        try:
            while time.monotonic() < deadline:
                conn.sendall(data)
                sent += CHUNK
        except (ConnectionResetError, BrokenPipeError):
            pass  # the receiver's window is closed: the normal end
        else:
            raise TimeoutError(f"the receiver did not finish within {timeout_s:g} s")
    rtt = statistics.median(rtts) if rtts else None
    return {"rtts": rtts, "rtt_s": rtt, "sent_bytes": sent}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.wan.iperf")
    sub = parser.add_subparsers(dest="role", required=True)
    r = sub.add_parser("receive")
    r.add_argument("--warmup", type=float, default=0.5, help="seconds of stream not counted")
    r.add_argument("--seconds", type=float, default=1.5, help="length of the counted window")
    r.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S)
    s = sub.add_parser("send")
    s.add_argument("address")
    s.add_argument("port", type=int)
    s.add_argument("--pings", type=int, default=10)
    s.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S)
    args = parser.parse_args(argv)
    try:
        if args.role == "receive":
            result: dict[str, object] = dict(receive(args.warmup, args.seconds, args.timeout))
        else:
            result = send(args.address, args.port, args.pings, args.timeout)
    except (OSError, ConnectionError) as e:
        print(f"iperf {args.role}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
