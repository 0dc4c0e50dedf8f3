"""Users' own datasets: each format's reader, the manifest's checks, batches as a pure
function of (seed, step), the held-out split, and the checks a job's model makes of them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from opdag.data import DataConfig, DataError, build_source
from opdag.data.dataset import StoredDataset, check_fits
from opdag.data.formats import Prepared, read_dataset
from opdag.data.manifest import CHUNK_BYTES, Manifest

pytestmark = pytest.mark.unit


def stored(p: Prepared) -> StoredDataset:
    chunks = [p.stream[i : i + CHUNK_BYTES] for i in range(0, len(p.stream), CHUNK_BYTES)]
    return StoredDataset(p.manifest, lambda i: chunks[i])


def text_file(tmp_path: Path, n: int = 50_000, name: str = "corpus.txt") -> Path:
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "délta", "ε", "zeta\n"]
    path = tmp_path / name
    path.write_text(" ".join(rng.choice(words, n)), encoding="utf-8")
    return path


def test_text_is_one_token_per_byte_with_the_last_five_percent_held_out(tmp_path: Path) -> None:
    path = text_file(tmp_path)
    raw = path.read_bytes()
    p = read_dataset(path)
    m = p.manifest
    assert (m.name, m.kind, m.format, m.vocab) == ("corpus", "tokens", "text", 256)
    assert m.rows == len(raw) and m.val_rows == len(raw) * 5 // 100
    assert p.stream == raw  # uint8 tokens: the bytes themselves
    assert len(m.chunks) == -(-len(raw) // CHUNK_BYTES)
    assert Manifest.from_json(m.to_json()) == m


def test_a_big_file_is_cut_into_chunks_of_one_mib(tmp_path: Path) -> None:
    path = tmp_path / "big.txt"
    path.write_bytes(b"abcdefgh" * (CHUNK_BYTES // 4 + 3))
    m = read_dataset(path).manifest
    assert [size for _, size in m.chunks] == [CHUNK_BYTES, CHUNK_BYTES, 24]
    assert len({sha for sha, _ in m.chunks}) == 2  # two equal chunks, one hash


def test_batches_are_a_pure_function_of_seed_and_step(tmp_path: Path) -> None:
    p = read_dataset(text_file(tmp_path))
    cfg = DataConfig(dataset="corpus", batch_size=8, seed=3)
    one = build_source(cfg, context=32, dataset=stored(p))
    two = build_source(cfg, context=32, dataset=stored(p))
    for step in (0, 7, 123):
        a, b = one.batch(step), two.batch(step)
        assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["targets"], b["targets"])
    assert not torch.equal(one.batch(0)["tokens"], one.batch(1)["tokens"])
    other = build_source(
        DataConfig(dataset="corpus", batch_size=8, seed=4), context=32, dataset=stored(p)
    )
    assert not torch.equal(one.batch(0)["tokens"], other.batch(0)["tokens"])
    batch = one.batch(5)
    assert batch["tokens"].dtype == torch.int64 and batch["tokens"].shape == (8, 32)
    assert torch.equal(batch["tokens"][:, 1:], batch["targets"][:, :-1])
    # Every window is a run of the file's bytes.
    raw = p.stream
    for row in torch.cat([batch["tokens"], batch["targets"][:, -1:]], 1).tolist():
        assert bytes(row) in raw


def test_training_never_reads_the_held_out_tokens(tmp_path: Path) -> None:
    # Distinct halves: training text is lower case, the held-out tail upper case.
    path = tmp_path / "split.txt"
    train, val = 19_000, 1_000
    path.write_bytes(b"a" * train + b"Z" * val)
    p = read_dataset(path)
    assert (p.manifest.train_rows, p.manifest.val_rows) == (train, val)
    source = build_source(DataConfig(dataset="split", batch_size=16), context=64, dataset=stored(p))
    for step in range(200):
        b = source.batch(step)
        assert set(b["tokens"].unique().tolist()) | set(b["targets"].unique().tolist()) == {97}
    for b in source.val_batches(4):
        assert set(b["tokens"].unique().tolist()) == {ord("Z")}
    # The validation batches do not depend on the training seed.
    seeded = build_source(
        DataConfig(dataset="split", batch_size=16, seed=9), context=64, dataset=stored(p)
    )
    assert all(
        torch.equal(x["tokens"], y["tokens"])
        for x, y in zip(source.val_batches(2), seeded.val_batches(2), strict=True)
    )


def test_a_split_too_small_for_the_context_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "tiny.txt"
    path.write_bytes(b"x" * 1000)  # 50 held-out tokens
    p = read_dataset(path)
    with pytest.raises(DataError, match="held-out split has 50 tokens, too few for context 64"):
        build_source(DataConfig(dataset="tiny"), context=64, dataset=stored(p))


def test_jsonl_byte_level_joins_the_texts_with_newlines(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    records = [{"body": "first doc", "id": 1}, {"body": "second", "id": 2}, {"body": "third"}]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    p = read_dataset(path, text_field="body")
    assert p.stream == b"first doc\nsecond\nthird"
    with pytest.raises(DataError, match=r"line 1: no text field 'text'"):
        read_dataset(path)


def test_jsonl_with_a_tokenizer_stores_its_ids(tmp_path: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, "the": 1, "cat": 2, "sat": 3, "on": 4, "mat": 5}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok_path = tmp_path / "tok.json"
    tok.save(str(tok_path))
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "the cat sat"}\n{"text": "on the mat dog"}\n')
    p = read_dataset(path, tokenizer=tok_path)
    assert p.manifest.vocab == 6
    assert np.frombuffer(p.stream, dtype=np.uint8).tolist() == [1, 2, 3, 4, 1, 5, 0]
    with pytest.raises(DataError, match="cannot be read"):
        read_dataset(path, tokenizer=path)


def test_npy_and_bin_token_arrays(tmp_path: Path) -> None:
    ids = np.arange(3000, dtype=np.int64) % 1000
    np.save(tmp_path / "ids.npy", ids)
    p = read_dataset(tmp_path / "ids.npy")
    assert (p.manifest.vocab, p.manifest.arrays[0].dtype) == (1000, "uint16")
    assert np.array_equal(np.frombuffer(p.stream, dtype="<u2"), ids)
    assert read_dataset(tmp_path / "ids.npy", vocab=50257).manifest.vocab == 50257
    with pytest.raises(DataError, match="token id 999 is not below the vocab 500"):
        read_dataset(tmp_path / "ids.npy", vocab=500)
    ids.astype("<u2").tofile(tmp_path / "train.bin")
    b = read_dataset(tmp_path / "train.bin", vocab=1024)
    assert b.stream == p.stream and b.manifest.format == "bin"
    (tmp_path / "odd.bin").write_bytes(b"\x01\x00\x02")
    with pytest.raises(DataError, match="not a whole number of uint16"):
        read_dataset(tmp_path / "odd.bin")


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.linspace(0, 1, 100, dtype=np.float32), "token ids must be integers, not float32"),
        (np.arange(100).reshape(10, 10), "token ids must be 1-D"),
        (np.arange(-5, 95), "token id -5 is negative"),
    ],
)
def test_bad_token_arrays_are_refused(tmp_path: Path, array: np.ndarray, message: str) -> None:
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(DataError, match=message):
        read_dataset(tmp_path / "bad.npy")


def test_a_pickled_array_is_never_unpickled(tmp_path: Path) -> None:
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match=r"not an \.npy of a plain array"):
        read_dataset(tmp_path / "obj.npy")
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(DataError, match=r"not an \.npz of plain arrays"):
        read_dataset(tmp_path / "obj.npz")


def test_npz_arrays_of_inputs_and_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((200, 3, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, 200).astype(np.int64)
    np.savez(tmp_path / "set.npz", x=x, y=y)
    p = read_dataset(tmp_path / "set.npz", rename={"x": "images", "y": "labels"})
    m = p.manifest
    assert m.kind == "arrays" and m.input_names == ("images", "labels")
    assert (m.rows, m.val_rows) == (200, 10)
    source = build_source(DataConfig(dataset="set", batch_size=16, seed=2), dataset=stored(p))
    b = source.batch(3)
    assert b["images"].dtype == torch.float32 and b["labels"].dtype == torch.int64
    assert b["images"].shape == (16, 3, 8, 8)
    # Each row is the row of the file with the same label: rows stay together.
    for image, label in zip(b["images"], b["labels"], strict=True):
        row = int(np.flatnonzero((x == image.numpy()).all(axis=(1, 2, 3)))[0])
        assert row < m.train_rows and y[row] == int(label)
    assert torch.equal(source.batch(3)["images"], b["images"])
    for v in source.val_batches(2):
        for image in v["images"]:
            assert int(np.flatnonzero((x == image.numpy()).all(axis=(1, 2, 3)))[0]) >= 190
    np.savez(tmp_path / "uneven.npz", x=x, y=y[:100])
    with pytest.raises(DataError, match="disagree on their rows"):
        read_dataset(tmp_path / "uneven.npz")
    np.savez(tmp_path / "nan.npz", x=np.full((4, 2), np.nan, dtype=np.float32), y=y[:4])
    with pytest.raises(DataError, match="not finite"):
        read_dataset(tmp_path / "nan.npz")


def test_unknown_format_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="cannot tell the format"):
        read_dataset(tmp_path / "data.csv")
    with pytest.raises(DataError, match="is not a file"):
        read_dataset(tmp_path / "absent.txt")
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9")
    with pytest.raises(DataError, match="not UTF-8 text"):
        read_dataset(tmp_path / "latin.txt")


def test_a_manifest_from_the_network_is_checked(tmp_path: Path) -> None:
    m = read_dataset(text_file(tmp_path)).manifest
    plain = json.loads(m.to_json())
    for change, message in [
        (("val_rows", 0), "held-out rows"),
        (("vocab", 0), "vocab"),
        (("chunks", [["0" * 63, 5]]), "not a SHA-256"),
        (("kind", "pickle"), "kind"),
        (("extra", 1), "exactly"),
    ]:
        bad = {**plain, change[0]: change[1]}
        with pytest.raises(DataError, match=message):
            Manifest.from_json(json.dumps(bad).encode())
    short = {**plain, "chunks": plain["chunks"][:-1]}
    with pytest.raises(DataError):
        Manifest.from_json(json.dumps(short).encode())


def test_a_dataset_fits_a_model_or_is_refused_in_one_line(tmp_path: Path) -> None:
    m = read_dataset(text_file(tmp_path)).manifest
    tokens = {
        "tokens": torch.zeros(1, 32, dtype=torch.int64),
        "targets": torch.zeros(1, 32, dtype=torch.int64),
    }
    check_fits(m, tokens, vocab=256, context=32)
    with pytest.raises(DataError, match="token ids up to 255, beyond the model's vocab of 128"):
        check_fits(m, tokens, vocab=128, context=32)
    images = {"images": torch.zeros(1, 3, 8, 8), "labels": torch.zeros(1, dtype=torch.int64)}
    with pytest.raises(DataError, match="holds targets, tokens but the model takes images, labels"):
        check_fits(m, images, vocab=None, context=None)
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "a.npz",
        images=rng.random((20, 3, 4, 4)).astype(np.float32),
        labels=np.zeros(20, dtype=np.int64),
    )
    arrays = read_dataset(tmp_path / "a.npz").manifest
    with pytest.raises(DataError, match=r"rows are \[3, 4, 4\], the model takes \[3, 8, 8\]"):
        check_fits(arrays, images, vocab=None, context=None)


def test_labels_beyond_the_models_classes_are_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.random((30, 3, 4, 4)).astype(np.float32)
    np.savez(tmp_path / "a.npz", images=images, labels=np.arange(30) % 12)
    m = read_dataset(tmp_path / "a.npz").manifest
    assert (m.array("labels").low, m.array("labels").high) == (0, 11)
    example = {"images": torch.zeros(1, 3, 4, 4), "labels": torch.zeros(1, dtype=torch.int64)}
    check_fits(m, example, vocab=None, context=None, below={"labels": 12})
    with pytest.raises(DataError, match=r"array 'labels' holds 0\.\.11, the model takes 0\.\.9"):
        check_fits(m, example, vocab=None, context=None, below={"labels": 10})


def test_a_batch_outside_its_manifests_bounds_is_refused(tmp_path: Path) -> None:
    # A manifest that claims smaller ids than its chunks hold (hashes and all consistent,
    # as a careless or lying client could make it) is caught on the first batch read.
    ids = np.arange(4000) % 300
    np.save(tmp_path / "ids.npy", ids)
    p = read_dataset(tmp_path / "ids.npy", vocab=1000)
    plain = json.loads(p.manifest.to_json())
    plain["arrays"][0]["high"] = 100
    lying = Manifest.from_json(json.dumps(plain).encode())
    source = build_source(
        DataConfig(dataset="ids", batch_size=8),
        context=32,
        dataset=stored(Prepared(lying, p.stream)),
    )
    with pytest.raises(
        DataError, match=r"tokens values \d+\.\.\d+ are outside its manifest's bounds 0\.\.100"
    ):
        source.batch(0)


def test_a_mangled_manifest_is_refused_with_a_data_error_only(tmp_path: Path) -> None:
    # Whatever JSON a caller sends, the check refuses it as DataError (never a TypeError
    # from a list where a name belongs, nor anything else that would crash the servicer).
    import random

    base = json.loads(read_dataset(text_file(tmp_path)).manifest.to_json())
    rng = random.Random(0)
    values: list[object] = [None, True, -1, 0, 2**70, 1.5, "x", "", [], {}, [[]], "ab" * 32]

    def mangle(node: object) -> object:
        if isinstance(node, dict) and node:
            out = dict(node)
            key = rng.choice(list(out))
            roll = rng.random()
            if roll < 0.2:
                del out[key]
            else:
                out[key] = mangle(out[key]) if roll < 0.6 else rng.choice(values)
            return out
        if isinstance(node, list) and node:
            out_list = list(node)
            i = rng.randrange(len(out_list))
            out_list[i] = mangle(out_list[i]) if rng.random() < 0.6 else rng.choice(values)
            return out_list
        return rng.choice(values)

    refused = 0
    for _ in range(2000):
        try:
            Manifest.from_json(json.dumps(mangle(base)).encode())
        except DataError:
            refused += 1
    assert refused > 1500  # nearly every change breaks the manifest, and is refused


@pytest.mark.parametrize("steps", [(0, 1), (3, 6), (0, 40)])
def test_the_chunks_a_worker_fetches_are_those_its_batches_read(
    tmp_path: Path, steps: tuple[int, int]
) -> None:
    ids = np.random.default_rng(5).integers(0, 60_000, 3 * CHUNK_BYTES // 2).astype(np.int64)
    np.save(tmp_path / "ids.npy", ids)
    p = read_dataset(tmp_path / "ids.npy")
    assert len(p.manifest.chunks) == 3
    chunks = [p.stream[i : i + CHUNK_BYTES] for i in range(0, len(p.stream), CHUNK_BYTES)]
    read: set[int] = set()

    def reader(index: int) -> bytes:
        read.add(index)
        return chunks[index]

    cfg = DataConfig(dataset="ids", batch_size=2, seed=11)
    source = build_source(cfg, context=64, dataset=StoredDataset(p.manifest, reader))
    needed = source.chunks_for_steps(*steps)
    for step in range(*steps):
        source.batch(step)
    assert read == needed
