"""A stage rebuilt from the .opdag file alone, in a process that never imported the model's
class, computes exactly what the original model computes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from opdag import graph_serde, model_file
from opdag.capture import capture
from opdag.partition import balanced_assignment, partition
from opdag.stage import StageModule
from opdag.zoo import build_model, example_batch

pytestmark = pytest.mark.multiproc

# Runs in the fresh process: only the file, the assignment and the inputs cross over.
STAGE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from opdag import graph_serde, model_file
    from opdag.partition import partition
    from opdag.stage import StageModule

    work = Path(sys.argv[1])
    model = model_file.load(work / "model.opdag")
    assignment = json.loads((work / "assignment.json").read_text())
    stages = partition(model.graph, assignment).stages
    values = {}
    for name in model.graph.inputs:
        values[name] = graph_serde.decode_tensor((work / f"in_{name}.bin").read_bytes())[1]
    for stage in stages:
        module = StageModule(stage.graph, model.state)
        outputs = module({k: values[k] for k in stage.graph.inputs})
        values.update(outputs)
        for name, value in outputs.items():
            blob = graph_serde.encode_tensor(name, value)
            (work / f"out_{stage.index}_{name}.bin").write_bytes(blob)
    model_code = ("opdag.zoo", "opdag.capture")
    print(json.dumps(sorted(m for m in sys.modules if m.startswith(model_code))))
    """
)

CASES = {
    "gpt": {"layers": 2, "d_model": 32, "heads": 2, "context": 16},
    "moe-gpt": {"layers": 2, "d_model": 32, "heads": 2, "context": 16},
    "resnet": {"widths": (8, 16, 16)},
}


@pytest.mark.parametrize("name", CASES)
def test_stage_rebuilt_from_file_in_fresh_process_gives_same_outputs(
    name: str, tmp_path: Path
) -> None:
    args = CASES[name]
    model = build_model(name, args, seed=3)
    captured = capture(model, example_batch(name, args, 4, device="meta"), name=name)
    model_file.save(captured, tmp_path / "model.opdag")
    assignment = balanced_assignment(captured.graph, 3)
    (tmp_path / "assignment.json").write_text(json.dumps(assignment))

    gen = torch.Generator().manual_seed(1)
    inputs = {}
    for key, t in example_batch(name, args, 4).items():
        if t.dtype == torch.long:
            high = 10 if name == "resnet" else 256
            inputs[key] = torch.randint(0, high, t.shape, generator=gen)
        else:
            inputs[key] = torch.randn(t.shape, generator=gen)
        (tmp_path / f"in_{key}.bin").write_bytes(graph_serde.encode_tensor(key, inputs[key]))

    result = subprocess.run(
        [sys.executable, "-c", STAGE_SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    # The fresh process never imported the zoo (the model's classes) nor the tracer.
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []

    # Expected values: the same stages in this process, and the original eager model.
    values: dict[str, torch.Tensor] = dict(inputs)
    for stage in partition(captured.graph, assignment).stages:
        outputs = StageModule(stage.graph, captured.state)(
            {k: values[k] for k in stage.graph.inputs}
        )
        values.update(outputs)
        for key, value in outputs.items():
            path = tmp_path / f"out_{stage.index}_{key}.bin"
            theirs = graph_serde.decode_tensor(path.read_bytes())[1]
            assert torch.equal(theirs, value.detach()), f"stage {stage.index} output {key}"
    loss = values[captured.graph.loss]
    assert torch.equal(loss.detach(), model(**inputs).detach())
