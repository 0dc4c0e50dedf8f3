"""The error a compressed tensor raises when it cannot be trusted."""

from __future__ import annotations

from opdag.errors import CodecError


class PayloadError(CodecError):
    """A compressed tensor is corrupt, truncated or disagrees with its own header.

    A subclass of the OP-DAG layer's `CodecError`, so code that already refuses bad
    serialised tensors refuses bad compressed ones the same way.
    """
