"""The coordinator's flags for leaving bad workers out: how long a worker that could not
be reached or stalled a job is backed off, and when a job that makes no progress is
re-planned (`coordinator.exclusions`, `coordinator.progress_watch`)."""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import TYPE_CHECKING

from archipelago.errors import UsageError

if TYPE_CHECKING:
    from coordinator.main import CoordinatorConfig


def add_exclusion_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--exclusion-backoff",
        type=float,
        default=None,
        metavar="S",
        help="how long a worker that could not be reached or stalled a job is left out of "
        "planning, doubling per repeat (default 30)",
    )
    p.add_argument(
        "--exclusion-max-backoff",
        type=float,
        default=None,
        metavar="S",
        help="the longest such back-off (default 3600)",
    )
    p.add_argument(
        "--progress-timeout",
        type=float,
        default=None,
        metavar="S",
        help="a running job whose steps do not move this long is re-planned (default 60)",
    )


def with_exclusion_flags(cfg: CoordinatorConfig, args: argparse.Namespace) -> CoordinatorConfig:
    """`cfg` with the back-off and progress flags given (each a positive number of seconds)."""
    given = {
        "exclusion_backoff_s": ("--exclusion-backoff", args.exclusion_backoff),
        "exclusion_max_backoff_s": ("--exclusion-max-backoff", args.exclusion_max_backoff),
        "progress_timeout_s": ("--progress-timeout", args.progress_timeout),
    }
    changes = {}
    for field, (flag, value) in given.items():
        if value is None:
            continue
        if not math.isfinite(value) or value <= 0:
            raise UsageError(f"{flag} must be a positive number of seconds, not {value}")
        changes[field] = value
    cfg = dataclasses.replace(cfg, **changes)
    if cfg.exclusion_max_backoff_s < cfg.exclusion_backoff_s:
        raise UsageError("--exclusion-max-backoff must be at least --exclusion-backoff")
    return cfg
