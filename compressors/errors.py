"""The error a compressed tensor raises when it cannot be trusted."""

from __future__ import annotations


class PayloadError(ValueError):
    """A compressed tensor is corrupt, truncated or disagrees with its own header.

    A `ValueError` of the compressors' own: the layer that receives compressed tensors
    (the worker's edge compression) turns it into its own refusal, naming the value.
    """
