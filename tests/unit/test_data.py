"""Data sources: per-step reproducibility, the text split, synthetic images, config errors."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from opdag.data import (
    CORPUS_NAMES,
    DataConfig,
    DataError,
    build_source,
    split_micro_batches,
)
from opdag.data.images import NUM_CLASSES, SyntheticShapes, draw_masks
from opdag.data.text import VAL_EVERY, StdlibText, list_stdlib_sources, stdlib_root

pytestmark = pytest.mark.unit

SMALL = 400_000  # bytes of corpus: enough for every test, quick to read


def text_source(seed: int = 0, batch_size: int = 4, context: int = 32) -> Any:
    return build_source(
        DataConfig("stdlib-text", batch_size=batch_size, seed=seed, max_bytes=SMALL),
        context=context,
    )


def test_text_batches_are_reproducible_per_step() -> None:
    a, b = text_source(), text_source()
    later_first = b.batch(7)
    for step in range(7):
        a.batch(step)
    for key in ("tokens", "targets"):
        assert torch.equal(a.batch(7)[key], later_first[key])
    assert not torch.equal(a.batch(7)["tokens"], a.batch(8)["tokens"])
    assert not torch.equal(a.batch(7)["tokens"], text_source(seed=1).batch(7)["tokens"])


def test_text_batch_windows_come_from_train_files_shifted_by_one() -> None:
    source = text_source(batch_size=6, context=24)
    batch = source.batch(3)
    tokens, targets = batch["tokens"], batch["targets"]
    assert tokens.shape == targets.shape == (6, 24)
    assert tokens.dtype == targets.dtype == torch.int64
    assert torch.equal(tokens[:, 1:], targets[:, :-1])
    train = source.corpus.files.train
    for row in range(6):
        window = bytes(tokens[row].tolist()) + bytes([int(targets[row, -1])])
        assert window in train


def test_text_corpus_reads_sorted_library_sources_without_tests() -> None:
    files = list_stdlib_sources(stdlib_root())
    assert files == sorted(files) and len(files) > 100
    assert "os.py" in files and "json/decoder.py" in files
    for path in files:
        parts = path.split("/")
        assert not {"test", "tests", "idle_test", "site-packages"} & set(parts), path
        assert path.endswith(".py") and not parts[-1].startswith("test_"), path


def test_text_validation_holds_out_every_20th_file() -> None:
    source = text_source()
    read = list_stdlib_sources(stdlib_root())
    corpus = source.corpus.files
    kept = list(corpus.val_files + corpus.train_files)
    assert set(kept) <= set(read)
    order = sorted(kept, key=read.index)
    assert list(corpus.val_files) == order[::VAL_EVERY]
    assert not set(corpus.val_files) & set(corpus.train_files)
    assert len(corpus.train) + len(corpus.val) == SMALL


def test_text_val_batches_are_fixed_and_from_held_out_bytes() -> None:
    source = text_source()
    first, again = source.val_batches(2), text_source(seed=9).val_batches(2)
    assert len(first) == 2
    for x, y in zip(first, again, strict=True):
        assert torch.equal(x["tokens"], y["tokens"]) and torch.equal(x["targets"], y["targets"])
    assert not torch.equal(first[0]["tokens"], first[1]["tokens"])
    for row in first[0]["tokens"]:
        assert bytes(row.tolist()) in source.corpus.files.val


def test_text_fingerprint_is_stable_and_tracks_the_bytes() -> None:
    a, b = text_source(), text_source(seed=3)
    assert a.fingerprint == b.fingerprint  # same bytes, different sampling
    assert len(a.fingerprint) == 64
    smaller = StdlibText(max_bytes=SMALL // 2)
    assert smaller.fingerprint != a.fingerprint


def test_text_source_rejects_a_corpus_too_small_for_the_context() -> None:
    source = build_source(DataConfig("stdlib-text", max_bytes=100), context=32)
    with pytest.raises(DataError, match="max_bytes"):
        source.batch(0)
    with pytest.raises(DataError, match="context=0"):
        text_source().corpus.batch(0, 2, 0)


def test_build_source_requires_context_for_text() -> None:
    with pytest.raises(DataError, match="context"):
        build_source(DataConfig("stdlib-text", max_bytes=SMALL))


def test_image_batches_are_reproducible_per_step_and_normalised() -> None:
    a = build_source(DataConfig("synthetic-shapes", batch_size=64))
    b = build_source(DataConfig("synthetic-shapes", batch_size=64))
    batch = a.batch(5)
    assert batch["images"].shape == (64, 3, 32, 32) and batch["images"].dtype == torch.float32
    assert batch["labels"].shape == (64,) and batch["labels"].dtype == torch.int64
    assert torch.equal(batch["images"], b.batch(5)["images"])
    assert torch.equal(batch["labels"], b.batch(5)["labels"])
    assert not torch.equal(batch["images"], a.batch(6)["images"])
    assert abs(batch["images"].mean().item()) < 0.3
    assert 0.6 < batch["images"].std().item() < 1.4
    assert a.fingerprint == b.fingerprint
    assert a.fingerprint != build_source(DataConfig("synthetic-shapes", seed=1)).fingerprint


def test_image_classes_are_all_drawn_and_differ() -> None:
    labels = SyntheticShapes().batch(0, 256)["labels"]
    assert set(labels.tolist()) == set(range(NUM_CLASSES))
    masks = draw_masks(8, torch.Generator().manual_seed(0))
    assert masks.shape == (NUM_CLASSES, 8, 32, 32) and masks.dtype == torch.bool
    covered = masks.float().mean((2, 3))
    assert torch.all(covered > 0.02) and torch.all(covered < 0.9)  # visible, not the whole image
    for i in range(NUM_CLASSES):
        for j in range(i + 1, NUM_CLASSES):
            assert not torch.equal(masks[i], masks[j]), (i, j)


def test_image_val_batches_are_fixed() -> None:
    first = SyntheticShapes(seed=0).val_batches(2, 8)
    again = SyntheticShapes(seed=4).val_batches(2, 8)
    for x, y in zip(first, again, strict=True):
        assert torch.equal(x["images"], y["images"]) and torch.equal(x["labels"], y["labels"])
    assert not torch.equal(first[0]["images"], first[1]["images"])


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"corpus": "wikitext"}, "corpus='wikitext'"),
        ({"corpus": "stdlib-text", "batch_size": 10, "micro_batches": 4}, "micro_batches=4"),
        ({"corpus": "stdlib-text", "batch_size": 0}, "batch_size=0"),
        ({"corpus": "stdlib-text", "batch_size": 8.0}, "batch_size=8.0"),
        ({"corpus": "stdlib-text", "seed": -1}, "seed=-1"),
        ({"corpus": "stdlib-text", "max_bytes": 0}, "max_bytes=0"),
    ],
)
def test_data_config_rejects_bad_fields_naming_them(kwargs: dict[str, Any], fragment: str) -> None:
    with pytest.raises(DataError) as raised:
        DataConfig(**kwargs)
    assert fragment in str(raised.value)
    assert isinstance(raised.value, ValueError)


def test_data_config_knows_its_corpora() -> None:
    assert CORPUS_NAMES == ("stdlib-text", "synthetic-shapes")
    assert DataConfig("synthetic-shapes", batch_size=12, micro_batches=3).micro_batch_size == 4


def test_split_micro_batches_cut_equal_parts_in_order() -> None:
    batch = {"tokens": torch.arange(24).view(6, 4), "targets": torch.arange(6)}
    parts = split_micro_batches(batch, 3)
    assert len(parts) == 3
    assert all(p["tokens"].shape == (2, 4) and p["targets"].shape == (2,) for p in parts)
    for key in batch:
        assert torch.equal(torch.cat([p[key] for p in parts]), batch[key])
    with pytest.raises(DataError, match="micro_batches=4"):
        split_micro_batches(batch, 4)


def test_text_default_corpus_reads_8_megabytes() -> None:
    source = build_source(DataConfig("stdlib-text"), context=128)
    files = source.corpus.files
    assert len(files.train) + len(files.val) == 8_000_000
    assert 0.02 < len(files.val) / 8_000_000 < 0.1  # every 20th file: roughly 5%
