"""Job specs: the examples parse, specs round-trip, and every bad field is named."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from coordinator.planning.jobspec import (
    PLANNERS,
    CheckpointSpec,
    CompressionSpec,
    JobSpec,
    JobSpecError,
    ModelSpec,
    ParallelSpec,
    SyncSpec,
    load_job_spec,
    parse_job_spec,
)
from coordinator.planning.sync_spec import OuterSpec
from opdag.data import DataConfig
from opdag.errors import OpDagError
from opdag.optim import OptimizerConfig

pytestmark = pytest.mark.unit

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
DELETE = object()  # a change that removes the key

BASE: dict[str, Any] = {
    "name": "gpt-small",
    "model": {"zoo": "gpt", "args": {"layers": 2, "d_model": 64, "heads": 4, "context": 32}},
    "data": {"corpus": "stdlib-text", "batch_size": 8, "micro_batches": 2},
    "optimizer": {"name": "adamw", "lr": 3.0e-4},
    "steps": 40,
    "parallel": {"planner": "even", "stages": "auto"},
    "checkpoint": {"every": 10},
}


def spec_text(*changes: tuple[str, Any]) -> str:
    """BASE as YAML, with each (dotted path, value) change applied (DELETE removes)."""
    doc = copy.deepcopy(BASE)
    for path, value in changes:
        *parents, last = path.split(".")
        node = doc
        for key in parents:
            node = node.setdefault(key, {})
        if value is DELETE:
            del node[last]
        else:
            node[last] = value
    return yaml.safe_dump(doc, sort_keys=False)


def error_of(text: str) -> str:
    with pytest.raises(JobSpecError) as info:
        parse_job_spec(text)
    return str(info.value)


# -- good specs --------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_parses_and_round_trips(path: Path) -> None:
    spec = load_job_spec(path)
    assert spec.name == path.stem
    assert parse_job_spec(yaml.safe_dump(spec.to_dict())) == spec
    assert path.read_text().startswith("#"), "an example starts with a comment header"


def test_the_expected_examples_exist() -> None:
    names = {p.stem for p in EXAMPLES.glob("*.yaml")}
    assert {"gpt-small", "gpt-tiny", "resnet", "moe-gpt"} <= names


def test_gpt_small_example_is_the_design_cards_job() -> None:
    spec = load_job_spec(EXAMPLES / "gpt-small.yaml")
    args = spec.model.args_dict()
    assert spec.model.zoo == "gpt"
    assert (args["layers"], args["d_model"], args["heads"], args["context"]) == (6, 256, 8, 128)
    assert (spec.data.corpus, spec.data.batch_size, spec.data.micro_batches) == (
        "stdlib-text",
        16,
        4,
    )
    assert spec.optimizer == OptimizerConfig(name="adamw", lr=3e-4)
    assert (spec.steps, spec.checkpoint.every) == (500, 50)


def test_gpt_tiny_example_is_small_and_checkpoints_often() -> None:
    spec = load_job_spec(EXAMPLES / "gpt-tiny.yaml")
    args = spec.model.args_dict()
    assert (args["layers"], args["d_model"], args["heads"], args["context"]) == (2, 64, 4, 32)
    assert (spec.data.batch_size, spec.data.micro_batches) == (8, 2)
    assert (spec.steps, spec.checkpoint.every) == (40, 10)


def test_minimal_spec_gets_defaults() -> None:
    spec = parse_job_spec(
        "name: m\nmodel: {zoo: resnet}\ndata: {corpus: synthetic-shapes}\nsteps: 3\n"
    )
    assert spec.optimizer == OptimizerConfig()
    assert spec.parallel == ParallelSpec(planner="opfence", stages=None)
    assert spec.checkpoint == CheckpointSpec(every=50)
    assert spec.seed == 0
    assert spec.data == DataConfig("synthetic-shapes")


def test_model_args_are_complete_sorted_and_hashable() -> None:
    spec = parse_job_spec(spec_text(("model.args", {"heads": 4, "d_model": 64})))
    keys = [k for k, _ in spec.model.args]
    assert keys == sorted(keys)
    assert {"layers", "dropout", "mlp_ratio"} <= set(keys)  # defaults filled in
    assert spec.model.args_dict()["heads"] == 4
    assert hash(spec) == hash(
        parse_job_spec(spec_text(("model.args", {"d_model": 64, "heads": 4})))
    )


def test_model_args_written_as_defaults_or_left_out_give_equal_specs() -> None:
    short = parse_job_spec(spec_text(("model.args", {"layers": 2})))
    full = parse_job_spec(spec_text(("model.args", {"layers": 2, "dropout": 0.0, "heads": 8})))
    assert short == full


def test_yaml_lists_become_tuples_and_ints_become_floats() -> None:
    spec = parse_job_spec(
        spec_text(
            ("optimizer", {"name": "adam", "lr": 1, "betas": [0.8, 0.9]}),
            ("model", {"zoo": "resnet", "args": {"widths": [8, 16], "blocks": [1, 2]}}),
            ("data", {"corpus": "synthetic-shapes"}),
        )
    )
    assert spec.optimizer.betas == (0.8, 0.9)
    assert type(spec.optimizer.lr) is float
    assert spec.model.args_dict()["widths"] == (8, 16)


def test_round_trip_keeps_every_field() -> None:
    spec = parse_job_spec(
        spec_text(
            ("seed", 7),
            ("data.seed", 3),
            ("data.max_bytes", 500_000),
            ("parallel.stages", 2),
            ("optimizer", {"name": "sgd", "lr": 0.1, "momentum": 0.5, "weight_decay": 0.01}),
        )
    )
    plain = spec.to_dict()
    assert json.loads(json.dumps(plain)) == plain  # plain data only
    again = parse_job_spec(yaml.safe_dump(plain))
    assert again == spec
    assert (again.seed, again.data.seed, again.parallel.stages) == (7, 3, 2)
    assert plain["parallel"]["stages"] == 2
    assert spec.to_dict() == JobSpec.from_dict(plain).to_dict()


def test_replicas_default_to_one_and_take_auto_or_a_count() -> None:
    assert parse_job_spec(spec_text()).parallel.replicas == 1
    assert parse_job_spec(spec_text(("parallel", DELETE))).parallel.replicas == 1
    for given, expected in (("auto", None), (1, 1), (2, 2), (64, 64)):
        # 64 micro-batches split evenly over each replica count.
        spec = parse_job_spec(
            spec_text(
                ("parallel.replicas", given), ("data.batch_size", 64), ("data.micro_batches", 64)
            )
        )
        assert spec.parallel.replicas == expected, given
        assert spec.to_dict()["parallel"]["replicas"] == given
        assert parse_job_spec(yaml.safe_dump(spec.to_dict())) == spec
    assert ParallelSpec(replicas=None) == ParallelSpec(replicas="auto")  # type: ignore[arg-type]


def test_replicas_built_directly_are_checked_as_parsed() -> None:
    with pytest.raises(JobSpecError, match=r"^parallel\.replicas: must be in \[1, 64\]"):
        ParallelSpec(replicas=0)


def test_micro_batches_must_split_evenly_over_the_replicas() -> None:
    # Each replica takes an equal share of the step's micro-batches.
    assert parse_job_spec(spec_text(("parallel.replicas", 2))).parallel.replicas == 2
    assert error_of(spec_text(("parallel.replicas", 3))) == (
        "data.micro_batches: 2 micro-batches do not split evenly over 3 replicas "
        "(parallel.replicas)"
    )
    assert parse_job_spec(spec_text(("parallel.replicas", "auto"))).parallel.replicas is None


def test_context_is_the_text_models_and_none_for_images() -> None:
    assert parse_job_spec(spec_text()).context() == 32
    image = parse_job_spec(
        spec_text(("model", {"zoo": "mlp"}), ("data", {"corpus": "synthetic-shapes"}))
    )
    assert image.context() is None


def test_compression_settings_parse_and_round_trip() -> None:
    cases = {
        "none": CompressionSpec(),
        "adatopk": CompressionSpec(kind="adatopk"),
        "{adatopk: {floor: 0.05}, values: fp16}": CompressionSpec(
            kind="adatopk", floor=0.05, values="fp16"
        ),
        "{adatopk: }": CompressionSpec(kind="adatopk"),
        "{topk: 0.05}": CompressionSpec(kind="topk", ratio=0.05),
        "{topk: 1}": CompressionSpec(kind="topk", ratio=1),
    }
    for text, expected in cases.items():
        spec = parse_job_spec(spec_text() + f"compression: {text}\n")
        assert spec.compression == expected, text
        assert JobSpec.from_dict(spec.to_dict()) == spec


def test_sync_settings_parse_and_round_trip() -> None:
    cases = {
        "sync": SyncSpec(),
        "{kind: sync}": SyncSpec(),
        "{kind: sync, values: fp16}": SyncSpec(values="fp16"),
        "local-sgd": SyncSpec(kind="local-sgd", period=8),
        "partial-local-sgd": SyncSpec(kind="partial-local-sgd"),
        "{kind: partial-local-sgd, period: 4}": SyncSpec(kind="partial-local-sgd", period=4),
        "{kind: local-sgd, period: 1, values: fp16}": SyncSpec("local-sgd", 1, "fp16"),
        "{kind: local-sgd, period: 10000}": SyncSpec(kind="local-sgd", period=10_000),
        "{kind: local-sgd, outer: {name: nesterov}}": SyncSpec(
            kind="local-sgd", outer=OuterSpec("nesterov", lr=0.7, momentum=0.9)
        ),
        "{kind: partial-local-sgd, outer: {name: sgd, lr: 1, momentum: 0}}": SyncSpec(
            kind="partial-local-sgd", outer=OuterSpec("sgd", lr=1.0, momentum=0.0)
        ),
    }
    for text, expected in cases.items():
        spec = parse_job_spec(spec_text() + f"sync: {text}\n")
        assert spec.sync == expected, text
        plain = spec.to_dict()
        assert json.loads(json.dumps(plain)) == plain  # plain data only
        assert JobSpec.from_dict(plain) == spec
        assert parse_job_spec(yaml.safe_dump(plain)) == spec


def test_the_design_cards_replica_and_sync_policies_parse() -> None:
    text = spec_text(("parallel", {"planner": "opfence", "stages": "auto", "replicas": "auto"}))
    spec = parse_job_spec(text + "sync: {kind: partial-local-sgd, period: 8}\n")
    assert spec.parallel == ParallelSpec(planner="opfence", stages=None, replicas=None)
    assert spec.sync == SyncSpec(kind="partial-local-sgd", period=8, values="fp32")
    assert parse_job_spec(yaml.safe_dump(spec.to_dict())) == spec


def test_sync_defaults_to_exact_gradient_averaging() -> None:
    sync = parse_job_spec(spec_text()).sync
    assert sync == SyncSpec(kind="sync", period=8, values="fp32", outer=None)
    assert not sync.local
    assert SyncSpec(kind="partial-local-sgd").local and SyncSpec(kind="local-sgd").local


def test_sync_kind_accepts_a_period_and_ignores_it() -> None:
    # Replaces a check that `sync: {kind: sync, period: 8}` was refused ("unknown key"):
    # period is now a key of every kind; `sync` averages every step whatever it says.
    spec = parse_job_spec(spec_text(("sync", {"kind": "sync", "period": 8})))
    assert spec.sync == SyncSpec() and not spec.sync.local


def test_local_kinds_are_accepted_now() -> None:
    # Replaces checks that local-sgd and partial-local-sgd were "not available yet".
    spec = parse_job_spec(spec_text(("sync", {"kind": "partial-local-sgd", "period": 8})))
    assert spec.sync == SyncSpec(kind="partial-local-sgd", period=8)
    assert parse_job_spec(spec_text(("sync", "local-sgd"))).sync.kind == "local-sgd"


def test_sync_built_directly_is_checked_as_parsed() -> None:
    with pytest.raises(JobSpecError, match=r"^sync\.period: must be in \[1, 10000\]"):
        SyncSpec(kind="local-sgd", period=0)
    with pytest.raises(JobSpecError, match=r"^sync\.kind: unknown sync kind"):
        SyncSpec(kind="bsp")
    with pytest.raises(JobSpecError, match=r"^sync\.outer: only local-sgd"):
        SyncSpec(kind="sync", outer=OuterSpec("sgd"))
    with pytest.raises(JobSpecError, match=r"^sync\.outer\.momentum: must be in \[0, 1\)"):
        OuterSpec("nesterov", momentum=-0.1)


@pytest.mark.parametrize("key", ["kind", "period", "values", "outer"])
def test_odd_values_in_any_sync_field_give_a_spec_error_or_a_valid_spec(key: str) -> None:
    for value in ODD_VALUES:
        sync = {"kind": "local-sgd", key: value}
        try:
            spec = parse_job_spec(spec_text(("sync", sync)))
        except JobSpecError as e:
            assert str(e).startswith(f"sync.{key}"), str(e)
        else:
            assert parse_job_spec(yaml.safe_dump(spec.to_dict())) == spec


def test_later_policies_are_accepted_at_their_off_values() -> None:
    for key, value in (
        ("compression", "none"),
        ("sync", "sync"),
        ("sync", {"kind": "sync"}),
        ("moe", {"mode": "auto"}),
        ("parallel.replicas", 1),
    ):
        assert parse_job_spec(spec_text((key, value))) == parse_job_spec(spec_text())


# -- bad specs: each error starts with the path of the field at fault ---------------------


@pytest.mark.parametrize(
    ("change", "start", "fragment"),
    [
        (("name", ""), "name:", "letters"),
        (("name", "has space"), "name:", "letters"),
        (("name", "x" * 101), "name:", "100"),
        (("name", "../up"), "name:", "starting with a letter or digit"),
        (("name", 5), "name:", "must be a string"),
        (("model.zoo", "gtp"), "model.zoo:", "gpt, moe-gpt"),
        (("model", "gpt"), "model:", "mapping"),
        (("model.args", [1, 2]), "model.args:", "mapping"),
        (("model.args.layerz", 2), "model.args.layerz:", "unknown argument (gpt takes: layers"),
        (("model.args.layers", 0), "model.args.layers:", ">= 1"),
        (("model.args.layers", True), "model.args.layers:", "int"),
        (("model.args.heads", 5), "model.args.heads:", "divisible"),
        (("model.args.dropout", float("inf")), "model.args.dropout:", "inf"),
        (("data.corpus", "wiki"), "data.corpus:", "stdlib-text"),
        (("data.corpus", "synthetic-shapes"), "data.corpus:", "text"),
        (("data.corpus", DELETE), "data.corpus:", "missing"),
        (("data.batch_size", 0), "data.batch_size:", ">= 1"),
        (("data.batch_size", "8"), "data.batch_size:", "int"),
        (("data.batch_size", 7), "data.batch_size:", "divisible"),
        (("data.micro_batches", 3), "data.micro_batches:", "divisible"),
        (("data.seed", -1), "data.seed:", ">= 0"),
        (("data.seed", 2**64), "data.seed:", "must be in"),
        (("data.shuffle", True), "data.shuffle:", "unknown key (data takes: corpus"),
        (("optimizer.name", "lamb"), "optimizer.name:", "adamw"),
        (("optimizer.lr", 0), "optimizer.lr:", "> 0"),
        (("optimizer.lr", float("nan")), "optimizer.lr:", "finite"),
        (("optimizer.betas", [0.9]), "optimizer.betas:", "two numbers"),
        (("optimizer.momentum", 1.5), "optimizer.momentum:", "[0, 1)"),
        (("optimizer.eps", 1e-8), "optimizer.eps:", "unknown key"),
        (("steps", 0), "steps:", "[1, 10000000]"),
        (("steps", 10_000_001), "steps:", "[1, 10000000]"),
        (("steps", True), "steps:", "must be an int, got bool"),
        (("steps", 2.5), "steps:", "must be an int"),
        (("parallel.planner", "random"), "parallel.planner:", "unknown planner"),
        (("parallel.stages", 0), "parallel.stages:", "must be in"),
        (("parallel.stages", "many"), "parallel.stages:", "auto"),
        (("parallel.replicas", 0), "parallel.replicas:", "must be in [1, 64]"),
        (("parallel.replicas", 65), "parallel.replicas:", "must be in [1, 64]"),
        (("parallel.replicas", "many"), "parallel.replicas:", "auto"),
        (("parallel.replicas", True), "parallel.replicas:", "must be an int, got bool"),
        (("parallel.replicas", 2.0), "parallel.replicas:", "must be an int"),
        (("checkpoint.every", 0), "checkpoint.every:", "must be in"),
        (("checkpoint.at", 5), "checkpoint.at:", "unknown key"),
        (("seed", -1), "seed:", "must be in"),
        (("compression", "gzip"), "compression:", "unknown setting"),
        (("compression", "topk"), "compression:", "needs its fraction"),
        (("compression", {"topk": 0}), "compression.topk:", "fraction in (0, 1]"),
        (("compression", {"topk": 1.5}), "compression.topk:", "fraction in (0, 1]"),
        (("compression", {"topk": "lots"}), "compression.topk:", "must be a number"),
        (("compression", {"topk": 0.1, "adatopk": {}}), "compression:", "exactly one"),
        (("compression", {"values": "fp16"}), "compression:", "exactly one"),
        (("compression", {"topk": 0.1, "values": "int4"}), "compression.values:", "fp32, fp16"),
        (("compression", {"adatopk": {"floor": 2}}), "compression.adatopk.floor:", "(0, 1]"),
        (("compression", {"adatopk": {"flor": 0.1}}), "compression.adatopk.flor:", "unknown key"),
        (("compression", {"zstd": 3}), "compression.zstd:", "unknown key"),
        (("sync", "async"), "sync:", "unknown sync kind str 'async' (kinds: sync, local-sgd"),
        (("sync", {"kind": "lazy"}), "sync.kind:", "unknown sync kind"),
        (("sync", {"period": 4}), "sync.kind:", "missing; sync needs: kind"),
        (("sync", [1]), "sync:", "must be a mapping with keys kind, period, values, outer"),
        (("sync", {"kind": "local-sgd", "period": 0}), "sync.period:", "[1, 10000]"),
        (("sync", {"kind": "local-sgd", "period": 10_001}), "sync.period:", "[1, 10000]"),
        (("sync", {"kind": "sync", "period": 0}), "sync.period:", "[1, 10000]"),
        (("sync", {"kind": "local-sgd", "period": 2.5}), "sync.period:", "must be an int"),
        (("sync", {"kind": "local-sgd", "period": True}), "sync.period:", "got bool"),
        (("sync", {"kind": "local-sgd", "values": "int8"}), "sync.values:", "fp32, fp16"),
        (
            ("sync", {"kind": "local-sgd", "every": 3}),
            "sync.every:",
            "unknown key (sync takes: kind",
        ),
        (("sync", {"kind": "sync", "outer": {"name": "sgd"}}), "sync.outer:", "only local-sgd"),
        (("sync", {"kind": "local-sgd", "outer": "nesterov"}), "sync.outer:", "mapping"),
        (("sync", {"kind": "local-sgd", "outer": {"lr": 1}}), "sync.outer.name:", "missing"),
        (
            ("sync", {"kind": "local-sgd", "outer": {"name": "adam"}}),
            "sync.outer.name:",
            "sgd, nesterov",
        ),
        (
            ("sync", {"kind": "local-sgd", "outer": {"name": "sgd", "lr": 0}}),
            "sync.outer.lr:",
            "> 0",
        ),
        (
            ("sync", {"kind": "local-sgd", "outer": {"name": "sgd", "lr": float("inf")}}),
            "sync.outer.lr:",
            "finite",
        ),
        (
            ("sync", {"kind": "local-sgd", "outer": {"name": "sgd", "momentum": 1}}),
            "sync.outer.momentum:",
            "[0, 1)",
        ),
        (
            ("sync", {"kind": "local-sgd", "outer": {"name": "sgd", "beta": 1}}),
            "sync.outer.beta:",
            "unknown key (sync.outer takes: name, lr, momentum)",
        ),
        (("moe", {"mode": "data-centric"}), "moe.mode:", "not available yet"),
        (("moe", "auto"), "moe:", "mapping"),
        (("replicas", 2), "replicas:", "unknown key (spec takes: name"),
    ],
    ids=lambda v: repr(v) if isinstance(v, tuple) else None,
)
def test_bad_field_is_named_by_its_path(change: tuple[str, Any], start: str, fragment: str) -> None:
    message = error_of(spec_text(change))
    assert message.startswith(start), message
    assert fragment in message, message


@pytest.mark.parametrize("key", ["name", "model", "data", "steps"])
def test_missing_required_key_is_named(key: str) -> None:
    message = error_of(spec_text((key, DELETE)))
    assert message.startswith(f"{key}: missing"), message


def test_unknown_planner_error_lists_the_planners() -> None:
    message = error_of(spec_text(("parallel.planner", "random")))
    assert message == "parallel.planner: unknown planner 'random' (planners: opfence, even)"


def test_planner_defaults_to_opfence() -> None:
    spec = parse_job_spec(spec_text(("parallel", DELETE)))
    assert spec.parallel.planner == "opfence"
    spec = parse_job_spec(spec_text(("parallel.planner", DELETE)))
    assert spec.parallel.planner == "opfence"
    assert PLANNERS == ("opfence", "even")


def test_number_yaml_reads_as_text_gets_a_hint() -> None:
    message = error_of(spec_text().replace("lr: 0.0003", "lr: 3e-4"))
    assert message.startswith("optimizer.lr:") and "3.0e-4" in message, message


def test_yaml_syntax_error_gives_the_line() -> None:
    text = "name: x\nmodel: {zoo: gpt\nsteps: 3\n"
    message = error_of(text)
    assert message.startswith("spec: invalid YAML at line"), message


def test_duplicate_key_is_refused_with_its_line() -> None:
    message = error_of(spec_text() + "steps: 100000\n")
    assert message.startswith("spec: invalid YAML at line") and "duplicate key 'steps'" in message


def test_yaml_merge_keys_are_not_mistaken_for_duplicates() -> None:
    text = spec_text(("data", DELETE)) + (
        "data: {<<: {corpus: stdlib-text, batch_size: 4}, batch_size: 8, micro_batches: 2}\n"
    )
    assert parse_job_spec(text).data == DataConfig("stdlib-text", batch_size=8, micro_batches=2)


@pytest.mark.parametrize(
    "text",
    [
        "!!python/object/apply:os.system ['true']\n",
        "name: !!python/name:os.system\n",
        "name: !!binary aGVsbG8=\nmodel: {zoo: gpt}\ndata: {corpus: stdlib-text}\nsteps: 1\n",
    ],
)
def test_tags_that_build_objects_are_refused(text: str) -> None:
    message = error_of(text)
    assert message.startswith(("spec:", "name:")), message


@pytest.mark.parametrize(
    ("text", "fragment"),
    [("", "empty"), ("- a\n- b\n", "mapping"), ("just text\n", "mapping"), ("42\n", "mapping")],
)
def test_document_that_is_not_a_mapping_is_refused(text: str, fragment: str) -> None:
    message = error_of(text)
    assert message.startswith("spec:") and fragment in message, message


ODD_VALUES: list[Any] = [
    None,
    [],
    {},
    "x",
    -1,
    0,
    2**70,
    10**400,
    1e308,
    float("nan"),
    True,
    [1, "a"],
    {"a": 1},
]
FIELDS = [
    "name",
    "model",
    "model.zoo",
    "model.args",
    "model.args.layers",
    "model.args.dropout",
    "data",
    "data.corpus",
    "data.batch_size",
    "data.micro_batches",
    "data.seed",
    "data.max_bytes",
    "optimizer",
    "optimizer.name",
    "optimizer.lr",
    "optimizer.betas",
    "optimizer.momentum",
    "steps",
    "parallel",
    "parallel.planner",
    "parallel.stages",
    "parallel.replicas",
    "checkpoint.every",
    "validation.batches",
    "seed",
    "compression",
    "sync",
    "moe",
]


@pytest.mark.parametrize("path", FIELDS)
def test_odd_values_in_any_field_give_a_spec_error_or_a_valid_spec(path: str) -> None:
    for value in ODD_VALUES:
        try:
            spec = parse_job_spec(spec_text((path, value)))
        except JobSpecError as e:
            assert str(e).split(":")[0].startswith((path.split(".")[0], "spec")), str(e)
        else:  # a value that happens to be valid must survive the round trip
            assert parse_job_spec(yaml.safe_dump(spec.to_dict())) == spec


@pytest.mark.parametrize(
    "text",
    [
        "name: " + "[" * 3000 + "]" * 3000 + "\n",
        "steps: " + "9" * 5000 + "\n",
        "name: x\nsteps: 1\nmodel: {zoo: gpt}\ndata: {corpus: stdlib-text}\n"
        "optimizer: {lr: " + "9" * 400 + "}\n",
    ],
    ids=["deep-nesting", "huge-int-literal", "int-too-big-for-a-float"],
)
def test_pathological_yaml_is_a_spec_error(text: str) -> None:
    error_of(text)


def test_oversized_spec_is_refused_before_parsing() -> None:
    message = error_of(spec_text() + "#" * 200_000 + "\n")
    assert message.startswith("spec:") and "characters" in message


def test_errors_are_value_errors_and_opdag_errors() -> None:
    with pytest.raises(JobSpecError) as info:
        parse_job_spec(spec_text(("steps", 0)))
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, OpDagError)


def test_components_built_directly_are_checked_too() -> None:
    with pytest.raises(JobSpecError, match=r"^model\.args\.layers:"):
        ModelSpec("gpt", (("layers", 0),))
    with pytest.raises(JobSpecError, match=r"^parallel\.planner:"):
        ParallelSpec(planner="random")
    with pytest.raises(JobSpecError, match=r"^checkpoint\.every:"):
        CheckpointSpec(every=0)
    with pytest.raises(JobSpecError, match=r"^data\.corpus:"):
        JobSpec(
            name="x",
            model=ModelSpec("resnet"),
            data=DataConfig("stdlib-text"),
            optimizer=OptimizerConfig(),
            steps=1,
        )


# -- files -------------------------------------------------------------------------------


def test_load_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(spec_text())
    assert load_job_spec(path) == parse_job_spec(spec_text())
    assert load_job_spec(str(path)) == load_job_spec(path)


def test_load_names_a_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(JobSpecError, match=r"nope\.yaml"):
        load_job_spec(missing)


def test_load_names_a_file_that_is_not_text(tmp_path: Path) -> None:
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\xff\xfe\x00name")
    with pytest.raises(JobSpecError, match=r"binary\.yaml"):
        load_job_spec(path)


def test_load_names_a_directory(tmp_path: Path) -> None:
    with pytest.raises(JobSpecError, match=str(tmp_path.name)):
        load_job_spec(tmp_path)
