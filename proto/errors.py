"""The errors of the wire: a message, a tensor stream or a value on it that cannot be read.

Each says what is wrong and where, for the caller to put in its refusal. The OP-DAG layer's
`CodecError` is a `WireError` too, so a servicer refuses both the same way.
"""


class WireError(Exception):
    """A tensor, value or stream on the wire is corrupt, truncated or inconsistent with its
    own description."""


class StreamError(WireError):
    """A header-then-chunks stream's messages come in the wrong order, or not at all."""
