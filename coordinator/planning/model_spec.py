"""The `model` section of a job spec: a zoo model, or a user's own (a Python file and the
factory in it, or a captured `.opdag` file), checked as the rest of the spec is.

A zoo model's arguments are checked against the zoo's configs (the zoo names the rule, the
error the argument). A user's model is captured on the submitting machine
(`archipelago.model_source`) and uploaded with the job, so here its section is checked for
form only: exactly one of `zoo`, `file`, `opdag`; a factory's arguments plain data; a known
`loss`; a `context` length for text data (`JobSpec` checks that against the data).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    Field,
    PlainValidator,
    StrictStr,
    ValidationInfo,
    field_validator,
)

from coordinator.planning.spec_errors import (
    Blame,
    build_attributed,
    int_in_range,
    show,
    spec_dataclass,
)
from opdag.zoo import ZOO_NAMES, ZooError, model_config


def _zoo_name(zoo: str) -> str:
    if zoo not in ZOO_NAMES:
        raise ValueError(f"unknown model {zoo!r} (the zoo has: {', '.join(ZOO_NAMES)})")
    return zoo


def _finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, tuple):
        return all(_finite(v) for v in value)
    return True


def _plain(value: Any) -> Any:
    """`value` as YAML-safe plain data: tuples become lists (safe_dump refuses tuples)."""
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


# -- the model: a zoo model, a user's Python file, or a captured `.opdag` file ------------

# Losses `model.loss` may name: the submitter wraps a model whose forward returns logits so
# that the captured graph ends in this loss of the logits and the data's labels.
LOSSES: tuple[str, ...] = ("cross_entropy", "mse", "nll")
MAX_PATH_CHARS = 1000
MAX_CONTEXT = 1 << 20


def _user_arg(value: object, where: str) -> Any:
    """One argument of a user's factory as plain, hashable data (lists become tuples)."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int | float):
        if not _finite(value):
            raise Blame(f"must be finite, got {value!r}", where)
        return value
    if isinstance(value, list | tuple):
        return tuple(_user_arg(v, where) for v in value)
    raise Blame(f"must be a number, string, bool, null or a list of them, got {show(value)}", where)


def _user_args(args: object) -> tuple[tuple[str, Any], ...]:
    """A factory's arguments (the user's own, unchecked but plain) as sorted items."""
    try:
        given = dict(args) if isinstance(args, dict | tuple) else None
    except (TypeError, ValueError):
        given = None
    if given is None:
        raise ValueError(f"must be a mapping of argument names to values, got {show(args)}")
    for key in given:
        if not isinstance(key, str) or not key.isidentifier():
            raise ValueError(f"argument names must be Python identifiers, got {show(key)}")
    return tuple(sorted((k, _user_arg(v, k)) for k, v in given.items()))


def _path(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_PATH_CHARS:
        raise ValueError(
            f"must be a file path (1 to {MAX_PATH_CHARS} characters), got {show(value)}"
        )
    return value


def _factory(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.isidentifier():
        raise ValueError(f"must be the name of a function in the model file, got {show(value)}")
    return value


def _loss(value: object) -> str | None:
    if value is None:
        return None
    if value not in LOSSES:
        raise ValueError(f"unknown loss {show(value)} (losses: {', '.join(LOSSES)})")
    assert isinstance(value, str)
    return value


def _context(value: object) -> int | None:
    return None if value is None else int_in_range(1, MAX_CONTEXT)(value)


@spec_dataclass("model")
class ModelSpec:
    """The model to train: a zoo model (`zoo`, `args`), a user's own Python file and the
    factory in it that builds the `nn.Module` (`file`, `factory`, `args`), or a model
    captured already (`opdag`: a `.opdag` file). The last two are captured on the
    submitting machine and uploaded with the job; the coordinator never reads the files.

    `args` holds every argument of a zoo model, defaults filled in, as sorted items (a
    user factory's: those given): the spec is hashable, and a stored job rebuilds the same
    model even if a zoo default changes later. `loss` wraps a user's model whose forward
    returns logits (absent: the forward returns its scalar loss); `context` is the tokens
    per sequence of a user's text model (a zoo model's comes from its arguments).
    """

    zoo: Annotated[StrictStr | None, AfterValidator(lambda z: z if z is None else _zoo_name(z))] = (
        None
    )
    args: tuple[tuple[str, Any], ...] = Field(default=(), validate_default=True)
    file: Annotated[str | None, PlainValidator(_path)] = None
    factory: Annotated[str | None, PlainValidator(_factory)] = None
    opdag: Annotated[str | None, PlainValidator(_path)] = None
    loss: Annotated[str | None, PlainValidator(_loss)] = None
    context: Annotated[int | None, PlainValidator(_context)] = None

    @field_validator("args", mode="before")
    @classmethod
    def _every_argument(cls, args: object, info: ValidationInfo) -> tuple[tuple[str, Any], ...]:
        if "zoo" not in info.data:
            return ()  # the zoo's own error is the one reported
        zoo = info.data["zoo"]
        if zoo is None:
            return _user_args(args)  # a user's factory: checked when it is called
        try:
            # A spec gives a mapping; ModelSpec built directly, sorted items.
            given = dict(args) if isinstance(args, dict | tuple) else None
        except (TypeError, ValueError):
            given = None
        if given is None:
            raise ValueError(f"must be a mapping of argument names to values, got {show(args)}")
        known = [f.name for f in dataclasses.fields(model_config(zoo))]
        for key in sorted(given, key=str):
            if key not in known:
                raise Blame(f"unknown argument ({zoo} takes: {', '.join(known)})", key)
        # A huge YAML int given for a float argument overflows in the conversion.
        config = build_attributed(
            lambda a: model_config(zoo, a), given, error=(ZooError, OverflowError), prefix=zoo
        )
        resolved = {name: getattr(config, name) for name in known}
        for name, value in resolved.items():
            # The zoo checks ranges with comparisons, which an infinity can slip through.
            if not _finite(value):
                raise Blame(f"must be finite, got {value!r}", name)
        return tuple(sorted(resolved.items()))

    def __post_init__(self) -> None:
        forms = [k for k in ("zoo", "file", "opdag") if getattr(self, k) is not None]
        if len(forms) != 1:
            given = f" (given: {', '.join(forms)})" if forms else ""
            raise ValueError(f"give exactly one of zoo, file or opdag{given}")
        allowed = {"zoo": ("args",), "file": ("args", "factory", "loss", "context")}
        keys = allowed.get(forms[0], ("context",))
        for key in ("args", "factory", "loss", "context"):
            if key not in keys and getattr(self, key) not in (None, ()):
                raise Blame(f"does not go with model.{forms[0]} (it takes: {', '.join(keys)})", key)

    @property
    def uploaded(self) -> bool:
        """Whether the model is the user's own, captured by the submitter and uploaded."""
        return self.zoo is None

    @property
    def label(self) -> str:
        """How the model is named in messages: the zoo name or the file (and factory)."""
        if self.zoo is not None:
            return self.zoo
        if self.file is not None:
            return f"{self.file}:{self.factory_name}"
        return str(self.opdag)

    @property
    def factory_name(self) -> str:
        """The function of a model file that builds the model (`build` unless named)."""
        return self.factory or "build"

    def args_dict(self) -> dict[str, Any]:
        """The arguments as a dict, as `opdag.zoo.build_model` (or the factory) takes them."""
        return dict(self.args)

    def to_plain(self) -> dict[str, Any]:
        """The model section as plain data; only the keys its form has."""
        if self.zoo is not None:
            return {"zoo": self.zoo, "args": {k: _plain(v) for k, v in self.args}}
        out: dict[str, Any] = (
            {"file": self.file} if self.file is not None else {"opdag": self.opdag}
        )
        if self.file is not None:
            out["args"] = {k: _plain(v) for k, v in self.args}
        given = ("factory", "loss", "context")
        out.update({k: getattr(self, k) for k in given if getattr(self, k) is not None})
        return out
