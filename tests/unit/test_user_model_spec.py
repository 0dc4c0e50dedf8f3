"""The job spec's forms of a user's own model (`model.file`, `model.opdag`, `model.loss`,
`model.context`), and the submitter's side: a model file imported, built, wrapped in its
loss and captured on this machine, every way it can go wrong one line naming the problem.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from archipelago.model_source import ModelSourceError, prepare_model
from coordinator.planning.jobspec import JobSpecError, parse_job_spec
from opdag import model_file
from opdag.stage import StageModule
from opdag.user_model import WRAPPED, data_example
from tests.user_models import load, write_model

pytestmark = pytest.mark.unit

DATA = "data: {corpus: stdlib-text, batch_size: 4, micro_batches: 2}"


def spec_of(model: str, data: str = DATA) -> str:
    return f"name: mine\nmodel: {model}\n{data}\nsteps: 3\n"


# -- the spec ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model",
    [
        "{file: m.py, args: {d: 32, layers: [1, 2], name: x, flag: true, n: null}, context: 16}",
        "{file: mymodel.py, factory: build_logits, loss: cross_entropy, context: 16}",
        "{opdag: model.opdag, context: 16}",
    ],
)
def test_a_users_model_spec_round_trips(model: str) -> None:
    spec = parse_job_spec(spec_of(model))
    assert spec.model.uploaded and spec.model.zoo is None
    assert spec.context() == 16
    assert parse_job_spec(yaml.safe_dump(spec.to_dict())) == spec


def test_the_factory_defaults_to_build_and_args_are_kept_as_given() -> None:
    spec = parse_job_spec(spec_of("{file: m.py, args: {d: 32, widths: [1, 2]}, context: 8}"))
    assert spec.model.factory_name == "build"
    assert spec.model.args_dict() == {"d": 32, "widths": (1, 2)}
    assert spec.model.label == "m.py:build"


def test_an_image_model_needs_no_context() -> None:
    spec = parse_job_spec(spec_of("{file: m.py}", "data: {corpus: synthetic-shapes}"))
    assert spec.context() is None


@pytest.mark.parametrize(
    ("model", "starts", "says"),
    [
        ("{file: m.py}", "model.context:", "context length"),
        ("{zoo: gpt, file: m.py}", "model:", "exactly one of zoo, file or opdag"),
        ("{}", "model:", "exactly one of zoo, file or opdag"),
        ("{opdag: m.opdag, loss: mse, context: 8}", "model.loss:", "does not go with model.opdag"),
        ("{opdag: m.opdag, args: {a: 1}, context: 8}", "model.args:", "does not go with"),
        ("{zoo: gpt, loss: mse}", "model.loss:", "does not go with model.zoo"),
        ("{file: m.py, loss: hinge, context: 8}", "model.loss:", "cross_entropy, mse, nll"),
        ("{file: m.py, factory: 3x, context: 8}", "model.factory:", "name of a function"),
        ("{file: m.py, args: [1], context: 8}", "model.args:", "mapping"),
        ("{file: m.py, args: {a: {b: 1}}, context: 8}", "model.args.a:", "list of them"),
        ("{file: m.py, args: {a: .inf}, context: 8}", "model.args.a:", "finite"),
        ("{file: '', context: 8}", "model.file:", "file path"),
        ("{file: m.py, context: 0}", "model.context:", "must be in [1,"),
    ],
)
def test_bad_model_sections_name_the_field(model: str, starts: str, says: str) -> None:
    with pytest.raises(JobSpecError) as info:
        parse_job_spec(spec_of(model))
    message = str(info.value)
    assert message.startswith(starts) and says in message, message


def test_image_data_has_no_context() -> None:
    with pytest.raises(JobSpecError, match=r"^model\.context: image data has no context"):
        parse_job_spec(spec_of("{file: m.py, context: 8}", "data: {corpus: synthetic-shapes}"))


# -- the submitter: import, build, wrap, capture -----------------------------------------


def test_a_forward_that_returns_its_loss_captures_as_it_is(tmp_path: Path) -> None:
    write_model(tmp_path)
    spec = parse_job_spec(spec_of("{file: mymodel.py, args: {d: 32}, context: 16}"))
    prepared = prepare_model(spec, tmp_path)
    graph = prepared.captured.graph
    assert set(graph.inputs) == {"tokens", "targets"} and graph.loss
    user = load(tmp_path / "mymodel.py").build(d=32)
    # Every tensor of the user's module, under its own name; the initial values are the
    # factory's, seeded by the spec's seed.
    assert sorted(n for n, _ in prepared.names) == sorted(user.state_dict())
    assert prepared.missing == []
    torch.manual_seed(spec.seed)
    seeded = load(tmp_path / "mymodel.py").build(d=32)
    for name, tensor in prepared.names:
        assert torch.equal(prepared.captured.state[tensor], seeded.state_dict()[name])


def test_a_forward_that_returns_logits_is_wrapped_in_its_loss(tmp_path: Path) -> None:
    write_model(tmp_path)
    spec = parse_job_spec(
        spec_of("{file: mymodel.py, factory: build_logits, loss: cross_entropy, context: 16}")
    )
    prepared = prepare_model(spec, tmp_path)
    graph = prepared.captured.graph
    assert graph.loss and all(p.name.startswith(f"{WRAPPED}.") for p in graph.params)
    # Exported under the module's own names: the wrapper's prefix is gone.
    user = load(tmp_path / "mymodel.py").build_logits()
    assert {n for n, _ in prepared.names} == set(user.state_dict())
    # The tied head is exported as the embedding it shares.
    tied = {"head.weight": "emb.weight"}
    assert all(t == f"{WRAPPED}.{tied.get(n, n)}" for n, t in prepared.names)
    # The graph computes the same loss as the user's module with the loss applied by hand.
    user.load_state_dict({n: prepared.captured.state[t] for n, t in prepared.names})
    batch = {
        "tokens": torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1)),
        "targets": torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2)),
    }
    module = StageModule(graph, prepared.captured.state).eval()
    with torch.no_grad():
        got = float(module(batch)[graph.loss])
        logits = user.eval()(batch["tokens"])
    want = float(
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten())
    )
    assert got == pytest.approx(want, rel=1e-5)


def test_an_opdag_file_is_read_and_checked(tmp_path: Path) -> None:
    write_model(tmp_path)
    spec = parse_job_spec(spec_of("{file: mymodel.py, context: 16}"))
    model_file.save(prepare_model(spec, tmp_path).captured, tmp_path / "model.opdag")
    again = prepare_model(parse_job_spec(spec_of("{opdag: model.opdag, context: 16}")), tmp_path)
    assert again.names == [] and again.captured.graph.loss
    # Captured for micro-batches of 2: a job of micro-batches of 4 does not fit it.
    bigger = "data: {corpus: stdlib-text, batch_size: 4, micro_batches: 1}"
    with pytest.raises(ModelSourceError, match=r"^model: input '(tokens|targets)' was captured"):
        prepare_model(
            parse_job_spec(spec_of("{opdag: model.opdag, context: 16}", bigger)), tmp_path
        )
    (tmp_path / "bad.opdag").write_bytes(b"not a model")
    with pytest.raises(ModelSourceError, match=r"^model\.opdag: .*bad magic"):
        prepare_model(parse_job_spec(spec_of("{opdag: bad.opdag, context: 16}")), tmp_path)


def test_unused_tensors_are_noted_not_exported(tmp_path: Path) -> None:
    write_model(tmp_path)
    spec = parse_job_spec(spec_of("{file: mymodel.py, factory: build_unused, context: 16}"))
    prepared = prepare_model(spec, tmp_path)
    assert prepared.missing == ["spare.weight", "spare.bias"]


# Each bad model file, factory or forward: (model section, the one line's pattern).
PROBLEMS = {
    "no-file": ("{file: nowhere.py}", r"^model\.file: no file '.*nowhere\.py'$"),
    "no-factory": (
        "{file: mymodel.py, factory: absent}",
        r"^model\.factory: mymodel\.py has no function 'absent'$",
    ),
    "factory-raises": (
        "{file: mymodel.py, factory: broken}",
        r"^model\.factory: mymodel\.py:broken\(\) raised RuntimeError: the factory is broken$",
    ),
    "bad-args": (
        "{file: mymodel.py, args: {q: 1}}",
        r"^model\.factory: mymodel\.py:build\(q=1\) raised TypeError: .*'q'",
    ),
    "not-a-module": (
        "{file: mymodel.py, factory: not_a_module}",
        r"^model\.factory: .* returned int, not a torch\.nn\.Module$",
    ),
    "inputs-differ": (
        "{file: mymodel.py, factory: build_logits}",
        r"^model: the forward takes \(tokens\) but the data gives \(tokens, targets\)",
    ),
    "outside-the-allow-list": (
        "{file: mymodel.py, factory: build_spectral}",
        r"^model: cannot capture mymodel\.py:build_spectral: .*fft",
    ),
    "import-fails": (
        "{file: broken_import.py}",
        r"^model\.file: importing broken_import\.py failed: ModuleNotFoundError: ",
    ),
    "context-too-long": ("{file: mymodel.py, context: 32}", r"^model: cannot capture "),
}


@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_each_problem_is_one_line_naming_it(tmp_path: Path, problem: str) -> None:
    model, message = PROBLEMS[problem]
    if "context" not in model:
        model = model[:-1] + ", context: 16}"
    write_model(tmp_path)
    (tmp_path / "broken_import.py").write_text("import a_module_that_is_not_there\n")
    with pytest.raises(ModelSourceError) as info:
        prepare_model(parse_job_spec(spec_of(model)), tmp_path)
    text = str(info.value)
    assert "\n" not in text
    assert re.search(message, text), text


def test_data_example_is_one_micro_batch_on_the_meta_device() -> None:
    spec = parse_job_spec(spec_of("{file: m.py, context: 16}"))
    example = data_example(spec.data, spec.context())
    assert {k: (tuple(v.shape), v.dtype, v.device.type) for k, v in example.items()} == {
        "tokens": ((2, 16), torch.int64, "meta"),
        "targets": ((2, 16), torch.int64, "meta"),
    }
