"""The command-line flags of relaying: a worker's `--outbound-only` and `--relay`, the
coordinator's `--max-relayed-workers` and `--relay-host` (`coordinator.relay`,
`worker.relay_client`)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from archipelago.errors import UsageError

if TYPE_CHECKING:
    from coordinator.relay import RelayConfig


def add_worker_relay_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--outbound-only",
        action="store_true",
        help="take no inbound connection (behind NAT or a firewall): serve on loopback and be "
        "reached through one outbound stream to a relay",
    )
    p.add_argument(
        "--relay",
        default="",
        metavar="HOST:PORT",
        help="the relay an --outbound-only worker is reached through (default: the coordinator)",
    )


def worker_relay_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The WorkerConfig fields the relay flags set."""
    from worker.relay_client import check_outbound_only

    if args.relay and not args.outbound_only:
        raise UsageError("--relay is for an --outbound-only worker")
    if args.outbound_only:
        try:
            check_outbound_only(args.listen, args.advertise)
        except ValueError as e:
            raise UsageError(str(e)) from None
    return {"outbound_only": args.outbound_only, "relay": args.relay}


def add_coordinator_relay_flags(p: argparse.ArgumentParser) -> None:
    from coordinator.relay import DEFAULT_MAX_RELAYED_WORKERS

    p.add_argument(
        "--max-relayed-workers",
        type=int,
        default=DEFAULT_MAX_RELAYED_WORKERS,
        metavar="N",
        help="workers behind NAT (--outbound-only) this coordinator relays at once "
        f"(default {DEFAULT_MAX_RELAYED_WORKERS}; 0: none)",
    )
    p.add_argument(
        "--relay-host",
        default="",
        metavar="HOST",
        help="the address relayed workers' ports listen on and are dialled at (default: "
        "--host; needed when --host is a wildcard)",
    )


def relay_config_from_flags(args: argparse.Namespace) -> RelayConfig:
    from coordinator.relay import RelayConfig

    if args.max_relayed_workers < 0:
        raise UsageError(f"--max-relayed-workers must be 0 or more, not {args.max_relayed_workers}")
    try:
        return RelayConfig(host=args.relay_host, max_workers=args.max_relayed_workers)
    except ValueError as e:
        raise UsageError(str(e)) from None
