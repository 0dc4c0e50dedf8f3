"""A user's own model end to end, with real processes: a model file written here (a small
GPT-like module in plain torch whose forward returns logits, `loss: cross_entropy` in the
spec) is submitted through the CLI to a coordinator with two workers, trained in two
stages, and exported; the exported file loads into the user's module with strict=True and
gives, on the coordinator's held-out batch, the validation loss the coordinator reported.
A coordinator restarted on the same store still has the model: it exports the same file.
Each bad input is one `archipelago: error:` line, and the store holds no job for it.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from coordinator.datasets import Datasets
from coordinator.planning.jobspec import parse_job_spec
from coordinator.store import open_store
from opdag.data import build_source
from tests.multiproc.cluster import OPERATOR_TOKEN, Cluster, wait_for
from tests.user_models import load, write_model

pytestmark = pytest.mark.multiproc

STEPS = 6
SPEC = f"""
name: own-model
model:
  file: mymodel.py
  factory: build_logits
  args: {{d: 32, layers: 2, heads: 2, context: 16}}
  loss: cross_entropy
  context: 16
data: {{corpus: stdlib-text, batch_size: 8, micro_batches: 2, max_bytes: 300000}}
optimizer: {{name: adamw, lr: 3.0e-3}}
steps: {STEPS}
parallel: {{stages: 2}}
checkpoint: {{every: {STEPS}}}
validation: {{batches: 1}}
"""


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path / "cluster")
    yield c
    c.close()


def cli(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    common = ["--coordinator", cluster.address, "--operator-token", OPERATOR_TOKEN]
    return subprocess.run(
        [sys.executable, "-m", "archipelago.cli", *args, *common, "--ca", str(cluster.ca_file)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def stored_jobs(cluster: Cluster) -> list[str]:
    with open_store(cluster.store) as store:
        return sorted(j["job_id"] for j in store.list_jobs())


def expected_loss(folder: Path, weights: dict[str, torch.Tensor]) -> float:
    """The user's own module with the exported weights, on the coordinator's held-out
    batch, in plain torch."""
    spec = parse_job_spec(SPEC)
    user = load(folder / "mymodel.py").build_logits(**spec.model.args_dict())
    user.load_state_dict(weights, strict=True)
    user.eval()
    (batch,) = build_source(spec.data, context=spec.context()).val_batches(1)
    with torch.no_grad():
        logits = user(batch["tokens"])
        return float(F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten()))


def test_a_users_model_file_is_trained_and_exported(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    for name in ("w0", "w1"):
        cluster.start_worker(name)
    write_model(tmp_path)
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(SPEC)

    out = cli(cluster, "submit", str(spec_path))
    assert out.returncode == 0, out.stderr + cluster.logs()
    job_id = out.stdout.strip().splitlines()[-1]
    done = cluster.wait_job(
        job_id, lambda j: j.state == "completed" and j.val_step == STEPS, "the job to complete", 300
    )
    assert len({s.stage for s in done.stages}) == 2 and len({s.worker_id for s in done.stages}) == 2
    assert done.val_loss is not None

    exported = tmp_path / "model.safetensors"
    out = cli(cluster, "export", job_id, "--out", str(exported))
    assert out.returncode == 0, out.stderr
    assert f"checkpoint of step {STEPS}" in out.stdout
    weights = load_file(str(exported))
    with safe_open(str(exported), "pt") as f:
        assert f.metadata() == {"job": job_id, "step": str(STEPS), "format": "pt"}
    # The module's own names (no loss wrapper's prefix), every one of them.
    got = expected_loss(tmp_path, weights)
    print(f"validation loss: coordinator {done.val_loss:.6f}, exported model {got:.6f}")
    assert got == pytest.approx(done.val_loss, rel=1e-5, abs=1e-6)
    # Trained: not the factory's initial weights.
    torch.manual_seed(0)
    initial = load(tmp_path / "mymodel.py").build_logits(**parse_job_spec(SPEC).model.args_dict())
    assert expected_loss(tmp_path, initial.state_dict()) > got

    # A coordinator restarted on the same store still holds the model and its checkpoint.
    cluster.kill(cluster.coordinator)  # type: ignore[arg-type]
    cluster.start_coordinator("coordinator-2")
    again = tmp_path / "again.safetensors"
    out = wait_for(
        "the restarted coordinator to export",
        lambda: r if (r := cli(cluster, "export", job_id, "--out", str(again))).returncode == 0
        else None,
        60,
    )  # fmt: skip
    assert out.returncode == 0
    second = load_file(str(again))
    assert second.keys() == weights.keys()
    assert all(torch.equal(second[k], weights[k]) for k in weights)

    # A job without a checkpoint yet is refused, clearly.
    waiting = (
        SPEC.replace("name: own-model", "name: waits")
        .replace("steps: 6", "steps: 100000")
        .replace(f"every: {STEPS}", "every: 100000")
    )
    spec_path.write_text(waiting)
    out = cli(cluster, "submit", str(spec_path))
    assert out.returncode == 0, out.stderr
    waiting_id = out.stdout.strip().splitlines()[-1]
    out = cli(cluster, "export", waiting_id, "--out", str(tmp_path / "none.safetensors"))
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert lines[0].startswith(f"archipelago: error: job {waiting_id} has no complete checkpoint")
    assert not (tmp_path / "none.safetensors").exists()
    assert cli(cluster, "cancel", waiting_id).returncode == 0


# A token file of the user's own: a byte-level stream with structure to learn.
TOKEN_SPEC = """
name: own-model-own-data
model: {file: mymodel.py, args: {d: 32, layers: 2, heads: 2, context: 16}, context: 16}
data: {dataset: mytokens, batch_size: 8, micro_batches: 2}
optimizer: {name: adamw, lr: 3.0e-3}
steps: 4
parallel: {stages: 2}
checkpoint: {every: 4}
validation: {batches: 1}
"""


def test_a_users_model_on_a_users_token_file(cluster: Cluster, tmp_path: Path) -> None:
    """The other form of model (a forward that returns its loss, no wrapper) on the user's
    own token file, put with `archipelago data put`: trained in two stages, exported; the
    exported file gives the coordinator's validation loss on the dataset's held-out batch."""
    cluster.start_coordinator()
    for name in ("w0", "w1"):
        cluster.start_worker(name)
    write_model(tmp_path)
    tokens = (torch.arange(40_000) * 37 % 251).to(torch.int32).numpy().astype("<u2")
    (tmp_path / "mytokens.bin").write_bytes(tokens.tobytes())
    out = cli(cluster, "data", "put", str(tmp_path / "mytokens.bin"))
    assert out.returncode == 0, out.stderr
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(TOKEN_SPEC)
    out = cli(cluster, "submit", str(spec_path))
    assert out.returncode == 0, out.stderr + cluster.logs()
    job_id = out.stdout.strip().splitlines()[-1]
    done = cluster.wait_job(
        job_id, lambda j: j.state == "completed" and j.val_step == 4, "the job to complete", 300
    )
    exported = tmp_path / "model.safetensors"
    out = cli(cluster, "export", job_id, "--out", str(exported))
    assert out.returncode == 0, out.stderr

    spec = parse_job_spec(TOKEN_SPEC)
    user = load(tmp_path / "mymodel.py").build(**spec.model.args_dict())
    user.load_state_dict(load_file(str(exported)), strict=True)
    user.eval()
    with open_store(cluster.store) as store:  # the held-out batch, as the coordinator reads it
        datasets = Datasets(store)
        reader = datasets.reader(asyncio.run(datasets.resolve("mytokens")))
        (batch,) = build_source(spec.data, context=16, dataset=reader).val_batches(1)
    with torch.no_grad():
        got = float(user(**batch))
    print(f"validation loss: coordinator {done.val_loss:.6f}, exported model {got:.6f}")
    assert done.val_loss is not None
    assert got == pytest.approx(done.val_loss, rel=1e-5, abs=1e-6)


# Each bad input: the model section (or the file's text) and what its one line must say.
BAD = {
    "file-missing": ("file: nowhere.py", "model.file: no file"),
    "factory-missing": ("file: mymodel.py\n  factory: absent", "has no function 'absent'"),
    "factory-raises": ("file: mymodel.py\n  factory: broken", "raised RuntimeError"),
    "outside-the-allow-list": ("file: mymodel.py\n  factory: build_spectral", "fft"),
    "inputs-differ": ("file: mymodel.py\n  factory: build_logits", "the forward takes (tokens)"),
}


def test_bad_inputs_are_one_line_and_store_nothing(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    write_model(tmp_path)
    for name, (model, says) in BAD.items():
        spec_path = tmp_path / f"{name}.yaml"
        spec_path.write_text(
            f"name: {name}\nmodel:\n  {model}\n  context: 16\n"
            "data: {corpus: stdlib-text, batch_size: 4, micro_batches: 2}\nsteps: 3\n"
        )
        out = cli(cluster, "submit", str(spec_path))
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1, (name, out.stderr)
        assert lines[0].startswith("archipelago: error: model") and says in lines[0], lines
        assert stored_jobs(cluster) == [], name
    # The coordinator refuses a model file's spec handed to it without its model (through
    # the zoo's SubmitJob).
    client = cluster.client()
    try:
        with pytest.raises(Exception, match="uploads it with the job"):
            client.submit(
                "name: x\nmodel: {file: mymodel.py, context: 16}\n"
                "data: {corpus: stdlib-text}\nsteps: 3\n"
            )
    finally:
        client.close()
    assert stored_jobs(cluster) == []
