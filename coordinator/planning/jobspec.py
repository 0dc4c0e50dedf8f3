"""The job spec a user submits (YAML), checked in full before a job is accepted.

`parse_job_spec` turns YAML text into a frozen `JobSpec`; `JobSpec.to_dict` gives it back
as plain data, and parsing that again yields an equal spec, which is how the coordinator
stores jobs. Every error is a `JobSpecError` whose message starts with the dotted path of
the field at fault (`data.batch_size: ...`), so a user knows which line to fix.

The spec's classes are pydantic dataclasses: pydantic checks the structure (keys, mappings,
types) and knows the path of each field. The rules of each component (model arguments,
corpus, optimizer) stay with the component; its errors are re-raised here with the path of
the field that caused them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import InitVar
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BeforeValidator,
    InstanceOf,
    PlainValidator,
    StrictStr,
    TypeAdapter,
    ValidationError,
)

from coordinator.planning.compression_spec import CompressionSpec, compression_setting
from coordinator.planning.job_size import check_job_size
from coordinator.planning.model_spec import ModelSpec
from coordinator.planning.spec_errors import (
    ROOT,
    Blame,
    Form,
    JobSpecError,
    arguments_of,
    build_attributed,
    int_in_range,
    section,
    show,
    spec_dataclass,
    spec_error,
)
from coordinator.planning.spec_limits import SpecLimits
from coordinator.planning.spec_yaml import read_spec_yaml
from coordinator.planning.sync_spec import SyncSpec, sync_setting
from coordinator.planning.trust_spec import TrustSpec
from opdag.data import CORPUS_KINDS, DataConfig, DataError
from opdag.optim import OptimizerConfig, OptimizerError
from opdag.zoo import data_kind, model_config

# Planners a job may ask for: the bandwidth-aware OP-Fence (the default), and `even`
# (FLOPs-balanced stages in registration order), kept for comparison.
PLANNERS: tuple[str, ...] = ("opfence", "even")
# Planners the design names that are not implemented yet: asked for, they get a
# "not available yet" error rather than "unknown".
PLANNERS_LATER: tuple[str, ...] = ()

MAX_NAME_CHARS = 100
MAX_STEPS = 10_000_000
# Counts travel as uint32 and seeds as uint64 in the worker protocol (proto/worker.proto);
# a value that does not fit must be refused here, not when a stage is assigned.
_UINT32_MAX = 2**32 - 1
_INT64_MAX = 2**63 - 1

_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

# Policies the design card names for later features. Until a feature exists, its key is
# accepted only with its "off" value, so a spec written for today keeps meaning the same.
_MOE_OFF = "auto"
_MOE_LATER = ("data-centric", "expert-centric")
# Replicas of each stage, each a full pipeline over its own workers; a bound keeps a sync
# group's averaging round (and the planner's search) small.
MAX_REPLICAS = 64


# -- checks of single values ------------------------------------------------------------


def _off_only(off: str, later: tuple[str, ...], setting: str) -> Callable[[object], object]:
    """The check of a policy whose feature is for later: only its off value is accepted."""

    def check(value: object) -> object:
        if value == off:
            return value
        if value in later:
            raise ValueError(f"{value!r} is not available yet (available: {off})")
        raise ValueError(
            f"unknown {setting} setting {show(value)} (settings: {', '.join((off, *later))})"
        )

    return check


def _job_name(name: str) -> str:
    if not name or len(name) > MAX_NAME_CHARS or not _NAME_PATTERN.fullmatch(name):
        # Leading letter or digit: the name never reads as a CLI flag or as "..".
        raise ValueError(
            f"must be 1 to {MAX_NAME_CHARS} letters, digits, '.', '_' or '-', "
            f"starting with a letter or digit, got {show(name)}"
        )
    return name


def _planner(planner: str) -> str:
    if planner in PLANNERS_LATER:
        raise ValueError(f"{planner!r} is not available yet (available: {', '.join(PLANNERS)})")
    if planner not in PLANNERS:
        planners = ", ".join(PLANNERS + PLANNERS_LATER)
        raise ValueError(f"unknown planner {planner!r} (planners: {planners})")
    return planner


def _stages(value: object) -> int | None:
    """`auto` (None: as many stages as the planner finds workers for) or a count."""
    if value is None or value == "auto":
        return None
    if isinstance(value, str):
        raise ValueError(f"must be auto or an int >= 1, got {show(value)}")
    return int_in_range(1, _UINT32_MAX)(value)


def _replicas(value: object) -> int | None:
    """`auto` (None: as many replicas as the planner finds worth it) or a count."""
    if value is None or value == "auto":
        return None
    if isinstance(value, str):
        raise ValueError(f"must be auto or an int in [1, {MAX_REPLICAS}], got {show(value)}")
    return int_in_range(1, MAX_REPLICAS)(value)


def _warmup(value: object) -> int | None:
    """`auto` (None: the planner chooses the schedule's depth) or extra warm-up forwards."""
    if value is None or value == "auto":
        return None
    if isinstance(value, str):
        raise ValueError(f"must be auto or an int in [0, {MAX_WARMUP}], got {show(value)}")
    return int_in_range(0, MAX_WARMUP)(value)


# The most extra warm-up a spec may force (GPipe for any step of fewer micro-batches).
MAX_WARMUP = 4096

Steps = Annotated[int, PlainValidator(int_in_range(1, MAX_STEPS))]
Seed = Annotated[int, PlainValidator(int_in_range(0, _INT64_MAX))]


# -- components: built by their own class, their errors given the path of the culprit ----


_DATA_FORM = arguments_of(DataConfig, "data")
_OPTIMIZER_FORM = arguments_of(OptimizerConfig, "optimizer")


def _data_config(value: object) -> object:
    """The `data` mapping as the DataConfig it describes."""
    if isinstance(value, DataConfig):
        return value
    _DATA_FORM.model_validate(value)
    assert isinstance(value, dict)  # the form took only a mapping
    # The corpus goes first so a bad corpus is blamed before the fields that depend on it;
    # users' own data names a dataset in its place (`data.dataset`).
    first = {k: value[k] for k in ("corpus", "dataset") if k in value}
    if not first:
        raise Blame("missing: name a corpus, or a dataset of your own (data.dataset)", "corpus")
    config = build_attributed(
        lambda d: DataConfig(**{**first, **d}),
        {**first, **value},
        error=DataError,
        prefix="data",
    )
    # DataConfig checked the lower bounds; the worker protocol's fields set the upper ones.
    for name, lo, hi in (
        ("batch_size", 1, _UINT32_MAX),
        ("micro_batches", 1, _UINT32_MAX),
        ("seed", 0, _INT64_MAX),
        ("max_bytes", 1, _INT64_MAX),
    ):
        if getattr(config, name) > hi:
            raise Blame(f"must be in [{lo}, {hi}], got {getattr(config, name)}", name)
    return config


def _is_small_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**53


def _optimizer_config(value: object) -> object:
    """The `optimizer` mapping as the OptimizerConfig it describes."""
    if isinstance(value, OptimizerConfig):
        return value
    _OPTIMIZER_FORM.model_validate(value)
    assert isinstance(value, dict)  # the form took only a mapping
    given: dict[str, Any] = {}
    for key, item in value.items():
        # Whole numbers become floats so equal settings compare and print alike; one too
        # big for a float is left for OptimizerConfig to refuse.
        if _is_small_int(item):
            item = float(item)
        elif isinstance(item, list):
            item = tuple(float(v) if _is_small_int(v) else v for v in item)
        given[key] = item
    return build_attributed(
        lambda o: OptimizerConfig(**o),
        given,
        error=(OptimizerError, OverflowError),
        prefix="optimizer",
    )


# -- the spec ----------------------------------------------------------------------------


@spec_dataclass("parallel")
class ParallelSpec:
    """How the model is cut over workers: the planner, the number of pipeline stages
    (None: as many as the planner finds workers for), and the number of replicas of each
    stage, each a full pipeline over its own workers (None: as many as the planner finds
    worth it; the default 1 is one pipeline)."""

    planner: Annotated[StrictStr, AfterValidator(_planner)] = "opfence"
    stages: Annotated[int | None, PlainValidator(_stages)] = None
    replicas: Annotated[int | None, PlainValidator(_replicas)] = 1
    # Micro-batches every stage runs ahead of 1F1B's warm-up (`opdag.schedule`): auto (None)
    # lets the planner choose the depth whose simulated step ends first; an int forces it.
    warmup: Annotated[int | None, PlainValidator(_warmup)] = None


@spec_dataclass("checkpoint")
class CheckpointSpec:
    """How often (in steps) workers checkpoint their stage."""

    every: Steps = 50


# Held-out batches at most per checkpoint: each is a full batch's forward pass.
MAX_VALIDATION_BATCHES = 64


@spec_dataclass("validation")
class ValidationSpec:
    """How many held-out batches the coordinator evaluates every complete checkpoint on,
    for the job's validation loss (0: none)."""

    batches: Annotated[int, PlainValidator(int_in_range(0, MAX_VALIDATION_BATCHES))] = 1


@section("moe")
class _MoeForm(Form):
    mode: Annotated[Any, AfterValidator(_off_only(_MOE_OFF, _MOE_LATER, "moe"))]


@spec_dataclass("", kw_only=True)
class JobSpec:
    """A validated training job: model, data, optimizer, length and policies."""

    # Fields in the order a reader meets them, so the first error is the topmost one.
    name: Annotated[StrictStr, AfterValidator(_job_name)]
    model: ModelSpec
    data: Annotated[InstanceOf[DataConfig], BeforeValidator(_data_config)]
    optimizer: Annotated[InstanceOf[OptimizerConfig], BeforeValidator(_optimizer_config)] = (
        OptimizerConfig()
    )
    steps: Steps
    parallel: ParallelSpec = ParallelSpec()
    checkpoint: CheckpointSpec = CheckpointSpec()
    validation: ValidationSpec = ValidationSpec()
    seed: Seed = 0  # model init seed
    compression: Annotated[InstanceOf[CompressionSpec], BeforeValidator(compression_setting)] = (
        CompressionSpec()
    )
    sync: Annotated[SyncSpec, BeforeValidator(sync_setting)] = SyncSpec()
    # What stages believe of each other: value bounds, spot checks (`trust_spec`).
    trust: TrustSpec = TrustSpec()
    # A policy of a later feature: checked, then dropped (its off value changes nothing).
    moe: InitVar[_MoeForm] = _MoeForm(mode=_MOE_OFF)

    def __post_init__(self, moe: _MoeForm) -> None:
        del moe
        self._check_model_data()
        replicas = self.parallel.replicas
        if replicas is not None and self.data.micro_batches % replicas:
            raise Blame(
                f"{self.data.micro_batches} micro-batches do not split evenly over "
                f"{replicas} replicas (parallel.replicas)",
                "data",
                "micro_batches",
            )

    def _check_model_data(self) -> None:
        """The model fits the data: a zoo model its kind of corpus; a user's text model
        says its context length (whether its inputs fit is checked when it is captured)."""
        if self.data.dataset:
            return  # users' own data: checked against the dataset's manifest at submission
        if self.model.zoo is None:
            if self.data.kind == "text" and self.model.context is None:
                raise Blame(
                    "a text model needs its context length (tokens per sequence) here",
                    "model",
                    "context",
                )
            if self.data.kind != "text" and self.model.context is not None:
                raise Blame(f"{self.data.kind} data has no context length", "model", "context")
            return
        wants = data_kind(self.model.zoo)
        if self.data.kind != wants:
            fitting = [c for c, k in CORPUS_KINDS.items() if k == wants]
            raise Blame(
                f"{self.data.corpus!r} holds {self.data.kind} data, but model "
                f"{self.model.zoo!r} trains on {wants} data (use: {', '.join(fitting)})",
                "data",
                "corpus",
            )

    def context(self) -> int | None:
        """The model's context length (tokens per sequence) for text models, else None."""
        if self.model.zoo is None:
            # A user's model on a dataset says its context (a token dataset needs one).
            return self.model.context if self.data.kind in ("text", "dataset") else None
        if data_kind(self.model.zoo) != "text":
            return None
        context = getattr(model_config(self.model.zoo, self.model.args_dict()), "context", None)
        if not isinstance(context, int):
            raise JobSpecError(f"model.args: text model {self.model.zoo!r} has no context")
        return context

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain data (YAML- and JSON-able); `from_dict` inverts it."""
        return {
            "name": self.name,
            "model": self.model.to_plain(),
            "data": _data_plain(self.data),
            "optimizer": {
                f.name: _plain(getattr(self.optimizer, f.name))
                for f in dataclasses.fields(OptimizerConfig)
            },
            "steps": self.steps,
            "parallel": {
                "planner": self.parallel.planner,
                "stages": "auto" if self.parallel.stages is None else self.parallel.stages,
                "replicas": "auto" if self.parallel.replicas is None else self.parallel.replicas,
                "warmup": "auto" if self.parallel.warmup is None else self.parallel.warmup,
            },
            "checkpoint": {"every": self.checkpoint.every},
            "validation": {"batches": self.validation.batches},
            "seed": self.seed,
            "compression": self.compression.to_plain(),
            "sync": self.sync.to_plain(),
            "trust": self.trust.to_plain(),
        }

    @classmethod
    def from_dict(cls, data: object) -> JobSpec:
        """A spec from plain data, as YAML or `to_dict` gives it; checked in full."""
        try:
            return _JOB_SPEC.validate_python(data)
        except ValidationError as e:
            raise spec_error(e) from None


_JOB_SPEC = TypeAdapter(JobSpec)


def _data_plain(data: DataConfig) -> dict[str, Any]:
    """The data section as plain data: a corpus or a dataset (users' own data), not both."""
    out = {f.name: getattr(data, f.name) for f in dataclasses.fields(DataConfig)}
    out.pop("corpus" if data.dataset else "dataset")
    return out


def _plain(value: Any) -> Any:
    """`value` as YAML-safe plain data: tuples become lists (safe_dump refuses tuples)."""
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def parse_job_spec(text: str, limits: SpecLimits | None = None) -> JobSpec:
    """A job spec from YAML text; safe YAML only (no tags that build objects, no aliases).
    With `limits` (a coordinator's), the job must also keep within them."""
    spec = JobSpec.from_dict(read_spec_yaml(text, limits))
    if limits is not None:
        check_job_size(spec, limits)
    return spec


def load_job_spec(path: str | Path) -> JobSpec:
    """A job spec from a YAML file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise JobSpecError(f"{ROOT}: {str(path)!r} is not UTF-8 text") from None
    except OSError as e:
        raise JobSpecError(f"{ROOT}: cannot read {str(path)!r}: {e.strerror or e}") from None
    return parse_job_spec(text)


__all__ = [
    "MAX_REPLICAS",
    "MAX_STEPS",
    "PLANNERS",
    "CheckpointSpec",
    "CompressionSpec",
    "JobSpec",
    "JobSpecError",
    "ModelSpec",
    "ParallelSpec",
    "SyncSpec",
    "load_job_spec",
    "parse_job_spec",
]
