"""Local SGD end to end: a real coordinator and four real worker processes on loopback, two
replicas of a two-stage pipeline that each step their own optimizer and average parameters
every H steps, checked against `sync` (H = 1, plain SGD) and against a plain PyTorch
simulation of H-step local SGD written here; and partial local SGD, whose workers log each
round's layers: each layer averaged once per period, the run equal to the simulation of
the same per-layer rounds."""

from __future__ import annotations

import re
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from coordinator.planning.jobspec import JobSpec, parse_job_spec
from coordinator.planning.stage_sync import layer_of
from coordinator.store import open_store
from opdag import model_file
from opdag.data import replica_micro_batches
from opdag.optim import OPTIM_PREFIX, build_optimizer
from opdag.reference import training_source
from opdag.zoo import build_model
from tests.multiproc.cluster import Cluster

pytestmark = pytest.mark.multiproc

REPLICAS = 2
SPEC = """
name: local-sgd
model: {{zoo: gpt, args: {{layers: 2, d_model: 64, heads: 4, context: 32}}}}
data: {{corpus: stdlib-text, batch_size: 8, micro_batches: 4, max_bytes: 2000000}}
optimizer: {optimizer}
steps: {steps}
parallel: {{planner: even, stages: 2, replicas: 2}}
sync: {sync}
checkpoint: {{every: {steps}}}
"""
# In `job_result`'s state, "#stage:NAME" is the stage that holds tensor NAME.
STAGE_OF = "#stage:"
PLAIN_SGD = "{name: sgd, lr: 0.05, momentum: 0.0}"
ADAMW = "{name: adamw, lr: 1.0e-3}"


def job_spec(optimizer: str, sync: str, steps: int) -> str:
    return SPEC.format(optimizer=optimizer, sync=sync, steps=steps)


def simulate(
    spec: JobSpec,
    averages: Callable[[int, str], bool],
    wire: torch.dtype = torch.float32,
    outer: tuple[str, float, float] | None = None,
) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Local SGD in one process: R copies of the model, each trained on its replica's
    micro-batches of every step with its own optimizer; after step k, every parameter n with
    `averages(k, n)` is replaced by its mean over the copies (replica order, fp32). Returns
    each step's loss over the global batch (the mean of the replicas' losses) and the final
    parameters of copy 0. With `wire` fp16, each copy's values are rounded to fp16 before
    the fp32 sum, as they travel. With `outer` (name, lr, momentum), DiLoCo: the copies
    take, instead of the mean, the parameters of the last round stepped by an outer SGD or
    Nesterov on the pseudo-gradient (last round's parameters minus the mean)."""
    args = spec.model.args_dict()
    source = training_source(spec.model.zoo, args, spec.data)
    models = [build_model(spec.model.zoo, args, seed=spec.seed) for _ in range(REPLICAS)]
    optimizers = [build_optimizer(m.named_parameters(), spec.optimizer) for m in models]
    m = spec.data.micro_batches
    share = m // REPLICAS
    losses: list[float] = []
    anchor = {n: p.detach().clone() for n, p in models[0].named_parameters()}
    velocity = {n: torch.zeros_like(p) for n, p in anchor.items()}
    for step in range(spec.steps):
        batch = source.batch(step)
        step_losses = []
        for r, (model, optimizer) in enumerate(zip(models, optimizers, strict=True)):
            total = 0.0
            for micro in replica_micro_batches(batch, m, REPLICAS, r):
                loss = model(**micro)
                (loss / share).backward()
                total += loss.item()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step_losses.append(total / share)
        losses.append(sum(step_losses) / REPLICAS)
        with torch.no_grad():
            named = [dict(model.named_parameters()) for model in models]
            for name in named[0]:
                if not averages(step, name):
                    continue
                mean = named[0][name].detach().to(wire).float()
                for r in range(1, REPLICAS):
                    mean += named[r][name].detach().to(wire)
                mean /= REPLICAS
                if outer is not None:
                    kind, lr, momentum = outer
                    pseudo = anchor[name] - mean
                    velocity[name] = momentum * velocity[name] + pseudo
                    update = (
                        pseudo + momentum * velocity[name] if kind == "nesterov" else velocity[name]
                    )
                    anchor[name] = anchor[name] - lr * update
                    mean = anchor[name].clone()
                for r in range(REPLICAS):
                    named[r][name].copy_(mean)
    return losses, {n: p.detach().clone() for n, p in models[0].named_parameters()}


def simulate_local_sgd(
    spec: JobSpec, period: int, wire: torch.dtype = torch.float32
) -> tuple[list[float], dict[str, torch.Tensor]]:
    """H-step local SGD: every parameter averaged after every step k with (k + 1) % H == 0
    and after the last."""
    return simulate(spec, lambda k, _: (k + 1) % period == 0 or k == spec.steps - 1, wire)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path / "cluster")
    yield c
    c.close()


@pytest.fixture(scope="module")
def four_workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One coordinator and workers w0..w3, shared by the tests after the drained one (that
    one stops a worker), which only run jobs to completion (each read by its own id)."""
    c = Cluster(tmp_path_factory.mktemp("local-sgd") / "cluster")
    try:
        c.start_coordinator()
        for i in range(4):
            c.start_worker(f"w{i}")
        yield c
    finally:
        c.close()


def run_job(cluster: Cluster, spec_yaml: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Run a job to completion: its losses by step and its final checkpoint's tensors."""
    job_id = cluster.submit(spec_yaml)
    cluster.wait_job(job_id, lambda j: j.state == "completed", "the job to complete", timeout=240)
    return job_result(cluster, job_id)


def job_result(cluster: Cluster, job_id: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    """A completed job's losses by step and its final checkpoint's tensors."""
    job = cluster.job(job_id)
    assert sorted((s.replica, s.stage) for s in job.stages) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    losses = {m.step: m.loss for m in cluster.job(job_id, with_metrics=True).metrics}
    assert sorted(losses) == list(range(len(losses))), "a step has no loss"
    store = open_store(cluster.store)
    try:
        parts = store.checkpoint_parts(job_id, job.last_checkpoint)
    finally:
        store.close()
    state: dict[str, torch.Tensor] = {}
    for stage, blob in enumerate(parts):  # the parts are ordered by stage
        tensors = model_file.decode_state(blob, f"checkpoint {job.last_checkpoint}")
        state.update(tensors)
        state.update({f"{STAGE_OF}{n}": torch.tensor(stage) for n in tensors})
    return [losses[s] for s in sorted(losses)], state


def relative_difference(state: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """|state - want| / |want| over all of `want`'s parameters together (see test_replicas:
    per tensor, Adam on float noise alone moves a zero-gradient bias by ~2e-4)."""
    assert set(want) <= set(state)
    diff = sum(float((state[n] - p).square().sum()) for n, p in want.items()) ** 0.5
    norm = sum(float(p.square().sum()) for p in want.values()) ** 0.5
    return diff / norm


def test_a_drained_outer_nesterov_run_resumes_with_its_outer_state(cluster: Cluster) -> None:
    """Ctrl-C of a replica's worker mid-run: the job drains at a step boundary and resumes
    on a spare from the checkpoint there, which carries the outer optimizer's state (the
    last round's parameters and the outer momentum); the run equals the uninterrupted
    DiLoCo simulation. Period 1 puts every boundary at a round and plain SGD has no inner
    state, so nothing but the outer state could be lost."""
    cluster.start_coordinator()
    workers = {f"w{i}": cluster.start_worker(f"w{i}") for i in range(5)}
    steps = 24
    sync = "{kind: local-sgd, period: 1, outer: {name: nesterov, lr: 0.7, momentum: 0.9}}"
    spec_yaml = job_spec(PLAIN_SGD, sync, steps)
    job_id = cluster.submit(spec_yaml)
    cluster.wait_job(
        job_id, lambda j: j.state == "running" and j.steps_done >= 6, "the job to pass step 6"
    )
    leaving = workers["w2"]  # replica 1's stage 0
    cluster.kill(leaving, signal.SIGINT)
    assert leaving.popen.wait(timeout=120) == 0
    job = cluster.wait_job(
        job_id, lambda j: j.state == "completed", "the job to complete", timeout=240
    )
    assert job.epoch == 2
    resumed = min(m.step for m in cluster.job(job_id, with_metrics=True).metrics if m.epoch == 2)
    assert 6 <= resumed < steps
    losses, state = job_result(cluster, job_id)
    spec = parse_job_spec(spec_yaml)
    want_losses, want_params = simulate(spec, lambda k, _: True, outer=("nesterov", 0.7, 0.9))
    loss_diff = max(abs(a - b) for a, b in zip(losses, want_losses, strict=True))
    worst = relative_difference(state, want_params)
    print(
        f"outer nesterov drained at step {resumed} and resumed: largest loss difference "
        f"{loss_diff:.3g}, parameters {worst:.3g}"
    )
    assert loss_diff < 1e-4, f"largest loss difference {loss_diff:.3g}"
    assert worst < 1e-5, f"relative parameter difference {worst:.3g}"


def test_local_sgd_with_period_1_and_plain_sgd_trains_like_sync(four_workers: Cluster) -> None:
    cluster = four_workers
    steps = 6
    sync_losses, sync_state = run_job(cluster, job_spec(PLAIN_SGD, "sync", steps))
    local_losses, local_state = run_job(
        cluster, job_spec(PLAIN_SGD, "{kind: local-sgd, period: 1}", steps)
    )
    assert len(local_losses) == len(sync_losses) == steps
    loss_diff = max(abs(a - b) for a, b in zip(local_losses, sync_losses, strict=True))
    params = {n: t for n, t in sync_state.items() if not n.startswith((OPTIM_PREFIX, STAGE_OF))}
    worst = relative_difference(local_state, params)
    print(f"period 1 vs sync: largest loss difference {loss_diff:.3g}, parameters {worst:.3g}")
    assert loss_diff < 1e-4, f"largest loss difference {loss_diff:.3g}"
    assert worst < 1e-5, f"relative parameter difference {worst:.3g}"


def test_local_sgd_with_period_3_equals_a_plain_pytorch_simulation(four_workers: Cluster) -> None:
    cluster = four_workers
    steps, period = 8, 3  # rounds after steps 2, 5 and the last, 7
    spec_yaml = job_spec(ADAMW, f"{{kind: local-sgd, period: {period}}}", steps)
    losses, state = run_job(cluster, spec_yaml)
    want_losses, want_params = simulate_local_sgd(parse_job_spec(spec_yaml), period)
    assert len(losses) == steps
    loss_diff = max(abs(a - b) for a, b in zip(losses, want_losses, strict=True))
    worst = relative_difference(state, want_params)
    print(
        f"period {period} vs simulation: largest loss difference {loss_diff:.3g}, "
        f"parameters {worst:.3g}"
    )
    assert loss_diff < 1e-4, f"largest loss difference {loss_diff:.3g}"
    assert worst < 1e-5, f"relative parameter difference {worst:.3g}"
    # The simulation without averaging rounds ends elsewhere: the test can tell them apart.
    _, unaveraged = simulate_local_sgd(parse_job_spec(spec_yaml), steps + 1)
    assert relative_difference(state, unaveraged) > 10 * max(worst, 1e-6)


def test_local_sgd_with_fp16_values_averages_what_travels_in_fp16(four_workers: Cluster) -> None:
    cluster = four_workers
    steps, period = 6, 2
    spec_yaml = job_spec(ADAMW, f"{{kind: local-sgd, period: {period}, values: fp16}}", steps)
    losses, state = run_job(cluster, spec_yaml)
    spec = parse_job_spec(spec_yaml)
    want_losses, want_params = simulate_local_sgd(spec, period, torch.float16)
    loss_diff = max(abs(a - b) for a, b in zip(losses, want_losses, strict=True))
    worst = relative_difference(state, want_params)
    _, fp32_params = simulate_local_sgd(spec, period)
    print(
        f"fp16 period {period} vs simulation: largest loss difference {loss_diff:.3g}, "
        f"parameters {worst:.3g} (vs fp32 averaging {relative_difference(state, fp32_params):.3g})"
    )
    assert loss_diff < 1e-4, f"largest loss difference {loss_diff:.3g}"
    assert worst < 1e-5, f"relative parameter difference {worst:.3g}"
    assert relative_difference(state, fp32_params) > 10 * max(worst, 1e-6)  # fp16 did travel


def test_local_sgd_with_an_outer_nesterov_equals_a_diloco_simulation(four_workers: Cluster) -> None:
    cluster = four_workers
    steps, period = 6, 2
    sync = (
        f"{{kind: local-sgd, period: {period}, outer: {{name: nesterov, lr: 0.7, momentum: 0.9}}}}"
    )
    spec_yaml = job_spec(ADAMW, sync, steps)
    losses, state = run_job(cluster, spec_yaml)
    spec = parse_job_spec(spec_yaml)

    def rounds(k: int, _: str) -> bool:
        return (k + 1) % period == 0 or k == steps - 1

    want_losses, want_params = simulate(spec, rounds, outer=("nesterov", 0.7, 0.9))
    _, plain = simulate(spec, rounds)
    loss_diff = max(abs(a - b) for a, b in zip(losses, want_losses, strict=True))
    worst = relative_difference(state, want_params)
    print(
        f"outer nesterov period {period} vs simulation: largest loss difference {loss_diff:.3g}, "
        f"parameters {worst:.3g} (vs plain averaging {relative_difference(state, plain):.3g})"
    )
    assert loss_diff < 1e-4, f"largest loss difference {loss_diff:.3g}"
    assert worst < 1e-5, f"relative parameter difference {worst:.3g}"
    assert relative_difference(state, plain) > 10 * max(worst, 1e-6)  # the outer step acted


ROUND = re.compile(
    r"job (\S+) stage (\d+) replica (\d+): averaged layers (\S*) \| extra (\S*) after step (\d+)"
)


def logged_rounds(
    cluster: Cluster, job_id: str
) -> dict[tuple[int, int], dict[int, tuple[tuple[str, ...], tuple[str, ...]]]]:
    """Per (stage, replica), per step: the (scheduled, extra) layers the worker averaged."""
    rounds: dict[tuple[int, int], dict[int, tuple[tuple[str, ...], tuple[str, ...]]]] = {}
    for proc in cluster.procs:
        for m in ROUND.finditer(proc.log.read_text()):
            if m[1] == job_id:
                scheduled = tuple(x for x in m[4].split(",") if x)
                extra = tuple(x for x in m[5].split(",") if x)
                rounds.setdefault((int(m[2]), int(m[3])), {})[int(m[6])] = (scheduled, extra)
    return rounds


def test_partial_local_sgd_averages_each_layer_once_per_period_like_a_simulation(
    four_workers: Cluster,
) -> None:
    cluster = four_workers
    steps, period = 7, 3  # two whole periods, then the last step averages everything
    spec_yaml = job_spec(ADAMW, f"{{kind: partial-local-sgd, period: {period}}}", steps)
    job_id = cluster.submit(spec_yaml)
    cluster.wait_job(job_id, lambda j: j.state == "completed", "the job to complete", timeout=240)
    assert "partial local SGD" in cluster.client().plan(job_id).text
    losses, state = job_result(cluster, job_id)
    rounds = logged_rounds(cluster, job_id)
    assert sorted(rounds) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    # A layer's parameters may be cut over two stages: each stage averages its own part.
    averaged: dict[int, set[tuple[int, str]]] = {step: set() for step in range(steps)}
    stage_of = {n[len(STAGE_OF) :]: int(t) for n, t in state.items() if n.startswith(STAGE_OF)}
    partial = False
    for stage in (0, 1):
        mine, theirs = rounds[(stage, 0)], rounds[(stage, 1)]
        assert mine == theirs, "the replicas of a stage averaged different layers"
        layers = set(mine[steps - 1][0]) | set(mine[steps - 1][1])  # the last step: all
        for start in range(0, steps - period + 1, period):
            window = [mine.get(k, ((), ())) for k in range(start, start + period)]
            counts = {la: sum(la in sched for sched, _ in window) for la in layers}
            assert counts == dict.fromkeys(layers, 1), f"stage {stage}, steps {start}..: {counts}"
        for step, (sched, extra) in mine.items():
            averaged[step] |= {(stage, la) for la in (*sched, *extra)}
            partial |= step < steps - 1 and set(sched) | set(extra) != layers
    assert partial, "every round averaged every layer: nothing was partial"
    want_losses, want_params = simulate(
        parse_job_spec(spec_yaml), lambda k, n: (stage_of[n], layer_of(n)) in averaged[k]
    )
    loss_diff = max(abs(a - b) for a, b in zip(losses, want_losses, strict=True))
    worst = relative_difference(state, want_params)
    print(
        f"partial period {period} vs simulation: largest loss difference {loss_diff:.3g}, "
        f"parameters {worst:.3g}"
    )
    assert loss_diff < 1e-4, f"largest loss difference {loss_diff:.3g}"
    assert worst < 1e-5, f"relative parameter difference {worst:.3g}"
