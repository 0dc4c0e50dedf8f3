"""Data sources: named corpora whose batches are pure functions of (seed, step).

`build_source` binds a corpus to a batch size (and, for text, a context length) and gives
the object trainers use: `.batch(step)`, `.val_batches(n)`, `.fingerprint`, `.input_names`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from opdag.errors import OpDagError

if TYPE_CHECKING:
    from opdag.data.dataset import ArraySource, StoredDataset, TokenSource


class DataError(OpDagError, ValueError):
    """A data config is invalid, or a source cannot supply what was asked of it."""


# The corpus modules import DataError from here, so they are imported after it exists.
from opdag.data.images import SyntheticShapes  # noqa: E402
from opdag.data.text import StdlibText  # noqa: E402

Batch = dict[str, torch.Tensor]

CORPUS_NAMES: tuple[str, ...] = ("stdlib-text", "synthetic-shapes")
CORPUS_KINDS: dict[str, str] = {"stdlib-text": "text", "synthetic-shapes": "image"}


@dataclass(frozen=True)
class DataConfig:
    """Which corpus (or stored dataset) to read and how to batch it; `batch_size` is the
    full (global) batch, cut into `micro_batches` equal micro-batches by the trainer."""

    corpus: str = ""
    batch_size: int = 16
    micro_batches: int = 1
    seed: int = 0
    max_bytes: int = 8_000_000  # text corpora only: how much of the corpus to read
    # -- users' own data: a dataset put with `archipelago data put` (in place of a corpus)
    dataset: str = ""

    def __post_init__(self) -> None:
        if self.dataset:
            from opdag.data.manifest import check_dataset_name

            check_dataset_name(self.dataset)
            if self.corpus:
                raise DataError("data: give a corpus or a dataset, not both")
        elif self.corpus not in CORPUS_NAMES:
            raise DataError(
                f"data: corpus={self.corpus!r} is unknown; corpora: {', '.join(CORPUS_NAMES)}"
                " (or name a dataset: data.dataset)"
            )
        for name in ("batch_size", "micro_batches", "seed", "max_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise DataError(f"data: {name}={value!r} must be an int")
        for name in ("batch_size", "micro_batches", "max_bytes"):
            if getattr(self, name) < 1:
                raise DataError(f"data: {name}={getattr(self, name)} must be >= 1")
        if self.seed < 0:
            raise DataError(f"data: seed={self.seed} must be >= 0")
        if self.batch_size % self.micro_batches:
            raise DataError(
                f"data: batch_size={self.batch_size} is not divisible by "
                f"micro_batches={self.micro_batches}"
            )

    @property
    def kind(self) -> str:
        """The kind of model this corpus feeds: "text" or "image" ("dataset" for a stored
        dataset: its manifest says, at submission)."""
        return "dataset" if self.dataset else CORPUS_KINDS[self.corpus]

    @property
    def micro_batch_size(self) -> int:
        """Samples in one micro-batch."""
        return self.batch_size // self.micro_batches


class DataSource(Protocol):
    """What a trainer needs from a data source."""

    @property
    def input_names(self) -> tuple[str, ...]: ...

    @property
    def fingerprint(self) -> str: ...

    def batch(self, step: int) -> Batch: ...

    def val_batches(self, n: int) -> list[Batch]: ...


class TextSource:
    """`stdlib-text` bound to a batch size and context length."""

    def __init__(self, cfg: DataConfig, context: int) -> None:
        self.cfg = cfg
        self.context = context
        self.corpus = StdlibText(seed=cfg.seed, max_bytes=cfg.max_bytes)
        self.input_names: tuple[str, ...] = StdlibText.input_names
        self.fingerprint: str = self.corpus.fingerprint

    @property
    def train_bytes(self) -> int:
        """Size of the training split, in bytes (= tokens)."""
        return int(self.corpus.train.numel())

    def batch(self, step: int) -> Batch:
        """The full training batch of `step`."""
        return self.corpus.batch(step, self.cfg.batch_size, self.context)

    def val_batches(self, n: int) -> list[Batch]:
        """`n` fixed full-size validation batches."""
        return self.corpus.val_batches(n, self.cfg.batch_size, self.context)


class ImageSource:
    """`synthetic-shapes` bound to a batch size."""

    def __init__(self, cfg: DataConfig) -> None:
        self.cfg = cfg
        self.corpus = SyntheticShapes(seed=cfg.seed)
        self.input_names: tuple[str, ...] = SyntheticShapes.input_names
        self.fingerprint: str = self.corpus.fingerprint

    def batch(self, step: int) -> Batch:
        """The full training batch of `step`."""
        return self.corpus.batch(step, self.cfg.batch_size)

    def val_batches(self, n: int) -> list[Batch]:
        """`n` fixed full-size validation batches."""
        return self.corpus.val_batches(n, self.cfg.batch_size)


def build_source(
    cfg: DataConfig, *, context: int | None = None, dataset: StoredDataset | None = None
) -> TextSource | ImageSource | TokenSource | ArraySource:
    """The data source of `cfg`; text corpora need the model's `context` length, a stored
    dataset its chunks (`dataset`: the worker's cache, or the coordinator's store)."""
    if cfg.dataset:  # -- users' own data (`opdag.data.dataset`)
        from opdag.data.dataset import dataset_source

        if dataset is None:
            raise DataError(f"data: dataset {cfg.dataset!r} needs its stored chunks")
        return dataset_source(cfg, dataset, context=context)
    if cfg.kind == "text":
        if context is None:
            raise DataError(f"data: corpus {cfg.corpus!r} needs a context length")
        if isinstance(context, bool) or not isinstance(context, int) or context < 1:
            raise DataError(f"data: context={context!r} must be a positive int")
        return TextSource(cfg, context)
    return ImageSource(cfg)


def split_micro_batches(batch: Batch, m: int) -> list[Batch]:
    """Cut a batch into `m` equal micro-batches along dim 0 (in order)."""
    if m < 1:
        raise DataError(f"micro_batches={m} must be >= 1")
    sizes = {name: t.size(0) for name, t in batch.items()}
    if len(set(sizes.values())) > 1:
        raise DataError(f"batch tensors disagree on their batch size: {sizes}")
    for name, size in sizes.items():
        if size % m:
            raise DataError(f"batch[{name!r}] has {size} rows, not divisible by micro_batches={m}")
    pieces = {name: t.split(t.size(0) // m) for name, t in batch.items()}
    return [{name: pieces[name][i] for name in batch} for i in range(m)]


def replica_micro_batches(batch: Batch, m: int, replicas: int, replica: int) -> list[Batch]:
    """Replica `replica`'s share of a step's `m` micro-batches: micro-batches
    r*m/R .. (r+1)*m/R - 1, so the shares of all replicas are exactly the batch, in order."""
    if replicas < 1 or not 0 <= replica < replicas:
        raise DataError(f"replica {replica} of {replicas} is out of range")
    if m % replicas:
        raise DataError(f"micro_batches={m} do not split over {replicas} replicas")
    share = m // replicas
    return split_micro_batches(batch, m)[replica * share : (replica + 1) * share]


__all__ = [
    "CORPUS_NAMES",
    "Batch",
    "DataConfig",
    "DataError",
    "DataSource",
    "ImageSource",
    "TextSource",
    "build_source",
    "replica_micro_batches",
    "split_micro_batches",
]
