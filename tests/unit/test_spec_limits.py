"""A job spec's bounds: its YAML (size, nesting, values, no anchors or aliases) and the job
it describes (batch, micro-batches, steps, the model's predicted size), each refused with a
message naming the field, the bound and its flag, and each configurable."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch

from coordinator.planning.job_size import check_job_size, predicted_size
from coordinator.planning.jobspec import JobSpecError, parse_job_spec
from coordinator.planning.spec_limits import GB, SpecLimits
from coordinator.planning.spec_yaml import read_spec_yaml
from opdag.capture import capture
from opdag.zoo import build_model, example_batch

SPEC = """
name: small
model: {zoo: gpt, args: {layers: 2, d_model: 32, heads: 2, context: 16}}
data: {corpus: stdlib-text, batch_size: 8, micro_batches: 2}
steps: 10
"""
LIMITS = SpecLimits()


def alias_bomb() -> str:
    """The "billion laughs" as YAML: 9 levels of 9 aliases each, 9**9 strings in 342 bytes."""
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def spec_with(**fields: str) -> str:
    """SPEC with some top-level lines replaced (`data="{...}"`)."""
    lines = SPEC.strip().splitlines()
    for key, value in fields.items():
        lines = [f"{key}: {value}" if line.startswith(f"{key}:") else line for line in lines]
    return "\n".join(lines) + "\n"


def refusal(text: str, limits: SpecLimits | None = LIMITS) -> str:
    with pytest.raises(JobSpecError) as info:
        parse_job_spec(text, limits)
    return str(info.value)


# -- the YAML text ---------------------------------------------------------------------------


def test_alias_bomb_is_refused_at_once_naming_the_alias() -> None:
    bomb = alias_bomb()
    assert len(bomb.encode()) < 512
    began = time.perf_counter()
    message = refusal(bomb)
    assert time.perf_counter() - began < 0.05
    assert message.startswith("spec: line 1, column 4: YAML anchor &a (and any alias *a)")
    assert "no anchors, aliases or merge keys" in message


def test_alias_bomb_inside_a_job_spec_is_refused_without_limits_too() -> None:
    text = SPEC + "extra: &x [1, 2]\nmore: *x\n"
    assert "YAML anchor &x" in refusal(text, None)


def test_an_alias_is_refused_naming_it() -> None:
    assert refusal("name: *who\n") == (
        "spec: line 1, column 7: YAML alias *who is refused: a job spec writes every value out "
        "(no anchors, aliases or merge keys)"
    )


def test_a_merge_key_is_refused_as_the_alias_it_needs() -> None:
    text = "base: &b {steps: 3}\nother:\n  <<: *b\n"
    assert "YAML anchor &b" in refusal(text)


@pytest.mark.parametrize("char", ["\x00", "\x01", "\x7f"])
def test_a_control_character_is_a_spec_error(char: str) -> None:
    assert refusal(SPEC + char).startswith("spec: invalid YAML")


def test_deep_nesting_is_refused_naming_the_bound_and_flag() -> None:
    text = "name: " + "[" * 16 + "]" * 16 + "\n"  # the lists are 2 to 17 deep
    assert refusal(text).endswith(
        "values are nested more than 16 deep, the most this coordinator reads (--max-spec-depth)"
    )
    # A bound that allows it reads it (the spec is then wrong for other reasons).
    nested: list[Any] = []
    for _ in range(15):
        nested = [nested]
    assert read_spec_yaml(text, SpecLimits(max_depth=17)) == {"name": nested}


def test_deep_nesting_past_the_recursion_limit_is_refused_quickly() -> None:
    text = "[" * 30_000 + "]" * 30_000
    began = time.perf_counter()
    assert "--max-spec-depth" in refusal(text)
    assert time.perf_counter() - began < 1.0


def test_too_many_values_are_refused_naming_the_bound_and_flag() -> None:
    text = "name: [" + ", ".join(["1"] * 2000) + "]\n"
    assert refusal(text).endswith(
        "the document holds more than 2000 values, the most this coordinator reads "
        "(--max-spec-nodes)"
    )
    assert len(read_spec_yaml(text, SpecLimits(max_nodes=3000))["name"]) == 2000  # type: ignore[index]


def test_a_long_text_is_refused_naming_the_bound_and_flag() -> None:
    text = SPEC + "#" * (64 << 10)
    assert refusal(text) == (
        f"spec: is {len(text)} bytes long ({len(text)} characters); this coordinator reads "
        "job specs of at most 65536 bytes (--max-spec-bytes)"
    )
    assert parse_job_spec(text, SpecLimits(max_bytes=1 << 20)).name == "small"


def test_the_text_bound_counts_bytes_not_characters() -> None:
    text = SPEC + "# " + "é" * 40_000  # 80 KB in 40 K characters
    assert "--max-spec-bytes" in refusal(text)


# -- the job's figures -------------------------------------------------------------------------


def test_absurd_batch_size_is_refused_naming_the_field_and_bound() -> None:
    text = spec_with(data="{corpus: stdlib-text, batch_size: 4294967295, micro_batches: 1}")
    assert refusal(text) == (
        "data.batch_size: 4294967295 is too many; this coordinator accepts at most 65536 "
        "(--max-batch-size)"
    )
    # Without a coordinator's limits (the CLI's own check), only the protocol's bounds hold.
    assert parse_job_spec(text).data.batch_size == 4294967295


def test_batch_size_bound_is_configurable() -> None:
    assert parse_job_spec(SPEC, LIMITS).data.batch_size == 8
    assert refusal(SPEC, SpecLimits(max_batch_size=4)) == (
        "data.batch_size: 8 is too many; this coordinator accepts at most 4 (--max-batch-size)"
    )


def test_micro_batches_and_steps_are_bounded() -> None:
    text = spec_with(data="{corpus: stdlib-text, batch_size: 4096, micro_batches: 2048}")
    assert refusal(text) == (
        "data.micro_batches: 2048 is too many; this coordinator accepts at most 1024 "
        "(--max-micro-batches)"
    )
    assert refusal(SPEC, SpecLimits(max_micro_batches=1)).startswith("data.micro_batches: 2 ")
    assert refusal(SPEC, SpecLimits(max_steps=5)) == (
        "steps: 10 is too many; this coordinator accepts at most 5 (--max-steps)"
    )


def test_trillion_parameter_model_is_refused_before_anything_is_built() -> None:
    args = "{layers: 96, d_model: 32768, heads: 128, context: 2048}"
    text = spec_with(model=f"{{zoo: gpt, args: {args}}}")
    began = time.perf_counter()
    message = refusal(text)
    assert time.perf_counter() - began < 0.5  # a built model would take minutes, and 5 TB
    assert message == (
        "model.args: gpt with these args has 1.24e+12 parameters; this coordinator accepts at "
        "most 1e+09 (--max-model-params)"
    )
    small = SpecLimits(max_parameters=1000)
    assert "at most 1e+03 (--max-model-params)" in refusal(SPEC, small)


def test_model_with_too_many_operators_is_refused() -> None:
    text = spec_with(model="{zoo: gpt, args: {layers: 3000, d_model: 8, heads: 1, context: 8}}")
    message = refusal(text)
    assert message.startswith("model.args: gpt with these args has about ")
    assert message.endswith(
        "operators; this coordinator accepts at most 20000 (--max-model-operators)"
    )


def test_model_too_big_to_train_is_refused_from_its_predicted_memory() -> None:
    # A long context: the attention of one micro-batch alone is hundreds of gigabytes.
    model = "{zoo: gpt, args: {layers: 2, d_model: 64, heads: 8, context: 16384}}"
    text = spec_with(model=model, data="{corpus: stdlib-text, batch_size: 16, micro_batches: 1}")
    message = refusal(text)
    assert message.startswith("model.args: gpt with these args needs about ")
    assert "GB to train on micro-batches of 16" in message
    assert message.endswith("this coordinator accepts at most 64 GB (--max-model-memory-gb)")
    assert parse_job_spec(text, SpecLimits(max_memory_bytes=1 << 50)).model.zoo == "gpt"


def test_limits_must_be_whole_numbers_of_at_least_one() -> None:
    with pytest.raises(ValueError, match="--max-batch-size must be a whole number >= 1"):
        SpecLimits(max_batch_size=0)


# -- the predicted size ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("zoo", "args"),
    [
        ("gpt", {}),
        ("gpt", {"layers": 3, "d_model": 48, "heads": 4, "context": 20, "mlp_ratio": 2}),
        ("moe-gpt", {}),
        ("moe-gpt", {"layers": 3, "d_model": 32, "heads": 2, "experts": 3, "moe_every": 2}),
        ("resnet", {}),
        ("resnet", {"widths": [8, 8, 24, 16], "blocks": [2, 1, 3, 1], "in_channels": 1}),
        ("mlp", {}),
        ("mlp", {"in_features": 1024, "hidden": 17, "layers": 1, "num_classes": 3}),
    ],
)
def test_predicted_parameters_are_exactly_the_built_models(zoo: str, args: dict[str, Any]) -> None:
    built = build_model(zoo, args)
    size = predicted_size(zoo, args, micro_batch_size=2)
    assert size.parameters == sum(p.numel() for p in built.parameters())
    # Weights, gradients and adamw's two moments at least, and one micro-batch's activations.
    assert size.memory_bytes > 16 * size.parameters
    sgd = predicted_size(zoo, args, micro_batch_size=2, optimizer="sgd")
    assert size.memory_bytes - sgd.memory_bytes == 4 * size.parameters


@pytest.mark.parametrize(
    ("zoo", "args"),
    [
        ("gpt", {"layers": 2}),
        ("moe-gpt", {"layers": 4, "experts": 3, "moe_every": 2}),
        ("resnet", {"widths": [8, 16], "blocks": [3, 2]}),
        ("mlp", {}),
    ],
)
def test_predicted_operators_are_at_least_the_captured_graphs(
    zoo: str, args: dict[str, Any]
) -> None:
    captured = capture(build_model(zoo, args), example_batch(zoo, args, 2, device="meta"))
    predicted = predicted_size(zoo, args, micro_batch_size=2).operators
    assert len(captured.graph.nodes) <= predicted <= 1.5 * len(captured.graph.nodes)


def test_predicted_memory_grows_with_the_micro_batch() -> None:
    one = predicted_size("gpt", {}, micro_batch_size=1).memory_bytes
    eight = predicted_size("gpt", {}, micro_batch_size=8).memory_bytes
    state = 16 * predicted_size("gpt", {}, micro_batch_size=1).parameters
    assert eight - state == pytest.approx(8 * (one - state))


def test_check_job_size_gives_the_size_of_an_accepted_job() -> None:
    spec = parse_job_spec(SPEC)
    size = check_job_size(spec, LIMITS)
    built = build_model("gpt", spec.model.args_dict())
    assert size.parameters == sum(p.numel() for p in built.parameters())
    assert size.memory_bytes < GB
    assert torch.get_default_dtype() == torch.float32  # the 4 bytes a value it assumes
