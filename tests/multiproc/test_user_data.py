"""Users' own data end to end, with real processes: a text file written here is put
through the CLI (`python -m archipelago data put`, over the cluster's TLS), a gpt job names
it, two workers train it in two stages to completion, and every step's loss equals plain
PyTorch on the same batches. Putting it again sends no chunk. Bad input is one
`archipelago: error:` line and stores nothing; a chunk damaged in the worker's cache is
refused by its hash and fetched again, one damaged in the store is refused by the worker.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from coordinator.planning.jobspec import parse_job_spec
from coordinator.store import open_store
from opdag.data import build_source, split_micro_batches
from opdag.data.dataset import StoredDataset
from opdag.data.formats import read_dataset
from opdag.data.manifest import CHUNK_BYTES
from opdag.optim import build_optimizer
from opdag.zoo import build_model
from proto import coordinator_pb2
from proto.rpc import operator_metadata
from tests.multiproc.cluster import OPERATOR_TOKEN, Cluster, wait_for
from tests.multiproc.test_roles import DENIED, Attacker, refused

pytestmark = pytest.mark.multiproc

STEPS = 4
SPEC = """
name: own-data
model: {{zoo: gpt, args: {{layers: 2, d_model: 32, heads: 2, context: 16}}}}
data: {{dataset: {dataset}, batch_size: 8, micro_batches: 2, seed: 5}}
optimizer: {{name: adamw, lr: 1.0e-3}}
steps: {steps}
parallel: {{stages: 2}}
checkpoint: {{every: {steps}}}
validation: {{batches: 1}}
"""


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    # The workers' dataset cache, where the test can reach it.
    monkeypatch.setenv("ARCHIPELAGO_DATA_CACHE", str(tmp_path / "cache"))
    c = Cluster(tmp_path / "cluster")
    yield c
    c.close()


def cli(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    common = ["--coordinator", cluster.address, "--operator-token", OPERATOR_TOKEN]
    return subprocess.run(
        [sys.executable, "-m", "archipelago", *args, *common, "--ca", str(cluster.ca_file)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def dataset_blobs(cluster: Cluster) -> int:
    """How many dataset records (chunks, manifests, names) the store holds."""
    with open_store(cluster.store) as store:
        db = store._conn  # type: ignore[attr-defined]  # the sqlite store's own table
        return int(
            db.execute("SELECT COUNT(*) FROM blobs WHERE key LIKE 'dataset/%'").fetchone()[0]
        )


def write_text(path: Path) -> Path:
    rng = np.random.default_rng(7)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dogs", "ünïcode"]
    path.write_text(" ".join(rng.choice(words, 30_000)), encoding="utf-8")
    return path


def reference_losses(
    path: Path, spec_text: str, *, rename: dict[str, str] | None = None, validate: bool = True
) -> tuple[list[float], float]:
    """Plain PyTorch on the same batches: the file read here, the model built from the zoo;
    each step's loss, and the held-out loss after the last step."""
    spec = parse_job_spec(spec_text)
    prepared = read_dataset(path, name=spec.data.dataset, rename=rename)
    chunks = [
        prepared.stream[i : i + CHUNK_BYTES] for i in range(0, len(prepared.stream), CHUNK_BYTES)
    ]
    dataset = StoredDataset(prepared.manifest, lambda i: chunks[i])
    source = build_source(spec.data, context=spec.context(), dataset=dataset)
    assert spec.model.zoo is not None
    model = build_model(spec.model.zoo, spec.model.args_dict(), seed=spec.seed)
    optimizer = build_optimizer(model.named_parameters(), spec.optimizer)
    losses = []
    for step in range(spec.steps):
        optimizer.zero_grad()
        m = spec.data.micro_batches
        total = 0.0
        for micro in split_micro_batches(source.batch(step), m):
            loss = model(**micro)
            (loss / m).backward()
            total += float(loss.detach())
        optimizer.step()
        losses.append(total / m)
    if not validate:
        return losses, float("nan")
    model.eval()
    with torch.no_grad():
        (held_out,) = source.val_batches(1)
        val = float(model(**held_out))
    return losses, val


def error_line(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 2, out.stdout + out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("archipelago: error:")]
    assert len(lines) == 1, out.stderr
    return lines[0]


def test_a_users_text_file_is_put_trained_on_and_matches_pytorch(
    cluster: Cluster, tmp_path: Path
) -> None:
    cluster.start_coordinator()
    text = write_text(tmp_path / "story.txt")
    out = cli(cluster, "data", "put", str(text), "--name", "story")
    assert out.returncode == 0, out.stderr
    name, sha = out.stdout.split()
    assert name == "story" and sha == read_dataset(text, name="story").manifest.sha256
    stored = dataset_blobs(cluster)
    # Again: nothing new is sent or stored.
    again = cli(cluster, "data", "put", str(text), "--name", "story")
    assert again.returncode == 0 and again.stdout.split() == [name, sha], again.stderr
    assert "0 of 1 chunks sent" in again.stderr
    assert dataset_blobs(cluster) == stored

    for worker in ("w0", "w1"):
        cluster.start_worker(worker)
    spec_text = SPEC.format(dataset="story", steps=STEPS)
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(spec_text)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "archipelago",
            "submit",
            str(spec_path),
            "--coordinator",
            cluster.address,
            "--operator-token",
            OPERATOR_TOKEN,
            "--ca",
            str(cluster.ca_file),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.split()[0]
    cluster.wait_job(job_id, lambda j: j.state == "completed", "the job to complete", timeout=300)
    losses = {m.step: m.loss for m in cluster.job(job_id, with_metrics=True).metrics}
    reference, reference_val = reference_losses(text, spec_text)
    assert sorted(losses) == list(range(STEPS))
    for step in range(STEPS):
        assert losses[step] == pytest.approx(reference[step], abs=1e-4), f"step {step}"

    # The coordinator evaluated the last checkpoint on the held-out split of the dataset.
    def validation() -> str | None:
        client = cluster.client()
        try:
            texts = [e.text for e in client.events(job_id) if e.kind == "validation"]
        finally:
            client.close()
        return texts[-1] if texts else None

    shown = wait_for("a validation event", validation, 60)
    assert float(shown.split()[2]) == pytest.approx(reference_val, abs=2e-4), shown
    assert_only_their_roles_reach_the_dataset(cluster, sha)


def assert_only_their_roles_reach_the_dataset(cluster: Cluster, sha: str) -> None:
    """A worker that runs no stage 0 of a job on the dataset cannot read it; a worker
    cannot put one; a chunk whose bytes are not its hash is refused; the store is as it was."""
    before = dataset_blobs(cluster)
    attacker = Attacker(cluster)
    c, own = attacker.coordinator, attacker.own
    operator = operator_metadata(cluster.operator_token)
    read = coordinator_pb2.DatasetChunkRequest(dataset_sha256=sha, index=0)
    refused(DENIED, "runs stage 0 of no job reading dataset", c.GetDatasetChunk, read, metadata=own)
    manifest = coordinator_pb2.DatasetRequest(sha256=sha)
    refused(DENIED, "runs stage 0 of no job", c.GetDatasetManifest, manifest, metadata=own)
    needs = "GetDatasetChunk needs a worker's credential"
    refused(DENIED, needs, c.GetDatasetChunk, read, metadata=operator)
    chunk = coordinator_pb2.DatasetChunk(sha256="0" * 64, data=b"not that", dataset_bytes=8)
    needs = "PutDatasetChunk needs the operator token"
    refused(DENIED, needs, c.PutDatasetChunk, chunk, metadata=own)
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    refused(invalid, "its bytes hash to", c.PutDatasetChunk, chunk, metadata=operator)
    assert dataset_blobs(cluster) == before


ARRAY_SPEC = """
name: own-arrays
model: {{zoo: mlp, args: {{hidden: 32, layers: 3}}}}
data: {{dataset: shapes, batch_size: 8, micro_batches: 2, seed: 1}}
optimizer: {{name: sgd, lr: 0.05}}
steps: {steps}
parallel: {{stages: 2}}
checkpoint: {{every: {steps}}}
validation: {{batches: 0}}
"""


def test_an_npz_of_inputs_and_labels_trains_like_pytorch(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    rng = np.random.default_rng(2)
    x = rng.standard_normal((300, 3, 32, 32)).astype(np.float32)  # 3.5 MiB: four chunks
    y = (x.mean(axis=(1, 2, 3)) > 0).astype(np.int64) + 2 * (x[:, 0, 0, 0] > 0)
    path = tmp_path / "shapes.npz"
    np.savez(path, x=x, y=y)
    out = cli(cluster, "data", "put", str(path), "--rename", "x=images,y=labels")
    assert out.returncode == 0, out.stderr
    assert "sent chunk 4/4" in out.stderr  # progress, for a file of several chunks
    for worker in ("w0", "w1"):
        cluster.start_worker(worker)
    steps = 3
    spec_text = ARRAY_SPEC.format(steps=steps)
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(spec_text)
    job_id = cli(cluster, "submit", str(spec_path)).stdout.split()[0]
    cluster.wait_job(job_id, lambda j: j.state == "completed", "the job to complete", timeout=300)
    losses = {m.step: m.loss for m in cluster.job(job_id, with_metrics=True).metrics}
    reference, _ = reference_losses(
        path, spec_text, rename={"x": "images", "y": "labels"}, validate=False
    )
    for step in range(steps):
        assert losses[step] == pytest.approx(reference[step], abs=1e-4), f"step {step}"


def test_bad_input_is_one_error_line_and_stores_nothing(cluster: Cluster, tmp_path: Path) -> None:
    cluster.extra_coordinator_args = ["--max-dataset-mb", "1"]
    cluster.start_coordinator()
    big = tmp_path / "big.txt"
    big.write_bytes(b"0123456789abcdef" * (CHUNK_BYTES // 8))  # 2 MiB
    floats = tmp_path / "floats.npy"
    np.save(floats, np.linspace(0, 1, 500, dtype=np.float32))
    (tmp_path / "table.csv").write_text("a,b\n1,2\n")
    for args, fragment in [
        ((str(tmp_path / "absent.txt"),), "is not a file"),
        ((str(tmp_path / "table.csv"),), "cannot tell the format"),
        ((str(floats),), "token ids must be integers, not float32"),
        ((str(big),), f"{2 * CHUNK_BYTES} bytes exceed this coordinator's bound of {CHUNK_BYTES}"),
    ]:
        assert fragment in error_line(cli(cluster, "data", "put", *args))
    assert dataset_blobs(cluster) == 0
    # A job naming a dataset that does not exist is refused at submission.
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(SPEC.format(dataset="nowhere", steps=2))
    line = error_line(cli(cluster, "submit", str(spec_path)))
    assert "data.dataset: no dataset 'nowhere'" in line
    with open_store(cluster.store) as store:
        assert store.list_jobs() == []
    # A dataset that does not fit the model: an array set for a text model.
    np.savez(
        tmp_path / "set.npz",
        images=np.zeros((40, 3, 4, 4), np.float32),
        labels=np.zeros(40, np.int64),
    )
    assert cli(cluster, "data", "put", str(tmp_path / "set.npz")).returncode == 0
    spec_path.write_text(SPEC.format(dataset="set", steps=2))
    line = error_line(cli(cluster, "submit", str(spec_path)))
    assert "holds images, labels but the model takes targets, tokens" in line
    with open_store(cluster.store) as store:
        assert store.list_jobs() == []


def test_a_damaged_chunk_is_refused_by_its_hash_on_the_worker(
    cluster: Cluster, tmp_path: Path
) -> None:
    cluster.start_coordinator()
    text = write_text(tmp_path / "story.txt")
    assert cli(cluster, "data", "put", str(text), "--name", "story").returncode == 0
    manifest = read_dataset(text, name="story").manifest
    ((chunk_sha, _),) = manifest.chunks
    for worker in ("w0", "w1"):
        cluster.start_worker(worker)
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(SPEC.format(dataset="story", steps=2))
    first = cli(cluster, "submit", str(spec_path)).stdout.split()[0]
    cluster.wait_job(first, lambda j: j.state == "completed", "the first job", timeout=300)
    cached = tmp_path / "cache" / "chunks" / chunk_sha
    assert cached.is_file()
    # Garbage over the cached copy: dropped, fetched again, and the job trains as before.
    cached.write_bytes(b"garbage" * 100)
    second = cli(cluster, "submit", str(spec_path)).stdout.split()[0]
    cluster.wait_job(second, lambda j: j.state == "completed", "the second job", timeout=300)
    assert f"chunk 0 ({chunk_sha[:12]}) refused" in cluster.logs()
    assert "the cached copy is dropped and fetched again" in cluster.logs()
    assert cached.read_bytes()[:64] == text.read_bytes()[:64]
    # Garbage in the store, and none in the cache: the worker refuses what it is sent.
    cached.unlink()
    with open_store(cluster.store) as store:
        store.put_blob(f"dataset/chunk/{chunk_sha}", b"X" * 1000)
    third = cli(cluster, "submit", str(spec_path)).stdout.split()[0]
    wait_for(
        "the worker to refuse the chunk",
        lambda: f"chunk 0 ({chunk_sha[:12]}) refused: its bytes hash to" in cluster.logs() or None,
        120,
    )
    assert not cached.exists()  # nothing corrupt was kept
    job = cluster.job(third)
    # The job did not train on it: its plan could not start, and says why.
    assert job.state != "completed" and f"chunk 0 ({chunk_sha[:12]}) refused" in job.error
