"""Errors of the WAN testbed. The `archipelago` command prints each as one
`archipelago: error: ...` line and exits 2."""


class TestbedError(Exception):
    """The testbed cannot be built, reached or removed (not root, leftovers, a busy subnet)."""

    __test__ = False  # not a pytest test class, despite the name


class SpecError(TestbedError):
    """A testbed spec is malformed; the message names the offending field."""
