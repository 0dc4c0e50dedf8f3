"""The coordinator's side of users' own models, on a real (SQLite) store: an uploaded model
is read within bounds, checked, and stored with its job (and found again by a coordinator
that starts on the same store); every refusal leaves the store without a job. The
validation loss of an uploaded model is its graph's, equal to plain PyTorch's; an export
gives the newest complete checkpoint under the user's own names, loadable with strict=True.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from archipelago.model_source import prepare_model
from coordinator.job_record import JobError
from coordinator.jobs import JobManager
from coordinator.model_export import export_tensors
from coordinator.model_upload import ModelJobUpload, read_model_bytes
from coordinator.planning.jobspec import parse_job_spec
from coordinator.registry import Registry
from coordinator.store import StateStore, open_store
from coordinator.validation import validation_loss
from coordinator.worker_client import WorkerClient
from opdag.data import build_source, split_micro_batches
from opdag.errors import OpDagError
from proto.errors import WireError
from tests.user_models import load, write_model

pytestmark = pytest.mark.unit

TOKEN = "join-token-for-the-user-model-tests"


def spec_text(model: str, name: str = "mine") -> str:
    return (
        f"name: {name}\nmodel: {model}\n"
        "data: {corpus: stdlib-text, batch_size: 4, micro_batches: 2, max_bytes: 200000}\n"
        "steps: 3\nvalidation: {batches: 2}\n"
    )


LOSS_SPEC = spec_text("{file: mymodel.py, args: {d: 32}, context: 16}")
LOGITS_SPEC = spec_text(
    "{file: mymodel.py, factory: build_logits, loss: cross_entropy, context: 16}"
)


def manager_on(store: StateStore) -> JobManager:
    return JobManager(store, Registry(timeout_s=5.0), WorkerClient(token=TOKEN, tls=None))


async def chunks_of(blob: bytes, size: int = 1 << 16) -> AsyncIterator[bytes]:
    for i in range(0, len(blob), size):
        yield blob[i : i + size]


def upload_of(text: str, folder: Path) -> tuple[ModelJobUpload, bytes]:
    prepared = prepare_model(parse_job_spec(text), folder)
    blob = prepared.encode()
    return ModelJobUpload(text, len(blob), tuple(prepared.names)), blob


def test_an_uploaded_model_is_stored_with_its_job_and_survives_a_restart(tmp_path: Path) -> None:
    write_model(tmp_path)
    upload, blob = upload_of(LOGITS_SPEC, tmp_path)

    async def run() -> None:
        url = f"sqlite:///{tmp_path / 's.db'}"
        with open_store(url) as store:
            manager = manager_on(store)
            job = await manager.submit_uploaded(upload, chunks_of(blob))
            held = await manager.model_of(job)
            assert [j["job_id"] for j in store.list_jobs()] == [job.job_id]
        with open_store(url) as store:  # a coordinator started afresh on the same store
            again = manager_on(store)
            await again.restore()
            restored = again.get(job.job_id)
            assert restored.spec == parse_job_spec(LOGITS_SPEC)
            model = await again.model_of(restored)
            assert model.graph == held.graph
            assert all(torch.equal(model.state[k], held.state[k]) for k in held.state)
            assert await again.table.export_names_of(restored) == list(upload.export_names)

    asyncio.run(run())


def _refused(tmp_path: Path, upload: ModelJobUpload, blob: bytes) -> str:
    """The refusal of an upload, after checking it stored nothing."""

    async def run() -> str:
        with open_store(f"sqlite:///{tmp_path / 'refused.db'}") as store:
            manager = manager_on(store)
            try:
                await manager.submit_uploaded(upload, chunks_of(blob))
            except (OpDagError, WireError) as e:
                assert store.list_jobs() == [] and manager.jobs == {}
                return str(e)
            raise AssertionError("the upload was accepted")

    return asyncio.run(run())


def test_refusals_store_nothing(tmp_path: Path) -> None:
    write_model(tmp_path)
    upload, blob = upload_of(LOSS_SPEC, tmp_path)
    zoo = spec_text("{zoo: gpt, args: {layers: 1, d_model: 32, heads: 2, context: 16}}")
    assert "is a zoo model" in _refused(tmp_path, ModelJobUpload(zoo, len(blob), ()), blob)
    # Bytes short of, or beyond, what the header declares.
    assert "ended after" in _refused(tmp_path, upload, blob[:-10])
    assert "more than" in _refused(tmp_path, upload, blob + b"x")
    corrupt = bytearray(blob)
    corrupt[len(corrupt) // 2] ^= 0xFF
    assert "not a valid .opdag" in _refused(tmp_path, upload, bytes(corrupt))
    # A graph captured for another micro-batch than the job's.
    other = LOSS_SPEC.replace("micro_batches: 2", "micro_batches: 4")
    message = _refused(tmp_path, ModelJobUpload(other, len(blob), upload.export_names), blob)
    assert message.startswith("model: input ") and "micro-batch" in message
    # Export names that do not name the graph's tensors.
    names = ((upload.export_names[0][0], "nowhere.weight"),)
    assert "not in the graph" in _refused(
        tmp_path, ModelJobUpload(LOSS_SPEC, len(blob), names), blob
    )
    twice = (upload.export_names[0], upload.export_names[0])
    assert "given twice" in _refused(tmp_path, ModelJobUpload(LOSS_SPEC, len(blob), twice), blob)


def test_a_model_over_the_coordinators_bounds_is_refused(tmp_path: Path) -> None:
    write_model(tmp_path)
    upload, blob = upload_of(LOSS_SPEC, tmp_path)

    async def run() -> None:
        with open_store("sqlite:///:memory:") as store:
            manager = manager_on(store)
            manager.limits = type(manager.limits)(
                spec=type(manager.limits.spec)(max_parameters=1000)
            )
            with pytest.raises(JobError, match=r"^model: .* has .* parameters; .*max-model-params"):
                await manager.submit_uploaded(upload, chunks_of(blob))
            assert store.list_jobs() == []

    asyncio.run(run())


def test_a_declared_length_over_the_bound_is_refused_before_reading() -> None:
    async def never() -> AsyncIterator[bytes]:
        raise AssertionError("read")
        yield b""

    with pytest.raises(JobError, match="declares 2000 bytes"):
        asyncio.run(read_model_bytes(never(), 2000, 1000))


def test_the_validation_loss_of_an_uploaded_model_is_its_graphs(tmp_path: Path) -> None:
    write_model(tmp_path)
    spec = parse_job_spec(LOGITS_SPEC)
    prepared = prepare_model(spec, tmp_path)
    # Trained-looking state: the initial tensors moved off their initial values.
    g = torch.Generator().manual_seed(3)
    state = {
        k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in prepared.captured.state.items()
    }
    got = validation_loss(spec, state, 2, prepared.captured)
    user = load(tmp_path / "mymodel.py").build_logits().eval()
    user.load_state_dict({n: state[t] for n, t in prepared.names}, strict=True)
    source = build_source(spec.data, context=spec.context())
    with torch.no_grad():
        losses = [
            float(F.cross_entropy(user(b["tokens"]).flatten(0, 1), b["targets"].flatten()))
            for b in source.val_batches(2)
        ]
    assert got == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    # The micro-batches' mean is the batch's: the coordinator runs the graph per micro-batch.
    assert len(split_micro_batches(source.val_batches(1)[0], 2)) == 2


def test_export_gives_the_newest_checkpoint_under_the_users_names(tmp_path: Path) -> None:
    write_model(tmp_path)
    upload, blob = upload_of(LOGITS_SPEC, tmp_path)

    async def run() -> None:
        with open_store("sqlite:///:memory:") as store:
            manager = manager_on(store)
            job = await manager.submit_uploaded(upload, chunks_of(blob))
            with pytest.raises(JobError, match="has no complete checkpoint yet"):
                await export_tensors(manager, job)
            model = await manager.model_of(job)
            trained = {k: v * 0.5 for k, v in model.state.items()}
            complete = await manager.checkpoints.accept(
                job.job_id, model, stage=0, num_stages=1, step=2, tensors=trained
            )
            assert complete
            step, tensors = await export_tensors(manager, job)
            assert step == 2
            user = load(tmp_path / "mymodel.py").build_logits()
            user.load_state_dict(dict(tensors), strict=True)
            for name, tensor in upload.export_names:
                assert torch.equal(user.state_dict()[name], trained[tensor])

    asyncio.run(run())


def test_tied_weights_train_as_one_and_export_under_both_names(tmp_path: Path) -> None:
    write_model(tmp_path)
    text = spec_text("{file: mymodel.py, factory: build_tied, loss: cross_entropy, context: 16}")
    upload, blob = upload_of(text, tmp_path)
    by_name = dict(upload.export_names)
    # One tensor of the graph, exported under each of the module's names for it.
    assert by_name["head.weight"] == by_name["emb.weight"]

    async def run() -> None:
        with open_store("sqlite:///:memory:") as store:
            manager = manager_on(store)
            job = await manager.submit_uploaded(upload, chunks_of(blob))
            model = await manager.model_of(job)
            trained = {k: v + 1.0 for k, v in model.state.items()}
            await manager.checkpoints.accept(
                job.job_id, model, stage=0, num_stages=1, step=3, tensors=trained
            )
            _, tensors = await export_tensors(manager, job)
            user = load(tmp_path / "mymodel.py").build_tied()
            user.load_state_dict(dict(tensors), strict=True)
            assert user.head.weight is user.emb.weight
            assert torch.equal(user.emb.weight, trained[by_name["emb.weight"]])

    asyncio.run(run())
