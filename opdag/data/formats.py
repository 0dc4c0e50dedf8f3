"""A user's data file turned into a dataset's canonical stream and manifest, on the client.

The format is decided here, once (from `--format` or the file's suffix), and the file is
converted to the one stored form workers read (`opdag.data.manifest`):

- `text` (.txt, .text, .md): UTF-8 text, one token per byte (vocab 256, like `stdlib-text`);
- `jsonl` (.jsonl, .ndjson): one JSON object a line with a text field; its texts joined by
  newlines, byte-level, or each encoded with a `tokenizers` tokenizer file;
- `npy`: a 1-D array of non-negative integer token ids;
- `bin`: raw little-endian uint16 token ids, as nanoGPT-style trainers write them;
- `npz`: named arrays of equal rows (inputs and labels); never unpickled.

Everything is checked first: a file that fails is refused with one line naming what is
wrong, before anything is sent.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from opdag.data import DataError
from opdag.data.manifest import (
    DTYPES,
    MAX_ARRAYS,
    ArrayInfo,
    Manifest,
    check_dataset_name,
    chunk_stream,
)

SUFFIXES: dict[str, str] = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".npy": "npy",
    ".bin": "bin",
    ".npz": "npz",
}
FORMAT_NAMES = ("text", "jsonl", "npy", "bin", "npz")
# The held-out share of a dataset's rows (tokens), at least one.
VAL_PERCENT = 5
TOKEN_FIELDS = ("tokens", "targets")


@dataclass(frozen=True)
class Prepared:
    """A dataset ready to upload: its manifest and the stream its chunks cut."""

    manifest: Manifest
    stream: bytes


def held_out(rows: int) -> int:
    """How many of `rows` the held-out split takes: VAL_PERCENT %, at least one."""
    if rows < 2:
        raise DataError(f"a dataset needs at least 2 rows (one held out), not {rows}")
    return max(1, rows * VAL_PERCENT // 100)


def detect_format(path: Path, given: str | None) -> str:
    if given is not None:
        if given not in FORMAT_NAMES:
            raise DataError(f"unknown format {given!r} (formats: {', '.join(FORMAT_NAMES)})")
        return given
    fmt = SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            f"{str(path)!r}: cannot tell the format from the name (suffixes: "
            f"{', '.join(SUFFIXES)}); pass --format {'|'.join(FORMAT_NAMES)}"
        )
    return fmt


def _token_dtype(vocab: int) -> str:
    if vocab <= 256:
        return "uint8"
    return "uint16" if vocab <= 65536 else "int32"


def token_dataset(
    ids: np.ndarray,
    *,
    name: str,
    fmt: str,
    vocab: int | None,
    fields: tuple[str, str] = TOKEN_FIELDS,
) -> Prepared:
    """A token dataset of the 1-D integer `ids`; `vocab` None: the largest id + 1."""
    if ids.ndim != 1:
        raise DataError(f"token ids must be 1-D, not of shape {list(ids.shape)}")
    if ids.dtype.kind not in "iu":
        raise DataError(f"token ids must be integers, not {ids.dtype}")
    if ids.size < 2:
        raise DataError(f"{ids.size} tokens are too few for a dataset")
    low, high = int(ids.min()), int(ids.max())
    if low < 0:
        raise DataError(f"token id {low} is negative")
    if vocab is None:
        vocab = high + 1
    elif high >= vocab:
        raise DataError(f"token id {high} is not below the vocab {vocab}")
    if vocab > 2**31 - 1:
        raise DataError(f"vocab {vocab} exceeds 2**31 - 1")
    dtype = _token_dtype(vocab)
    stream = ids.astype(np.dtype(dtype).newbyteorder("<"), copy=False).tobytes()
    manifest = Manifest(
        name=name,
        kind="tokens",
        format=fmt,
        arrays=(ArrayInfo("tokens", dtype, (int(ids.size),), 0, low, high),),
        chunks=tuple(chunk_stream(stream)),
        val_rows=held_out(int(ids.size)),
        vocab=vocab,
        fields=fields,
    )
    return Prepared(manifest, stream)


def array_dataset(arrays: Mapping[str, np.ndarray], *, name: str, fmt: str = "npz") -> Prepared:
    """An array dataset of named arrays of equal rows, stored in name order."""
    if not 1 <= len(arrays) <= MAX_ARRAYS:
        raise DataError(f"a dataset holds 1 to {MAX_ARRAYS} arrays, not {len(arrays)}")
    infos, parts, offset = [], [], 0
    for key in sorted(arrays):
        a = arrays[key]
        dtype = a.dtype.name
        if dtype not in DTYPES:
            raise DataError(f"array {key!r}: dtype {a.dtype} is not one of {', '.join(DTYPES)}")
        if a.ndim < 1:
            raise DataError(f"array {key!r} is a scalar: it needs rows")
        if a.size == 0:
            raise DataError(f"array {key!r} is empty")
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise DataError(f"array {key!r} holds values that are not finite")
        raw = np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
        low, high = (0, 0) if a.dtype.kind == "f" else (int(a.min()), int(a.max()))
        infos.append(ArrayInfo(key, dtype, tuple(int(d) for d in a.shape), offset, low, high))
        parts.append(raw)
        offset += len(raw)
    rows = {i.name: i.rows for i in infos}
    if len(set(rows.values())) != 1:
        raise DataError(f"the arrays disagree on their rows: {rows}")
    stream = b"".join(parts)
    manifest = Manifest(
        name=name,
        kind="arrays",
        format=fmt,
        arrays=tuple(infos),
        chunks=tuple(chunk_stream(stream)),
        val_rows=held_out(infos[0].rows),
    )
    return Prepared(manifest, stream)


def _text_bytes(path: Path, raw: bytes) -> bytes:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{str(path)!r} is not UTF-8 text (byte {e.start})") from None
    return raw


def _jsonl_texts(path: Path, raw: bytes, field: str) -> list[str]:
    texts = []
    for number, line in enumerate(_text_bytes(path, raw).decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise DataError(f"{str(path)!r} line {number}: not JSON ({e})") from None
        text = record.get(field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise DataError(f"{str(path)!r} line {number}: no text field {field!r}")
        texts.append(text)
    if not texts:
        raise DataError(f"{str(path)!r} holds no records")
    return texts


def _tokenize(texts: list[str], tokenizer: Path) -> tuple[np.ndarray, int]:
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise DataError(
            "--tokenizer needs the `tokenizers` package (pip install tokenizers)"
        ) from None
    try:
        tok = Tokenizer.from_file(str(tokenizer))
    except Exception as e:  # the library raises its own exception types for a bad file
        reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise DataError(f"--tokenizer {str(tokenizer)!r} cannot be read: {reason}") from None
    ids = [i for enc in tok.encode_batch(texts) for i in enc.ids]
    return np.asarray(ids, dtype=np.int64), int(tok.get_vocab_size(with_added_tokens=True))


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {key: z[key] for key in z.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise DataError(f"{str(path)!r} is not an .npz of plain arrays: {reason}") from None


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise DataError(f"{str(path)!r} is not an .npy of a plain array: {reason}") from None


def read_dataset(
    path: str | Path,
    *,
    name: str | None = None,
    fmt: str | None = None,
    text_field: str = "text",
    tokenizer: str | Path | None = None,
    vocab: int | None = None,
    rename: Mapping[str, str] | None = None,
) -> Prepared:
    """The dataset in file `path` (see the module's docstring). `name` defaults to the
    file's stem; `rename` maps stored names (an array's, or a token dataset's `tokens` and
    `targets`) to the model's input names."""
    path = Path(path)
    name = check_dataset_name(name if name is not None else path.stem)
    fmt = detect_format(path, fmt)
    if tokenizer is not None and fmt != "jsonl" and fmt != "text":
        raise DataError(f"--tokenizer applies to text and jsonl files, not {fmt}")
    if vocab is not None and (vocab < 1 or fmt not in ("npy", "bin")):
        raise DataError(f"--vocab {vocab} applies to npy and bin files only (a positive int)")
    if not path.is_file():
        raise DataError(f"{str(path)!r} is not a file")
    rename = dict(rename or {})
    if fmt == "npz":
        arrays = _load_npz(path)
        unknown = sorted(set(rename) - set(arrays))
        if unknown:
            raise DataError(f"--rename names {unknown}, which {str(path)!r} does not hold")
        return array_dataset({rename.get(k, k): v for k, v in arrays.items()}, name=name)
    unknown = sorted(set(rename) - set(TOKEN_FIELDS))
    if unknown:
        raise DataError(f"--rename names {unknown}; a token dataset has {', '.join(TOKEN_FIELDS)}")
    fields = (rename.get("tokens", "tokens"), rename.get("targets", "targets"))
    if fmt == "npy":
        ids = _load_npy(path)
    elif fmt == "bin":
        raw = path.read_bytes()
        if len(raw) % 2:
            raise DataError(f"{str(path)!r} has {len(raw)} bytes: not a whole number of uint16")
        ids = np.frombuffer(raw, dtype="<u2")
    else:
        raw = path.read_bytes()
        texts = (
            [_text_bytes(path, raw).decode()]
            if fmt == "text"
            else _jsonl_texts(path, raw, text_field)
        )
        if tokenizer is not None:
            ids, vocab = _tokenize(texts, Path(tokenizer))
        else:
            ids = np.frombuffer("\n".join(texts).encode(), dtype=np.uint8)
            vocab = 256
    return token_dataset(ids, name=name, fmt=fmt, vocab=vocab, fields=fields)


def describe(m: Manifest) -> str:
    """One line: what the dataset holds."""
    if m.kind == "tokens":
        what = f"{m.rows} tokens (vocab {m.vocab}), the last {m.val_rows} held out"
    else:
        shapes = ", ".join(f"{a.name} {a.dtype}{list(a.shape[1:])}" for a in m.arrays)
        what = f"{m.rows} rows of {shapes}, the last {m.val_rows} held out"
    return f"{m.format}: {what}; {len(m.chunks)} chunk(s), {m.total_bytes} bytes"


__all__ = ["FORMAT_NAMES", "Prepared", "describe", "held_out", "read_dataset"]
