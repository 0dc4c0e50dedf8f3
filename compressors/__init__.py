"""Tensor compressors for slow links: pure functions of tensors, no network.

A `Compressor` turns a tensor into a self-describing `Payload` and back; `build_compressor`
picks one from a small spec. `ErrorFeedback` keeps what lossy compression dropped, per
edge; `KeptMask` is the backward rule of a sparsified edge; `payload_to_wire` and
`payload_from_wire` (or `decode_wire`) are the one wire form, a flat `WireHeader` + bytes,
that the network layer sends (`masked_payload_to_wire` and `masked_payload_from_wire` for a
gradient at its forward's kept entries, positions left out); `choose_link_compression` is
the AdaTopK per-link policy. Every refusal of bad input is a `PayloadError` (a
`ValueError`) or, for bad settings, a plain `ValueError`.
"""

from compressors.adatopk import (
    AdaTopKConfig,
    LinkCompression,
    choose_link_compression,
    compressed_wire_bytes,
)
from compressors.compressor import Compressor
from compressors.encoding import (
    DEFAULT_MAX_ELEMENTS,
    decode_payload,
    dense_wire_bytes,
    encode_dense,
    encode_sparse,
    kept_indices,
    sparse_wire_bytes,
)
from compressors.errors import PayloadError
from compressors.feedback import ErrorFeedback
from compressors.gradient_mask import KeptMask
from compressors.payload import ENCODINGS, Payload
from compressors.quantizers import Fp16Quantizer, Int8Quantizer, NoCompression
from compressors.selection import kept_count
from compressors.sparsifiers import RandomK, SampledTopK, Sparsifier, TopK
from compressors.spec import COMPRESSORS, build_compressor
from compressors.wire import (
    HEADER_FIELDS,
    WireHeader,
    decode_wire,
    masked_payload_from_wire,
    masked_payload_to_wire,
    payload_from_wire,
    payload_to_wire,
)

__all__ = [
    "COMPRESSORS",
    "DEFAULT_MAX_ELEMENTS",
    "ENCODINGS",
    "HEADER_FIELDS",
    "AdaTopKConfig",
    "Compressor",
    "ErrorFeedback",
    "Fp16Quantizer",
    "Int8Quantizer",
    "KeptMask",
    "LinkCompression",
    "NoCompression",
    "Payload",
    "PayloadError",
    "RandomK",
    "SampledTopK",
    "Sparsifier",
    "TopK",
    "WireHeader",
    "build_compressor",
    "choose_link_compression",
    "compressed_wire_bytes",
    "decode_payload",
    "decode_wire",
    "dense_wire_bytes",
    "encode_dense",
    "encode_sparse",
    "kept_count",
    "kept_indices",
    "masked_payload_from_wire",
    "masked_payload_to_wire",
    "payload_from_wire",
    "payload_to_wire",
    "sparse_wire_bytes",
]
