"""Errors of the OP-DAG layer. Each says what is wrong and where, for a user to act on."""

from proto.errors import WireError


class OpDagError(Exception):
    """Base of every error the OP-DAG layer raises on bad input."""


class CaptureError(OpDagError):
    """A model cannot be captured (untraceable, or uses an operator outside the allow-list)."""


class IRError(OpDagError):
    """A graph is malformed: dangling references, unknown operators, invalid attributes."""


class CodecError(OpDagError, WireError):
    """A serialised graph or tensor is corrupt, truncated or inconsistent (a `WireError`
    too: the wire refuses it like its own)."""


class PartitionError(OpDagError):
    """A node-to-stage assignment cannot be executed (incomplete, non-convex, cyclic)."""
