"""The job spec a user submits (YAML), checked in full before a job is accepted.

`parse_job_spec` turns YAML text into a frozen `JobSpec`; `JobSpec.to_dict` gives it back
as plain data, and parsing that again yields an equal spec, which is how the coordinator
stores jobs. Every error is a `JobSpecError` whose message starts with the dotted path of
the field at fault (`data.batch_size: ...`), so a user knows which line to fix.

The spec's structure (keys, mappings, which policies exist) is checked here; the rules of
each component (model arguments, corpus, optimizer) stay with the component, and their
errors are re-raised here with the path of the field that caused them.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from opdag.data import CORPUS_KINDS, DataConfig, DataError
from opdag.errors import OpDagError
from opdag.optim import OptimizerConfig, OptimizerError
from opdag.zoo import ZOO_NAMES, ZooError, data_kind, model_config


class JobSpecError(OpDagError, ValueError):
    """A job spec is malformed; the message starts with the dotted path of the bad field."""


# Planners a job may ask for: the bandwidth-aware OP-Fence (the default), and `even`
# (FLOPs-balanced stages in registration order), kept for comparison.
PLANNERS: tuple[str, ...] = ("opfence", "even")
# Planners the design names that are not implemented yet: asked for, they get a
# "not available yet" error rather than "unknown".
PLANNERS_LATER: tuple[str, ...] = ()

MAX_NAME_CHARS = 100
MAX_STEPS = 10_000_000
# A job spec is a screenful of YAML; refusing huge texts keeps the parser's work bounded.
MAX_SPEC_CHARS = 100_000
# Counts travel as uint32 and seeds as uint64 in the worker protocol (proto/worker.proto);
# a value that does not fit must be refused here, not when a stage is assigned.
_UINT32_MAX = 2**32 - 1
_INT64_LIMIT = 2**63

_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
ROOT = "spec"  # the path of errors about the document as a whole

# Policies the design card names for later features. Until a feature exists, its key is
# accepted only with its "off" value, so a spec written for today keeps meaning the same.
COMPRESSION_KINDS = ("none", "adatopk", "topk")
COMPRESSION_VALUES = ("fp32", "fp16")
_SYNC_OFF = "sync"
_SYNC_LATER = ("local-sgd", "partial-local-sgd")
_MOE_OFF = "auto"
_MOE_LATER = ("data-centric", "expert-centric")
_REPLICAS_OFF = 1

_TOP_KEYS = (
    "name",
    "model",
    "data",
    "optimizer",
    "steps",
    "parallel",
    "checkpoint",
    "seed",
    "compression",
    "sync",
    "moe",
)
_REQUIRED_TOP_KEYS = ("name", "model", "data", "steps")

_T = TypeVar("_T")


# -- small checks shared by the dataclasses and the parser -------------------------------


def _join(parent: str, key: object) -> str:
    return f"{parent}.{key}" if parent else str(key)


def _show(value: object) -> str:
    """A value as an error message quotes it: typed, and never more than a line."""
    if value is None:
        return "null"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _check_int(value: object, path: str, *, lo: int, hi: int) -> int:
    # bool is an int to Python but never what a spec means by a count.
    if isinstance(value, bool) or not isinstance(value, int):
        raise JobSpecError(f"{path}: must be an int, got {_show(value)}")
    if not lo <= value <= hi:
        raise JobSpecError(f"{path}: must be in [{lo}, {hi}], got {value}")
    return value


def _check_str(value: object, path: str) -> str:
    if not isinstance(value, str):
        raise JobSpecError(f"{path}: must be a string, got {_show(value)}")
    return value


def _strip_prefix(message: str, prefix: str) -> str:
    # Component errors start with their own short prefix ("data: ..."); the field path
    # replaces it.
    return message[len(prefix) + 2 :] if message.startswith(f"{prefix}: ") else message


def _build_attributed(
    build: Callable[[Mapping[str, Any]], _T],
    given: Mapping[str, Any],
    *,
    path: str,
    error: type[Exception] | tuple[type[Exception], ...],
    prefix: str,
) -> _T:
    """`build(given)`, its error re-raised under the path of the argument that causes it.

    The component's error names the rule, not the spec field. The culprit is the first
    argument that fails on its own (the others at their defaults); failing that, for a
    rule between arguments (batch_size divisible by micro_batches, say), the first one
    whose removal lets the rest pass. The message names every argument the rule involves.
    """
    try:
        return build(given)
    except error as e:
        whole = e

    def fails(args: Mapping[str, Any]) -> bool:
        try:
            build(args)
        except error:
            return True
        return False

    culprit = next((k for k in given if fails({k: given[k]})), None)
    if culprit is None:
        culprit = next(
            (k for k in given if not fails({j: v for j, v in given.items() if j != k})), None
        )
    where = _join(path, culprit) if culprit is not None else path
    hint = _number_hint(given[culprit]) if culprit is not None else ""
    raise JobSpecError(f"{where}: {_strip_prefix(str(whole), prefix)}{hint}") from whole


# PyYAML follows YAML 1.1, where a float needs a '.' and a signed exponent: `3e-4` and
# `1.0e4` arrive as strings. Users write them all the time, so the error says why.
_TEXT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _number_hint(value: object) -> str:
    """A hint for a number that YAML read as text, else ''."""
    if isinstance(value, str) and _TEXT_FLOAT.fullmatch(value.strip()):
        return (
            " (YAML reads this e-notation as text: write it with a '.' and a signed "
            "exponent, e.g. 3.0e-4 or 1.0e+4)"
        )
    return ""


def _plain(value: Any) -> Any:
    """`value` as YAML-safe plain data: tuples become lists (safe_dump refuses tuples)."""
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def _finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, tuple):
        return all(_finite(v) for v in value)
    return True


# -- the spec ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """Which zoo model to train and its arguments.

    `args` holds every argument of the model, defaults filled in, as sorted items: the
    spec is hashable, and a stored job rebuilds the same model even if a zoo default
    changes later.
    """

    zoo: str
    args: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        zoo = _check_str(self.zoo, "model.zoo")
        if zoo not in ZOO_NAMES:
            raise JobSpecError(
                f"model.zoo: unknown model {zoo!r} (the zoo has: {', '.join(ZOO_NAMES)})"
            )
        try:
            given = dict(self.args)
        except (TypeError, ValueError):
            raise JobSpecError(
                f"model.args: must be a mapping of argument names to values, got {_show(self.args)}"
            ) from None
        known = [f.name for f in dataclasses.fields(model_config(zoo))]
        for key in sorted(given, key=str):
            if key not in known:
                raise JobSpecError(
                    f"model.args.{key}: unknown argument ({zoo} takes: {', '.join(known)})"
                )
        config = _build_attributed(
            lambda args: model_config(zoo, args),
            given,
            path="model.args",
            # A huge YAML int given for a float argument overflows in the conversion.
            error=(ZooError, OverflowError),
            prefix=zoo,
        )
        resolved = {name: getattr(config, name) for name in known}
        for name, value in resolved.items():
            # The zoo checks ranges with comparisons, which an infinity can slip through.
            if not _finite(value):
                raise JobSpecError(f"model.args.{name}: must be finite, got {value!r}")
        object.__setattr__(self, "args", tuple(sorted(resolved.items())))

    def args_dict(self) -> dict[str, Any]:
        """The arguments as a dict, as `opdag.zoo.build_model` takes them."""
        return dict(self.args)


@dataclass(frozen=True)
class ParallelSpec:
    """How the model is cut over workers: the planner, and the number of pipeline stages
    (None: as many as the planner finds workers for)."""

    planner: str = "opfence"
    stages: int | None = None

    def __post_init__(self) -> None:
        planner = _check_str(self.planner, "parallel.planner")
        if planner not in PLANNERS:
            if planner in PLANNERS_LATER:
                raise JobSpecError(
                    f"parallel.planner: {planner!r} is not available yet "
                    f"(available: {', '.join(PLANNERS)})"
                )
            raise JobSpecError(
                f"parallel.planner: unknown planner {planner!r} "
                f"(planners: {', '.join(PLANNERS + PLANNERS_LATER)})"
            )
        if self.stages is not None:
            _check_int(self.stages, "parallel.stages", lo=1, hi=_UINT32_MAX)


@dataclass(frozen=True)
class CompressionSpec:
    """What crosses the cut links: everything exactly (`none`), the top-k entries at a
    fraction each link's bandwidth calls for (`adatopk`, never below `floor`), or the top-k
    at one fixed fraction on every cut link (`topk`). `values` is how kept entries travel."""

    kind: str = "none"
    ratio: float = 1.0  # topk only
    floor: float = 0.01  # adatopk only
    values: str = "fp32"

    def __post_init__(self) -> None:
        if self.kind not in COMPRESSION_KINDS:
            raise JobSpecError(
                f"compression: unknown setting {_show(self.kind)} "
                f"(settings: none, adatopk, {{adatopk: {{floor: F}}}}, {{topk: FRACTION}})"
            )
        for name in ("ratio", "floor"):
            v = getattr(self, name)
            path = "compression.topk" if name == "ratio" else "compression.adatopk.floor"
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise JobSpecError(f"{path}: must be a number, got {_show(v)}")
            if not (math.isfinite(v) and 0 < v <= 1):
                raise JobSpecError(f"{path}: must be a fraction in (0, 1], got {v}")
        if self.values not in COMPRESSION_VALUES:
            raise JobSpecError(
                f"compression.values: must be one of {', '.join(COMPRESSION_VALUES)}, "
                f"got {_show(self.values)}"
            )

    def to_plain(self) -> Any:
        if self.kind == "none":
            return "none"
        if self.kind == "topk":
            return {"topk": self.ratio, "values": self.values}
        return {"adatopk": {"floor": self.floor}, "values": self.values}


@dataclass(frozen=True)
class CheckpointSpec:
    """How often (in steps) workers checkpoint their stage."""

    every: int = 50

    def __post_init__(self) -> None:
        _check_int(self.every, "checkpoint.every", lo=1, hi=MAX_STEPS)


@dataclass(frozen=True)
class JobSpec:
    """A validated training job: model, data, optimizer, length and policies."""

    name: str
    model: ModelSpec
    data: DataConfig
    optimizer: OptimizerConfig
    steps: int
    parallel: ParallelSpec = field(default_factory=ParallelSpec)
    checkpoint: CheckpointSpec = field(default_factory=CheckpointSpec)
    seed: int = 0  # model init seed
    compression: CompressionSpec = field(default_factory=CompressionSpec)

    def __post_init__(self) -> None:
        name = _check_str(self.name, "name")
        if not name or len(name) > MAX_NAME_CHARS or not _NAME_PATTERN.fullmatch(name):
            # Leading letter or digit: the name never reads as a CLI flag or as "..".
            raise JobSpecError(
                f"name: must be 1 to {MAX_NAME_CHARS} letters, digits, '.', '_' or '-', "
                f"starting with a letter or digit, got {_show(name)}"
            )
        for attr, kind in (
            ("model", ModelSpec),
            ("data", DataConfig),
            ("optimizer", OptimizerConfig),
            ("parallel", ParallelSpec),
            ("checkpoint", CheckpointSpec),
            ("compression", CompressionSpec),
        ):
            if not isinstance(getattr(self, attr), kind):
                raise JobSpecError(f"{attr}: must be a {kind.__name__}")
        _check_int(self.steps, "steps", lo=1, hi=MAX_STEPS)
        _check_int(self.seed, "seed", lo=0, hi=_INT64_LIMIT - 1)
        wants = data_kind(self.model.zoo)
        if self.data.kind != wants:
            fitting = [c for c, k in CORPUS_KINDS.items() if k == wants]
            raise JobSpecError(
                f"data.corpus: {self.data.corpus!r} holds {self.data.kind} data, but model "
                f"{self.model.zoo!r} trains on {wants} data (use: {', '.join(fitting)})"
            )

    def context(self) -> int | None:
        """The model's context length (tokens per sequence) for text models, else None."""
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
            "model": {
                "zoo": self.model.zoo,
                "args": {k: _plain(v) for k, v in self.model.args},
            },
            "data": {f.name: getattr(self.data, f.name) for f in dataclasses.fields(DataConfig)},
            "optimizer": {
                f.name: _plain(getattr(self.optimizer, f.name))
                for f in dataclasses.fields(OptimizerConfig)
            },
            "steps": self.steps,
            "parallel": {
                "planner": self.parallel.planner,
                "stages": "auto" if self.parallel.stages is None else self.parallel.stages,
            },
            "checkpoint": {"every": self.checkpoint.every},
            "seed": self.seed,
            "compression": self.compression.to_plain(),
        }

    @classmethod
    def from_dict(cls, data: object) -> JobSpec:
        """A spec from plain data, as YAML or `to_dict` gives it; checked in full."""
        return _job_spec_from(data)


# -- plain data -> spec ------------------------------------------------------------------


def _mapping(
    value: object,
    path: str,
    known: tuple[str, ...],
    required: tuple[str, ...] = (),
) -> dict[Any, Any]:
    """`value` as a mapping with only `known` keys and every `required` one."""
    title = path or ROOT
    if not isinstance(value, dict):
        raise JobSpecError(
            f"{title}: must be a mapping with keys {', '.join(known)}, got {_show(value)}"
        )
    for key in value:
        if key not in known:
            raise JobSpecError(
                f"{_join(path, key)}: unknown key ({title} takes: {', '.join(known)})"
            )
    for key in required:
        if key not in value:
            raise JobSpecError(f"{_join(path, key)}: missing; {title} needs: {', '.join(required)}")
    return value


def _model_from(value: object) -> ModelSpec:
    section = _mapping(value, "model", ("zoo", "args"), ("zoo",))
    args = section.get("args", {})
    if not isinstance(args, dict):
        raise JobSpecError(f"model.args: must be a mapping, got {_show(args)}")
    return ModelSpec(zoo=section["zoo"], args=tuple(args.items()))


def _data_from(value: object) -> DataConfig:
    fields = dataclasses.fields(DataConfig)
    required = tuple(
        f.name
        for f in fields
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    )
    section = _mapping(value, "data", tuple(f.name for f in fields), required)
    corpus = section["corpus"]
    # The corpus goes first so a bad corpus is blamed before the fields that depend on it.
    given = {"corpus": corpus, **section}
    config = _build_attributed(
        lambda d: DataConfig(**{"corpus": corpus, **d}),
        given,
        path="data",
        error=DataError,
        prefix="data",
    )
    for name in ("batch_size", "micro_batches"):
        _check_int(getattr(config, name), f"data.{name}", lo=1, hi=_UINT32_MAX)
    _check_int(config.seed, "data.seed", lo=0, hi=_INT64_LIMIT - 1)
    _check_int(config.max_bytes, "data.max_bytes", lo=1, hi=_INT64_LIMIT - 1)
    return config


def _is_small_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**53


def _optimizer_from(value: object) -> OptimizerConfig:
    fields = tuple(f.name for f in dataclasses.fields(OptimizerConfig))
    section = _mapping(value, "optimizer", fields)
    given: dict[str, Any] = {}
    for key, item in section.items():
        # Whole numbers become floats so equal settings compare and print alike; one too
        # big for a float is left for OptimizerConfig to refuse.
        if _is_small_int(item):
            item = float(item)
        elif isinstance(item, list):
            item = tuple(float(v) if _is_small_int(v) else v for v in item)
        given[key] = item
    return _build_attributed(
        lambda o: OptimizerConfig(**o),
        given,
        path="optimizer",
        error=(OptimizerError, OverflowError),
        prefix="optimizer",
    )


def _parallel_from(value: object) -> ParallelSpec:
    section = _mapping(value, "parallel", ("planner", "stages", "replicas"))
    if "replicas" in section and section["replicas"] != _REPLICAS_OFF:
        raise JobSpecError(
            f"parallel.replicas: {section['replicas']!r} is not available yet "
            f"(available: {_REPLICAS_OFF})"
        )
    stages = section.get("stages", "auto")
    if isinstance(stages, str) and stages != "auto":
        raise JobSpecError(f"parallel.stages: must be auto or an int >= 1, got {_show(stages)}")
    return ParallelSpec(
        planner=section.get("planner", "opfence"),
        stages=None if stages == "auto" else stages,
    )


def _compression_from(value: object) -> CompressionSpec:
    """`none`, `adatopk`, `{adatopk: {floor: F}}` or `{topk: FRACTION}`, each mapping with
    an optional `values: fp32 | fp16`."""
    if isinstance(value, str):
        if value == "topk":
            raise JobSpecError("compression: topk needs its fraction: {topk: 0.05}")
        return CompressionSpec(kind=value)
    section = _mapping(value, "compression", ("topk", "adatopk", "values"))
    kinds = [k for k in ("topk", "adatopk") if k in section]
    if len(kinds) != 1:
        raise JobSpecError(
            "compression: a mapping names exactly one of topk or adatopk, "
            f"got {', '.join(kinds) or 'neither'}"
        )
    values = section.get("values", "fp32")
    if kinds == ["topk"]:
        return CompressionSpec(kind="topk", ratio=section["topk"], values=values)
    options = section["adatopk"]
    if options is None or options is True:
        options = {}
    options = _mapping(options, "compression.adatopk", ("floor",))
    return CompressionSpec(kind="adatopk", floor=options.get("floor", 0.01), values=values)


def _check_choice(value: object, path: str, off: str, later: tuple[str, ...], section: str) -> None:
    """A policy's kind or mode must be its off value; later ones are not available yet."""
    if value == off:
        return
    if value in later:
        raise JobSpecError(f"{path}: {value!r} is not available yet (available: {off})")
    raise JobSpecError(
        f"{path}: unknown {section} setting {_show(value)} (settings: {', '.join((off, *later))})"
    )


def _check_sync(value: object) -> None:
    if isinstance(value, dict):
        if "kind" in value:
            _check_choice(value["kind"], "sync.kind", _SYNC_OFF, _SYNC_LATER, "sync")
        _mapping(value, "sync", ("kind",), ("kind",))
    else:
        _check_choice(value, "sync", _SYNC_OFF, _SYNC_LATER, "sync")


def _check_moe(value: object) -> None:
    section = _mapping(value, "moe", ("mode",), ("mode",))
    _check_choice(section["mode"], "moe.mode", _MOE_OFF, _MOE_LATER, "moe")


def _job_spec_from(value: object) -> JobSpec:
    doc = _mapping(value, "", _TOP_KEYS, _REQUIRED_TOP_KEYS)
    # Checked in the order a reader meets them, so the first error is the topmost one.
    name = _check_str(doc["name"], "name")
    model = _model_from(doc["model"])
    data = _data_from(doc["data"])
    optimizer = _optimizer_from(doc["optimizer"]) if "optimizer" in doc else OptimizerConfig()
    parallel = _parallel_from(doc["parallel"]) if "parallel" in doc else ParallelSpec()
    if "checkpoint" in doc:
        section = _mapping(doc["checkpoint"], "checkpoint", ("every",))
        checkpoint = CheckpointSpec(**section)
    else:
        checkpoint = CheckpointSpec()
    compression = (
        _compression_from(doc["compression"]) if "compression" in doc else CompressionSpec()
    )
    if "sync" in doc:
        _check_sync(doc["sync"])
    if "moe" in doc:
        _check_moe(doc["moe"])
    return JobSpec(
        name=name,
        model=model,
        data=data,
        optimizer=optimizer,
        steps=doc["steps"],
        parallel=parallel,
        checkpoint=checkpoint,
        seed=doc.get("seed", 0),
        compression=compression,
    )


# -- YAML --------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping.

    PyYAML silently keeps the last of duplicate keys, so `steps: 10` followed later by
    `steps: 10000` would train for 10000 steps without a word.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue  # unhashable keys are refused by PyYAML; merge keys may repeat
            key = self.construct_object(key_node)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_job_spec(text: str) -> JobSpec:
    """A job spec from YAML text; safe YAML only (no tags that build objects)."""
    if len(text) > MAX_SPEC_CHARS:
        raise JobSpecError(
            f"{ROOT}: is {len(text)} characters long; a job spec may have {MAX_SPEC_CHARS}"
        )
    try:
        # _StrictLoader is a SafeLoader: plain data only, no tag builds an object.
        doc = yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise JobSpecError(f"{ROOT}: invalid YAML{where}: {e.problem or e}") from None
    except yaml.YAMLError as e:
        raise JobSpecError(f"{ROOT}: invalid YAML: {e}") from None
    except RecursionError:
        raise JobSpecError(f"{ROOT}: invalid YAML: nested too deeply") from None
    except ValueError as e:
        # PyYAML converts scalars with int()/float(), which refuse e.g. 5000-digit numbers.
        raise JobSpecError(f"{ROOT}: invalid YAML: {e}") from None
    if doc is None:
        raise JobSpecError(f"{ROOT}: the document is empty")
    return _job_spec_from(doc)


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
    "MAX_STEPS",
    "PLANNERS",
    "CheckpointSpec",
    "JobSpec",
    "JobSpecError",
    "ModelSpec",
    "ParallelSpec",
    "load_job_spec",
    "parse_job_spec",
]
