"""`make bench` / `python -m bench [NAME ...]`: run the benchmarks (all by default)."""

from __future__ import annotations

import argparse
import importlib
import sys

BENCHMARKS = {
    "capture": "bench.capture_speed",
    "service": "bench.service_throughput",
    "heartbeats": "bench.heartbeats",
    "compressors": "bench.compressors",
    "opfence": "bench.opfence_speed",
    "wan-planners": "bench.wan_planners",
    "wan-compression": "bench.wan_compression",
    "wan-replicas": "bench.wan_replicas",
    "wan-relay": "bench.wan_relay",
    "dashboard": "bench.dashboard",
}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="*", choices=[*BENCHMARKS, []], help="which to run")
    args = parser.parse_args()
    for name in args.names or list(BENCHMARKS):
        print(f"== {name} ==", flush=True)
        importlib.import_module(BENCHMARKS[name]).main()
        print(flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
