"""`stdlib-text`: a byte-level language-modelling corpus made of the Python standard
library's own `.py` sources, so every machine with the same Python has it without a
download.

Batches are a pure function of (seed, step): any worker can produce step k's batch
without producing steps 0..k-1, and `fingerprint` lets workers check they hold the same
bytes.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from opdag.data import DataError

# Directories that are not library code (test suites, installed packages, build configs).
_SKIP_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib-dynload"}
)
VAL_EVERY = 20  # every 20th file (in sorted order) is held out for validation


def stdlib_root() -> Path:
    """Where this interpreter's standard library sources lie."""
    return Path(sysconfig.get_paths()["stdlib"])


def _is_skipped_dir(name: str) -> bool:
    return name in _SKIP_DIRS or name.startswith(("test_", "config-"))


def _is_source_file(name: str) -> bool:
    # _sysconfigdata describes this machine's build, so it would differ between workers.
    return name.endswith(".py") and not name.startswith(("test_", "_sysconfigdata"))


def list_stdlib_sources(root: Path) -> list[str]:
    """Relative POSIX paths of the library's `.py` sources, tests excluded, sorted."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruning in place keeps os.walk out of the (large) test and site-packages trees.
        dirnames[:] = [d for d in dirnames if not _is_skipped_dir(d)]
        rel = Path(dirpath).relative_to(root)
        found.extend((rel / f).as_posix() for f in filenames if _is_source_file(f))
    return sorted(found)


@dataclass(frozen=True)
class CorpusFiles:
    """The bytes of a corpus split into train and validation parts, with their file names."""

    train: bytes
    val: bytes
    train_files: tuple[str, ...]
    val_files: tuple[str, ...]


@functools.lru_cache(maxsize=4)
def load_stdlib_corpus(max_bytes: int, root: str | None = None) -> CorpusFiles:
    """Read sources in sorted order until `max_bytes` (the last file is cut), then hold
    out every VAL_EVERY-th file. Kept in memory only, for the life of the process."""
    base = Path(root) if root is not None else stdlib_root()
    train: list[bytes] = []
    val: list[bytes] = []
    train_files: list[str] = []
    val_files: list[str] = []
    total = 0
    for index, rel in enumerate(list_stdlib_sources(base)):
        if total >= max_bytes:
            break
        content = (base / rel).read_bytes()[: max_bytes - total]
        total += len(content)
        # Index 0 is held out, so even a small cap leaves a validation file.
        if index % VAL_EVERY == 0:
            val.append(content)
            val_files.append(rel)
        else:
            train.append(content)
            train_files.append(rel)
    return CorpusFiles(b"".join(train), b"".join(val), tuple(train_files), tuple(val_files))


def stream_seed(seed: int, stream: str, index: int) -> int:
    """A 63-bit generator seed derived from (seed, stream, index), distinct per triple."""
    digest = hashlib.sha256(f"{seed}/{stream}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _byte_tensor(data: bytes) -> torch.Tensor:
    if not data:  # torch.frombuffer refuses an empty buffer
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _windows(
    data: torch.Tensor, generator: torch.Generator, batch_size: int, context: int
) -> dict[str, torch.Tensor]:
    starts = torch.randint(0, data.numel() - context, (batch_size,), generator=generator)
    index = starts.unsqueeze(1) + torch.arange(context + 1)
    window = data[index].long()  # [B, T+1]
    return {"tokens": window[:, :-1].contiguous(), "targets": window[:, 1:].contiguous()}


class StdlibText:
    """The `stdlib-text` corpus: random byte windows from train files, fixed ones from
    validation files."""

    input_names = ("tokens", "targets")

    def __init__(self, *, seed: int = 0, max_bytes: int = 8_000_000, root: str | None = None):
        files = load_stdlib_corpus(max_bytes, root)
        self.seed = seed
        self.files = files
        self.train = _byte_tensor(files.train)
        self.val = _byte_tensor(files.val)
        digest = hashlib.sha256()
        # Lengths are hashed too, so moving a file across the split changes the fingerprint.
        for part in (files.train, files.val):
            digest.update(len(part).to_bytes(8, "little"))
            digest.update(part)
        self.fingerprint = digest.hexdigest()

    def _check_context(self, context: int, part: torch.Tensor, name: str) -> None:
        if context < 1:
            raise DataError(f"stdlib-text: context={context} must be >= 1")
        if part.numel() <= context:
            raise DataError(
                f"stdlib-text: the {name} split has {part.numel()} bytes, too few for "
                f"context={context}; raise max_bytes"
            )

    def batch(self, step: int, batch_size: int, context: int) -> dict[str, torch.Tensor]:
        """Training batch `step`: int64 tokens [B, T] and targets (tokens shifted by one)."""
        self._check_context(context, self.train, "train")
        generator = torch.Generator().manual_seed(stream_seed(self.seed, "train", step))
        return _windows(self.train, generator, batch_size, context)

    def val_batches(self, n: int, batch_size: int, context: int) -> list[dict[str, torch.Tensor]]:
        """`n` fixed validation batches; they do not depend on the seed, so runs with
        different seeds are judged on the same bytes."""
        self._check_context(context, self.val, "validation")
        batches = []
        for i in range(n):
            generator = torch.Generator().manual_seed(stream_seed(0, "val", i))
            batches.append(_windows(self.val, generator, batch_size, context))
        return batches
