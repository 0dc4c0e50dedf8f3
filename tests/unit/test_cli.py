"""The `archipelago` command's OP-DAG subcommands, and how it answers bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from archipelago.cli import main
from archipelago.job_lines import job_line, replica_lines
from archipelago.views import GroupView, JobView, ReplicaView, StageView
from opdag import model_file
from opdag.ir import Node

pytestmark = pytest.mark.unit

GPT_ARGS = ["--arg", "layers=2", "--arg", "d_model=32", "--arg", "heads=2", "--arg", "context=16"]


@pytest.fixture(scope="module")
def gpt_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "gpt.opdag"
    assert main(["capture", "--model", "gpt", *GPT_ARGS, "--batch", "4", "--out", str(path)]) == 0
    return path


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_capture_writes_a_file_that_dag_summarises(gpt_file: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = run_cli(["dag", str(gpt_file)], capsys)
    assert code == 0
    model = model_file.load(gpt_file)
    assert f"nodes       {len(model.graph.nodes)}" in out
    assert "heaviest edges" in out and "cross_entropy" in out

    code, out, _ = run_cli(["dag", str(gpt_file), "--json", "--top", "3"], capsys)
    summary = json.loads(out)
    assert summary["nodes"] == len(model.graph.nodes)
    assert summary["params"] == sum(t.numel() for t in model.state.values())
    assert summary["loss"] == model.graph.loss
    assert len(summary["heaviest_edges"]) == 3
    assert summary["fwd_flops"] > 0 and summary["bwd_flops"] > summary["fwd_flops"]


def test_partition_prints_stages_and_cut_edges(gpt_file: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = run_cli(["partition", str(gpt_file), "--stages", "2", "--json"], capsys)
    assert code == 0
    result = json.loads(out)
    assert [s["stage"] for s in result["stages"]] == [0, 1]
    assert result["edges"] and all(e["bytes"] > 0 for e in result["edges"])
    code, out, _ = run_cli(["partition", str(gpt_file), "--stages", "2"], capsys)
    assert "values crossing stages" in out


def _assert_clean_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    assert err.startswith("archipelago: error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


def test_corrupt_and_truncated_files_are_refused(gpt_file: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    data = gpt_file.read_bytes()
    (tmp_path / "short.opdag").write_bytes(data[: len(data) // 2])
    _assert_clean_error(*run_cli(["dag", str(tmp_path / "short.opdag")], capsys)[::2], "truncated")
    flipped = bytearray(data)
    flipped[len(data) // 3] ^= 0x10
    (tmp_path / "flip.opdag").write_bytes(bytes(flipped))
    _assert_clean_error(*run_cli(["dag", str(tmp_path / "flip.opdag")], capsys)[::2], "corrupt")
    (tmp_path / "text.opdag").write_text("hello")
    _assert_clean_error(
        *run_cli(["dag", str(tmp_path / "text.opdag")], capsys)[::2], "not an .opdag"
    )
    _assert_clean_error(
        *run_cli(["dag", str(tmp_path / "missing.opdag")], capsys)[::2], "cannot read"
    )


def test_file_with_an_unknown_operator_is_refused_naming_it(
    gpt_file: Path, tmp_path: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    model = model_file.load(gpt_file)
    g = model.graph
    bad = tuple(
        Node(n.name, "function", "os.system", n.args, n.kwargs, source=n.source)
        if n.name == g.compute_nodes[3].name
        else n
        for n in g.nodes
    )
    # Written with the raw codec pieces: the encoder does not validate, the decoder must.
    from dataclasses import replace

    blob = model_file.encode_model(replace(model, graph=replace(g, nodes=bad)))
    (tmp_path / "bad.opdag").write_bytes(blob)
    code, _, err = run_cli(["dag", str(tmp_path / "bad.opdag")], capsys)
    _assert_clean_error(code, err, "os.system", g.compute_nodes[3].name, "allow-list")


def test_non_convex_assignment_is_refused(gpt_file: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    g = model_file.load(gpt_file).graph
    names = [n.name for n in g.compute_nodes]
    assignment = {name: 0 for name in names}
    # A node in the middle goes to stage 1, its readers stay in stage 0.
    middle = next(n for n in names[len(names) // 3 :] if g.consumers[n])
    assignment[middle] = 1
    (tmp_path / "assign.json").write_text(json.dumps(assignment))
    code, _, err = run_cli(
        ["partition", str(gpt_file), "--assign", str(tmp_path / "assign.json")], capsys
    )
    _assert_clean_error(code, err, "not convex", middle)
    (tmp_path / "list.json").write_text("[1, 2]")
    code, _, err = run_cli(
        ["partition", str(gpt_file), "--assign", str(tmp_path / "list.json")], capsys
    )
    _assert_clean_error(code, err, "must map node names")


def test_bad_model_names_and_arguments_are_refused(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = str(tmp_path / "x.opdag")
    code, _, err = run_cli(["capture", "--model", "transformer-xl", "--out", out], capsys)
    _assert_clean_error(code, err, "transformer-xl")
    code, _, err = run_cli(["capture", "--model", "gpt", "--arg", "layerz=3", "--out", out], capsys)
    _assert_clean_error(code, err, "layerz")
    code, _, err = run_cli(["capture", "--model", "gpt", "--arg", "oops", "--out", out], capsys)
    _assert_clean_error(code, err, "NAME=VALUE")
    assert not (tmp_path / "x.opdag").exists()


def test_console_script_exits_nonzero_without_traceback(tmp_path: Path) -> None:
    (tmp_path / "junk.opdag").write_bytes(b"\x89OPDAG\r\n" + bytes(range(40)))
    exe = shutil.which("archipelago", path=str(Path(sys.executable).parent))
    cmd = [exe] if exe else [sys.executable, "-m", "archipelago.cli"]
    result = subprocess.run(
        [*cmd, "dag", str(tmp_path / "junk.opdag")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("archipelago: error:")


# -- what `status` and `watch` print of a job's replicas -------------------------------------


def replicated_job(replicas: int) -> JobView:
    stages = tuple(
        StageView(s, f"w{r}{s}", f"w{r}{s}", "127.0.0.1:1", 1, 1, 1.0, r)
        for r in range(replicas)
        for s in range(2)
    )
    return JobView(
        "j1", "gpt", "running", 100, 41, 2.5, 30.0, 60.0, 1, 40, "", 0, 16, 0, 0.0, stages,
        replica_metrics=tuple(
            ReplicaView(r, 40, 20, 15.0 - r, 2_400_000, 0.35, 3 * r, r == 0)
            for r in range(replicas)
        ),
        group_metrics=tuple(
            GroupView(s, tuple(range(replicas)), 20, 4_800_000, 0.4, 3, 5, replicas - 1)
            for s in range(2)
        ),
    )  # fmt: skip


def test_the_job_line_counts_replicas_only_when_there_are_several() -> None:
    assert job_line(replicated_job(3)).endswith("ETA 00:01:00  3 replicas")
    assert "replicas" not in job_line(replicated_job(1))


def test_a_line_per_replica_then_per_sync_group() -> None:
    assert replica_lines(replicated_job(2)) == [
        "replica 0 (speaker): step 40, 15.0 samples/s, averaging 2.4 MB in 0.350 s per step, "
        "staleness 0",
        "replica 1: step 40, 14.0 samples/s, averaging 2.4 MB in 0.350 s per step, staleness 3",
        "stage 0 sync group (replicas 0, 1): averaging 4.8 MB in 0.400 s per step, 5 of the "
        "last 20 steps averaged, the latest of 1 shares, staleness 3",
        "stage 1 sync group (replicas 0, 1): averaging 4.8 MB in 0.400 s per step, 5 of the "
        "last 20 steps averaged, the latest of 1 shares, staleness 3",
    ]
    assert replica_lines(replicated_job(1)) == []
