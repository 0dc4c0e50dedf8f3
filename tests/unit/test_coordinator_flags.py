"""The coordinator's back-off and progress flags: given values reach its configuration, and
a value that cannot work is one error naming the flag."""

from __future__ import annotations

import argparse

import pytest

from archipelago.coordinator_flags import add_exclusion_flags, with_exclusion_flags
from archipelago.errors import UsageError
from coordinator.exclusions import DEFAULT_BACKOFF_S, DEFAULT_MAX_BACKOFF_S
from coordinator.main import CoordinatorConfig


def parsed(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_exclusion_flags(p)
    return p.parse_args(argv)


def test_defaults_stay_the_configs_own() -> None:
    cfg = with_exclusion_flags(CoordinatorConfig(token="t" * 16), parsed())
    assert (cfg.exclusion_backoff_s, cfg.exclusion_max_backoff_s) == (
        DEFAULT_BACKOFF_S,
        DEFAULT_MAX_BACKOFF_S,
    )
    assert cfg.progress_timeout_s == CoordinatorConfig(token="t" * 16).progress_timeout_s


def test_given_values_reach_the_config() -> None:
    args = parsed(
        "--exclusion-backoff", "5", "--exclusion-max-backoff", "50", "--progress-timeout", "9"
    )
    cfg = with_exclusion_flags(CoordinatorConfig(token="t" * 16), args)
    assert (cfg.exclusion_backoff_s, cfg.exclusion_max_backoff_s, cfg.progress_timeout_s) == (
        5.0,
        50.0,
        9.0,
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--exclusion-backoff", "0"), "--exclusion-backoff must be a positive number"),
        (("--progress-timeout", "nan"), "--progress-timeout must be a positive number"),
        (("--exclusion-max-backoff", "-1"), "--exclusion-max-backoff must be a positive"),
        (
            ("--exclusion-backoff", "100", "--exclusion-max-backoff", "10"),
            "--exclusion-max-backoff must be at least --exclusion-backoff",
        ),
    ],
)
def test_values_that_cannot_work_are_refused_by_flag(argv: tuple[str, ...], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        with_exclusion_flags(CoordinatorConfig(token="t" * 16), parsed(*argv))
