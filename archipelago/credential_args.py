"""The command line's credentials: the join token (a worker's, a coordinator's), the
operator token (the coordinator's, and every command of an operator: submit, status, watch,
events, plan, cancel, metrics), each from a flag or its environment variable."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from archipelago.errors import UsageError

# Where a coordinator with the default store keeps the operator token it made.
OPERATOR_TOKEN_FILE = Path.home() / ".archipelago" / "operator-token"


def add_join_token_arg(p: argparse.ArgumentParser, *, required: bool = False) -> None:
    p.add_argument(
        "--token",
        default=os.environ.get("ARCHIPELAGO_TOKEN"),
        help="the join token (default: $ARCHIPELAGO_TOKEN)",
    )
    p.set_defaults(token_required=required)


def add_operator_token_args(p: argparse.ArgumentParser) -> None:
    """The coordinator's: its operator token, given or in a file (neither: its own)."""
    p.add_argument(
        "--operator-token",
        default=os.environ.get("ARCHIPELAGO_OPERATOR_TOKEN", ""),
        help="the operator's token: submit, cancel and every read (default: "
        "$ARCHIPELAGO_OPERATOR_TOKEN, else --operator-token-file, else the one in the state "
        "directory, made on a first start)",
    )
    p.add_argument(
        "--operator-token-file", type=Path, metavar="FILE", help="a file holding the operator token"
    )


def add_operator_arg(p: argparse.ArgumentParser) -> None:
    """An operator's command: the operator token it presents."""
    p.add_argument(
        "--operator-token",
        default=os.environ.get("ARCHIPELAGO_OPERATOR_TOKEN", ""),
        help="the operator token (default: $ARCHIPELAGO_OPERATOR_TOKEN, else the one a "
        f"coordinator on this host keeps in {OPERATOR_TOKEN_FILE})",
    )
    # The join token allows nothing these commands do; still taken, so older scripts run.
    p.add_argument("--token", default="", help=argparse.SUPPRESS)


def operator_token(args: argparse.Namespace) -> str:
    if args.operator_token:
        return str(args.operator_token)
    try:
        return OPERATOR_TOKEN_FILE.read_text().strip()
    except OSError:
        raise UsageError(
            "an operator token is needed: --operator-token TOKEN or ARCHIPELAGO_OPERATOR_TOKEN "
            f"(a coordinator given none writes its own to {OPERATOR_TOKEN_FILE})"
        ) from None


def join_token(args: argparse.Namespace) -> str:
    if not args.token:
        raise UsageError("a join token is needed: --token SECRET or ARCHIPELAGO_TOKEN")
    if len(args.token) < 8:
        raise UsageError("the join token must be at least 8 characters")
    return str(args.token)
