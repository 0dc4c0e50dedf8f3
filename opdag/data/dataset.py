"""A user's stored dataset as a data source: batches a pure function of (seed, step).

`StoredDataset` reads byte ranges of a dataset's stream through a chunk reader (the
worker's verified disk cache, or the coordinator's store), chunk by chunk, keeping the
recently read chunks in memory. `TokenSource` draws context windows from a token
dataset exactly as `stdlib-text` does (`opdag.data.text`): training windows from the
first rows, validation windows from the held-out last `val_rows` tokens; `ArraySource`
draws rows of an array dataset the same way. `chunks_for_steps` says which chunks the
batches of a run of steps read, so a worker fetches only those.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable

import numpy as np
import torch

from opdag.data import DataConfig, DataError
from opdag.data.manifest import CHUNK_BYTES, ArrayInfo, Manifest
from opdag.data.text import stream_seed

# Past this many steps a run's batches are taken to read every training chunk.
MAX_STEPS_SCANNED = 20_000
CACHED_CHUNKS = 64

ChunkReader = Callable[[int], bytes]


class StoredDataset:
    """A manifest and a way to read its chunks (each already verified by the reader)."""

    def __init__(self, manifest: Manifest, read_chunk: ChunkReader) -> None:
        self.manifest = manifest
        self._read_chunk = read_chunk
        self._chunks: collections.OrderedDict[int, bytes] = collections.OrderedDict()

    def _chunk(self, index: int) -> bytes:
        if index in self._chunks:
            self._chunks.move_to_end(index)
            return self._chunks[index]
        data = self._read_chunk(index)
        if len(data) != self.manifest.chunks[index][1]:
            raise DataError(f"dataset {self.manifest.name!r}: chunk {index} has the wrong size")
        self._chunks[index] = data
        while len(self._chunks) > CACHED_CHUNKS:
            self._chunks.popitem(last=False)
        return data

    def read(self, start: int, end: int) -> bytes:
        """Bytes [start, end) of the stream."""
        parts = []
        at = start
        while at < end:
            index, within = divmod(at, CHUNK_BYTES)
            chunk = self._chunk(index)
            take = min(end - at, len(chunk) - within)
            parts.append(chunk[within : within + take])
            at += take
        return b"".join(parts)

    def rows(self, array: ArrayInfo, first: int, count: int) -> np.ndarray:
        """Rows [first, first + count) of `array`, as a numpy array of its stored dtype."""
        start = array.offset + first * array.row_bytes
        raw = self.read(start, start + count * array.row_bytes)
        flat = np.frombuffer(raw, dtype=np.dtype(array.dtype).newbyteorder("<"))
        return flat.reshape((count, *array.shape[1:]))


def chunk_span(array: ArrayInfo, first: int, count: int) -> range:
    """The chunk indices rows [first, first + count) of `array` lie in."""
    start = array.offset + first * array.row_bytes
    end = start + count * array.row_bytes
    return range(start // CHUNK_BYTES, (end - 1) // CHUNK_BYTES + 1)


def _within_bounds(m: Manifest, a: ArrayInfo, values: np.ndarray) -> np.ndarray:
    """`values` of integer array `a`, if within the bounds its manifest gives."""
    if a.dtype.startswith("float") or values.size == 0:
        return values
    low, high = int(values.min()), int(values.max())
    if low < a.low or high > a.high:
        raise DataError(
            f"dataset {m.name!r}: {a.name} values {low}..{high} are outside its manifest's "
            f"bounds {a.low}..{a.high}"
        )
    return values


def _as_torch(rows: np.ndarray) -> torch.Tensor:
    # Integers become int64 (indices, class labels), floats float32.
    if rows.dtype.kind == "f":
        return torch.from_numpy(rows.astype(np.float32))
    return torch.from_numpy(rows.astype(np.int64))


class TokenSource:
    """A token dataset bound to a batch size and context length."""

    def __init__(self, cfg: DataConfig, context: int, dataset: StoredDataset) -> None:
        m = dataset.manifest
        if m.kind != "tokens":
            raise DataError(f"dataset {m.name!r} holds arrays, not tokens")
        self.cfg, self.context, self.dataset = cfg, context, dataset
        self.tokens = m.array("tokens")
        self.input_names: tuple[str, ...] = m.fields
        self.fingerprint: str = m.sha256
        check_token_split(m, context)

    def _starts(self, generator: torch.Generator, low: int, high: int) -> torch.Tensor:
        return low + torch.randint(
            0, high - low - self.context, (self.cfg.batch_size,), generator=generator
        )

    def _train_starts(self, step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(stream_seed(self.cfg.seed, "train", step))
        return self._starts(g, 0, self.dataset.manifest.train_rows)

    def _val_starts(self, i: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(stream_seed(0, "val", i))
        m = self.dataset.manifest
        return self._starts(g, m.train_rows, m.rows)

    def _windows(self, starts: torch.Tensor) -> dict[str, torch.Tensor]:
        rows = [self.dataset.rows(self.tokens, int(s), self.context + 1) for s in starts]
        m = self.dataset.manifest
        window = _as_torch(_within_bounds(m, self.tokens, np.stack(rows)))
        first, second = self.input_names
        return {first: window[:, :-1].contiguous(), second: window[:, 1:].contiguous()}

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        """The full training batch of `step`: int64 windows [B, T] and their shift."""
        return self._windows(self._train_starts(step))

    def val_batches(self, n: int) -> list[dict[str, torch.Tensor]]:
        """`n` fixed batches from the held-out tokens (independent of the seed)."""
        return [self._windows(self._val_starts(i)) for i in range(n)]

    def chunks_of(self, starts: Iterable[int]) -> set[int]:
        out: set[int] = set()
        for s in starts:
            out.update(chunk_span(self.tokens, int(s), self.context + 1))
        return out

    def chunks_for_steps(self, first: int, end: int) -> set[int]:
        """The chunks the training batches of steps [first, end) read."""
        every = set(chunk_span(self.tokens, 0, self.dataset.manifest.train_rows))
        return _scan_rows(self.chunks_of, self._train_starts, every, first, end)

    def val_chunks(self, n: int) -> set[int]:
        return self.chunks_of(s for i in range(n) for s in self._val_starts(i).tolist())


class ArraySource:
    """An array dataset bound to a batch size: rows drawn per (seed, step)."""

    def __init__(self, cfg: DataConfig, dataset: StoredDataset) -> None:
        m = dataset.manifest
        if m.kind != "arrays":
            raise DataError(f"dataset {m.name!r} holds tokens, not arrays")
        self.cfg, self.dataset = cfg, dataset
        self.input_names: tuple[str, ...] = m.input_names
        self.fingerprint: str = m.sha256

    def _rows(self, generator: torch.Generator, low: int, high: int) -> torch.Tensor:
        return low + torch.randint(0, high - low, (self.cfg.batch_size,), generator=generator)

    def _train_rows(self, step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(stream_seed(self.cfg.seed, "train", step))
        return self._rows(g, 0, self.dataset.manifest.train_rows)

    def _val_rows(self, i: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(stream_seed(0, "val", i))
        m = self.dataset.manifest
        return self._rows(g, m.train_rows, m.rows)

    def _gather(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        m = self.dataset.manifest
        for a in m.arrays:
            values = np.stack([self.dataset.rows(a, int(r), 1)[0] for r in rows])
            out[a.name] = _as_torch(_within_bounds(m, a, values))
        return out

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        """The full training batch of `step`: rows of every array (ints int64, floats float32)."""
        return self._gather(self._train_rows(step))

    def val_batches(self, n: int) -> list[dict[str, torch.Tensor]]:
        """`n` fixed batches of held-out rows (independent of the seed)."""
        return [self._gather(self._val_rows(i)) for i in range(n)]

    def chunks_of(self, rows: Iterable[int]) -> set[int]:
        out: set[int] = set()
        for r in rows:
            for a in self.dataset.manifest.arrays:
                out.update(chunk_span(a, int(r), 1))
        return out

    def chunks_for_steps(self, first: int, end: int) -> set[int]:
        """The chunks the training batches of steps [first, end) read."""
        m = self.dataset.manifest
        every: set[int] = set()
        for a in m.arrays:
            every.update(chunk_span(a, 0, m.train_rows))
        return _scan_rows(self.chunks_of, self._train_rows, every, first, end)

    def val_chunks(self, n: int) -> set[int]:
        return self.chunks_of(r for i in range(n) for r in self._val_rows(i).tolist())


def _scan_rows(
    chunks_of: Callable[[Iterable[int]], set[int]],
    draw: Callable[[int], torch.Tensor],
    every: set[int],
    first: int,
    end: int,
) -> set[int]:
    """The chunks the draws of steps [first, end) touch; all of `every` once they touch it
    all or the run is too long to scan."""
    if end - first > MAX_STEPS_SCANNED:
        return set(every)
    out: set[int] = set()
    for step in range(first, end):
        out |= chunks_of(draw(step).tolist())
        if out >= every:
            break
    return out


def check_token_split(m: Manifest, context: int) -> None:
    """DataError unless both splits of a token dataset hold more than `context` tokens."""
    for part, size in (("training", m.train_rows), ("held-out", m.val_rows)):
        if size <= context:
            raise DataError(
                f"dataset {m.name!r}: its {part} split has {size} tokens, too few for "
                f"context {context} (the last {m.val_rows} of {m.rows} tokens are held out)"
            )


def dataset_source(
    cfg: DataConfig, dataset: StoredDataset, *, context: int | None
) -> TokenSource | ArraySource:
    """The source of a stored dataset; a token dataset needs the model's context."""
    if dataset.manifest.kind == "tokens":
        if context is None:
            raise DataError(
                f"dataset {dataset.manifest.name!r} holds tokens: the model needs a context length"
            )
        return TokenSource(cfg, context, dataset)
    return ArraySource(cfg, dataset)


def check_fits(
    m: Manifest,
    example: dict[str, torch.Tensor],
    *,
    vocab: int | None,
    context: int | None,
    below: dict[str, int] | None = None,
) -> None:
    """DataError unless dataset `m` feeds a model whose data inputs are shaped and typed as
    the batch `example` (any batch size), with token ids below `vocab` (None: unknown) and
    each integer input named in `below` below its bound there (class labels)."""
    given, wanted = sorted(m.input_names), sorted(example)
    if given != wanted:
        how = (
            "name its fields at put: --rename tokens=A,targets=B"
            if m.kind == "tokens"
            else ("name its arrays at put: --rename OLD=NEW")
        )
        raise DataError(
            f"dataset {m.name!r} holds {', '.join(given)} but the model takes "
            f"{', '.join(wanted)} ({how})"
        )
    if m.kind == "tokens":
        if context is None:
            raise DataError(f"dataset {m.name!r} holds tokens, but the model has no context length")
        if vocab is not None and m.vocab > vocab:
            raise DataError(
                f"dataset {m.name!r} has token ids up to {m.vocab - 1}, beyond the model's "
                f"vocab of {vocab}"
            )
        for name in m.fields:
            if example[name].is_floating_point():
                raise DataError(f"the model takes floats for {name!r}, not token ids")
        check_token_split(m, context)
        return
    for a in m.arrays:
        want = example[a.name]
        if tuple(want.shape[1:]) != a.shape[1:]:
            raise DataError(
                f"dataset {m.name!r}: array {a.name!r} rows are {list(a.shape[1:])}, the "
                f"model takes {list(want.shape[1:])}"
            )
        is_float = a.dtype.startswith("float")
        if is_float != want.is_floating_point():
            kind = "floats" if want.is_floating_point() else "integers"
            raise DataError(
                f"dataset {m.name!r}: array {a.name!r} holds {a.dtype}, the model takes {kind}"
            )
        bound = (below or {}).get(a.name)
        if bound is not None and not is_float and (a.low < 0 or a.high >= bound):
            raise DataError(
                f"dataset {m.name!r}: array {a.name!r} holds {a.low}..{a.high}, the model "
                f"takes 0..{bound - 1}"
            )
