"""The wire: the one package both services (and the user's client) share.

Beside the `.proto` schemas and the `*_pb2*.py` modules generated from them by
`make proto` (never edited): the gRPC conventions (`rpc`: tokens, size limits, TLS
channels, aborts), tensor streaming (`tensor_stream`: tensor headers, chunks, named
values), header-then-chunks request streams (`streams`), bounded retries (`retry`), the
dtype table (`dtypes`) and the wire's errors (`errors`). It imports nothing of ours.

Outside this package only the serde modules touch generated classes:
`opdag.graph_serde` (the IR), `coordinator.serde`, `worker.serde` and `archipelago.serde`.
"""
