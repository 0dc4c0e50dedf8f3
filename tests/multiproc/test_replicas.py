"""Data-parallel replicas end to end: a real coordinator and four real worker processes on
loopback, two replicas of a two-stage pipeline whose gradients are averaged every step,
checked against one plain PyTorch process training the full batch."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from coordinator.planning.jobspec import parse_job_spec
from coordinator.store import open_store
from opdag import model_file
from opdag.reference import ReferenceTrainer
from tests.multiproc.cluster import Cluster

pytestmark = pytest.mark.multiproc

STEPS = 10
SPEC = f"""
name: replicas
model: {{zoo: gpt, args: {{layers: 2, d_model: 64, heads: 4, context: 32}}}}
data: {{corpus: stdlib-text, batch_size: 8, micro_batches: 4, max_bytes: 2000000}}
optimizer: {{name: adamw, lr: 1.0e-3}}
steps: {STEPS}
parallel: {{planner: even, stages: 2, replicas: 2}}
checkpoint: {{every: 5}}
"""


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path / "cluster")
    yield c
    c.close()


def stored_state(cluster: Cluster, job_id: str, step: int) -> dict[str, torch.Tensor]:
    """Every tensor of the job's checkpoint at `step`, read from the store."""
    store = open_store(cluster.store)
    try:
        parts = store.checkpoint_parts(job_id, step)
    finally:
        store.close()
    state: dict[str, torch.Tensor] = {}
    for blob in parts:
        state.update(model_file.decode_state(blob, f"checkpoint {step}"))
    return state


def test_two_replicas_of_two_stages_train_exactly_like_one_process(cluster: Cluster) -> None:
    cluster.start_coordinator()
    for i in range(4):
        cluster.start_worker(f"w{i}")
    job_id = cluster.submit(SPEC)
    job = cluster.wait_job(job_id, lambda j: j.state == "completed", "the job to complete")
    assert len(job.stages) == 4
    assert {s.worker_name for s in job.stages} == {"w0", "w1", "w2", "w3"}
    assert sorted(s.stage for s in job.stages) == [0, 0, 1, 1]
    assert job.last_checkpoint == STEPS
    plan = cluster.client().plan(job_id)
    assert "2 stages x 2 replicas" in plan.text and "sync groups" in plan.text

    spec = parse_job_spec(SPEC)
    trainer = ReferenceTrainer(
        model=spec.model.zoo,
        model_args=spec.model.args_dict(),
        data=spec.data,
        optimizer=spec.optimizer,
        seed=spec.seed,
    )
    reference = [trainer.train_step(step) for step in range(STEPS)]
    losses = {m.step: m.loss for m in cluster.job(job_id, with_metrics=True).metrics}
    assert sorted(losses) == list(range(STEPS)), "a step has no loss"
    loss_diff = max(abs(losses[s] - reference[s]) for s in range(STEPS))
    assert loss_diff < 1e-4, f"largest loss difference {loss_diff:.3g}"

    # One copy of each stage in the checkpoint, the parameters the reference reached.
    # Measured over all parameters together: a tensor whose true gradient is zero (the key
    # part of attention's qkv bias: softmax ignores a shift of every key) takes Adam steps
    # on float noise alone, so it differs per tensor by ~2e-4 even between two plain
    # PyTorch runs that only group the same micro-batches differently.
    state = stored_state(cluster, job_id, STEPS)
    params = {n: p.detach() for n, p in trainer.model.named_parameters()}
    assert set(params) <= set(state)
    diff = sum(float((state[n] - p).square().sum()) for n, p in params.items()) ** 0.5
    norm = sum(float(p.square().sum()) for p in params.values()) ** 0.5
    worst = diff / norm
    assert worst < 1e-5, f"relative parameter difference {worst:.3g}"
    print(f"largest loss difference {loss_diff:.3g}, relative parameter difference {worst:.3g}")
