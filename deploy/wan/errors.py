"""Errors of the WAN testbed. Each is a `UsageError`, so the `archipelago` command prints it
as one `archipelago: error: ...` line and exits 2."""

from archipelago.errors import UsageError


class TestbedError(UsageError):
    """The testbed cannot be built, reached or removed (not root, leftovers, a busy subnet)."""

    __test__ = False  # not a pytest test class, despite the name


class SpecError(TestbedError):
    """A testbed spec is malformed; the message names the offending field."""
