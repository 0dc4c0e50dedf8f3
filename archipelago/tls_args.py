"""The command line's TLS: on by default, with the coordinator's own authority.

- `archipelago coordinator` makes its authority on a first start (kept in its store),
  prints the authority's fingerprint and writes its certificate to `--ca-file` (default:
  `ca.pem` in its state directory, `~/.archipelago/ca.pem` with the default store).
- A worker, and every operator command, knows the authority by `--ca-fingerprint` (as
  printed; the certificate is read from the coordinator and checked against it) or by the
  certificate's file, `--ca`; an operator command on the coordinator's own machine finds
  `~/.archipelago/ca.pem` by itself.
- `--insecure` is plain text, refused anywhere but on loopback addresses.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from archipelago.errors import UsageError
from proto.certificates import CertificateError, check_fingerprint
from proto.cluster_tls import ClientTls, fetch_coordinator_certificate
from proto.rpc import check_plain_text_host

# Where a coordinator with the default store writes its authority's certificate.
DEFAULT_CA_FILE = Path.home() / ".archipelago" / "ca.pem"

INSECURE_HELP = "plain text instead of TLS (loopback development only)"


def add_coordinator_tls_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ca-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="where to write the TLS authority's certificate for clients "
        "(default: ca.pem in the state directory)",
    )
    p.add_argument("--insecure", action="store_true", help=INSECURE_HELP)


def add_client_tls_args(p: argparse.ArgumentParser) -> None:
    """A worker's and an operator command's: how they know the coordinator's authority."""
    p.add_argument(
        "--ca-fingerprint",
        default=os.environ.get("ARCHIPELAGO_CA_FINGERPRINT", ""),
        metavar="sha256:HEX",
        help="the coordinator's TLS authority, as the coordinator prints it at start "
        "(default: $ARCHIPELAGO_CA_FINGERPRINT)",
    )
    p.add_argument(
        "--ca",
        type=Path,
        default=Path(os.environ["ARCHIPELAGO_CA"]) if os.environ.get("ARCHIPELAGO_CA") else None,
        metavar="FILE",
        help="the coordinator's TLS authority certificate (default: $ARCHIPELAGO_CA; an "
        f"operator command also looks in {DEFAULT_CA_FILE})",
    )
    p.add_argument("--insecure", action="store_true", help=INSECURE_HELP)


def worker_trust(args: argparse.Namespace) -> tuple[str, Path | None, bool]:
    """A worker's (--ca-fingerprint, --ca, --insecure), checked for the obvious."""
    if args.insecure and (args.ca_fingerprint or args.ca):
        raise UsageError("--insecure goes with neither --ca-fingerprint nor --ca")
    if args.ca is not None and not args.ca.is_file():
        raise UsageError(f"--ca {args.ca}: no such file")
    return args.ca_fingerprint, args.ca, args.insecure


def client_tls(args: argparse.Namespace) -> ClientTls | None:
    """How an operator command reaches `args.coordinator`: its authority's certificate
    (None with --insecure); UsageError naming what is missing or wrong."""
    fingerprint, ca_file, insecure = worker_trust(args)
    if insecure:
        try:
            check_plain_text_host(args.coordinator.rpartition(":")[0], "--coordinator")
        except ValueError as e:
            raise UsageError(str(e)) from None
        return None
    try:
        if ca_file is None and not fingerprint and DEFAULT_CA_FILE.is_file():
            ca_file = DEFAULT_CA_FILE
        if ca_file is not None:
            return ClientTls(ca_file.read_bytes())
        if fingerprint:
            return ClientTls(
                fetch_coordinator_certificate(args.coordinator, check_fingerprint(fingerprint))
            )
    except OSError as e:
        raise UsageError(f"cannot read {ca_file}: {e.strerror}") from None
    except CertificateError as e:
        raise UsageError(str(e)) from None
    raise UsageError(
        "the coordinator's TLS authority is unknown: pass --ca-fingerprint (the coordinator "
        f"prints it at start) or --ca FILE (no {DEFAULT_CA_FILE} here)"
    )
