"""The `archipelago testbed` subcommands: `up`, `down` and `measure`.

`up` builds a testbed from a spec and leaves it up (its record in
/run/archipelago-testbed/); `down` removes one by name, or every testbed's leftovers;
`measure` prints each directed pair's throughput and round-trip time next to the spec's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from deploy.wan import cleanup, iproute
from deploy.wan.errors import TestbedError
from deploy.wan.measure import DEFAULT_SECONDS, DEFAULT_WARMUP_S, format_table, measure_all
from deploy.wan.spec import load_spec
from deploy.wan.state import STATE_DIR, recorded_names
from deploy.wan.testbed import Testbed


def add_testbed_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("testbed", help="the one-machine WAN testbed (needs root)")
    tsub = p.add_subparsers(dest="testbed_command", required=True, metavar="ACTION")

    q = tsub.add_parser("up", help="build a testbed from a spec and leave it up")
    q.add_argument("spec", help="the testbed spec (YAML)")
    q.set_defaults(func=cmd_up)

    q = tsub.add_parser("down", help="remove a testbed (or, without a name, every one)")
    q.add_argument("name", nargs="?", help="the testbed's name (default: all testbeds)")
    q.set_defaults(func=cmd_down)

    q = tsub.add_parser("measure", help="measure every directed pair against the spec")
    q.add_argument(
        "target",
        nargs="?",
        help="a spec file (built for the measurement unless it is up) or the name of a "
        "testbed that is up (default: the one that is up)",
    )
    q.add_argument("--warmup", type=float, default=DEFAULT_WARMUP_S, metavar="S")
    q.add_argument("--seconds", type=float, default=DEFAULT_SECONDS, metavar="S")
    q.set_defaults(func=cmd_measure)


def host_table(tb: Testbed) -> str:
    """One line per host: name, region, namespace, address; then the bridge's address."""
    rows = [("host", "region", "namespace", "address")]
    rows += [(h, tb.region_of(h), tb.namespace(h), str(tb.address(h))) for h in tb.hosts]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.append(f"bridge {tb.layout.bridge} (root namespace): {tb.bridge_address}")
    return "\n".join(lines)


def cmd_up(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    iproute.require_privileges()
    tb = Testbed(spec, detach=True)
    tb.up()
    print(f"testbed {spec.name!r} is up")
    print(host_table(tb))
    print(f"remove it with `archipelago testbed down {spec.name}`")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    iproute.require_privileges()
    removed = cleanup.remove_testbed(args.name) if args.name else cleanup.remove_all()
    what = f"testbed {args.name!r}" if args.name else "testbeds"
    if not removed:
        print(f"no {what} to remove")
    for item in removed:
        print(f"removed {item}")
    return 0


def cmd_measure(args: argparse.Namespace) -> int:
    iproute.require_privileges()
    target = args.target
    if target is not None and Path(target).is_file():
        spec = load_spec(target)
        if spec.name not in recorded_names():
            print(f"building testbed {spec.name!r} for the measurement", file=sys.stderr)
            with Testbed(spec) as tb:
                return _measure(tb, args)
        target = spec.name
    if target is None:
        names = recorded_names()
        if not names:
            raise TestbedError(
                "no testbed is up: give a spec file, or start one with "
                "`archipelago testbed up SPEC.yaml`"
            )
        if len(names) > 1:
            raise TestbedError(f"several testbeds are up ({', '.join(names)}): name one")
        target = names[0]
    if target not in recorded_names():
        raise TestbedError(
            f"{target!r} is neither a spec file nor a testbed that is up ({STATE_DIR})"
        )
    with Testbed.attach(target) as tb:
        return _measure(tb, args)


def _measure(tb: Testbed, args: argparse.Namespace) -> int:
    n = len(tb.hosts) * (len(tb.hosts) - 1)
    print(f"measuring {n} directed pairs of {tb.name!r}, one at a time", file=sys.stderr)
    rows = measure_all(tb, warmup_s=args.warmup, seconds=args.seconds)
    print(format_table(rows))
    return 0
