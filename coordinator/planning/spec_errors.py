"""Job spec errors: `JobSpecError`, and pydantic's validation errors turned into it.

A spec's classes are pydantic dataclasses (`spec_dataclass`) and forms (`Form`). When
one refuses a value, `spec_error` gives the first error as one line that starts with the
dotted path of the field at fault (`data.batch_size: must be ...`), in the spec's own
words: an unknown or missing key lists the keys its mapping takes, and a check's own
message is kept. A check that blames a field below the one it checks raises `Blame`.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, dataclass_transform

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from pydantic.dataclasses import dataclass as pydantic_dataclass

from opdag.errors import OpDagError


class JobSpecError(OpDagError, ValueError):
    """A job spec is malformed; the message starts with the dotted path of the bad field."""


ROOT = "spec"  # the path of errors about the document as a whole

_T = TypeVar("_T")


def show(value: object) -> str:
    """A value as an error message quotes it: typed, and never more than a line."""
    if value is None:
        return "null"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def int_in_range(lo: int, hi: int) -> Callable[[object], int]:
    """The check of a count: an int (never a bool) in [lo, hi]."""

    def check(value: object) -> int:
        # bool is an int to Python but never what a spec means by a count.
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be an int, got {show(value)}")
        if not lo <= value <= hi:
            raise ValueError(f"must be in [{lo}, {hi}], got {value}")
        return value

    return check


def one_of(choices: tuple[str, ...]) -> Callable[[object], str]:
    """The check of a setting that is one of a few names."""

    def check(value: object) -> str:
        if isinstance(value, str) and value in choices:
            return value
        raise ValueError(f"must be one of {', '.join(choices)}, got {show(value)}")

    return check


class Blame(ValueError):
    """A check's error about a field below the one checked (`where`, relative to it)."""

    def __init__(self, message: str, *where: str) -> None:
        super().__init__(message)
        self.where = where


# The class that reads each mapping of a spec, by dotted path ("" is the whole document):
# an unknown or missing key is reported with the keys that mapping takes.
_SECTIONS: dict[str, type] = {}


def section(path: str) -> Callable[[type[_T]], type[_T]]:
    """Register the decorated class as the reader of the mapping at `path`."""

    def register(cls: type[_T]) -> type[_T]:
        _SECTIONS[path] = cls
        return cls

    return register


def _keys(path: str, *, required: bool = False) -> str:
    reader = _SECTIONS.get(path)
    params = inspect.signature(reader).parameters.values() if reader else ()
    return ", ".join(p.name for p in params if not required or p.default is p.empty)


def spec_error(error: ValidationError, path: str = "") -> JobSpecError:
    """pydantic's first error (the topmost field's) as `dotted.path: what is wrong`."""
    first = error.errors()[0]
    cause = first.get("ctx", {}).get("error")
    loc = [*([path] if path else []), *first["loc"], *getattr(cause, "where", ())]
    where, parent = ".".join(map(str, loc)), ".".join(map(str, loc[:-1]))
    kind, got = first["type"], show(first["input"])
    if kind in ("extra_forbidden", "unexpected_keyword_argument", "invalid_key"):
        message = f"unknown key ({parent or ROOT} takes: {_keys(parent)})"
    elif kind.startswith("missing"):
        message = f"missing; {parent or ROOT} needs: {_keys(parent, required=True)}"
    elif kind in ("model_type", "dataclass_type"):
        message = f"must be a mapping with keys {_keys(where)}, got {got}"
    elif kind == "string_type":
        message = f"must be a string, got {got}"
    else:
        message = str(cause) if isinstance(cause, Exception) else f"{first['msg']}, got {got}"
    return JobSpecError(f"{where or ROOT}: {message}")


@dataclass_transform(frozen_default=True, field_specifiers=(Field,))
def spec_dataclass(path: str, *, kw_only: bool = False) -> Callable[[type[_T]], type[_T]]:
    """A frozen pydantic dataclass that reads the spec's mapping at `path`; built directly,
    it raises a JobSpecError as parsing does."""

    def build(cls: type[_T]) -> type[_T]:
        checked: Any = pydantic_dataclass(frozen=True, kw_only=kw_only, config=_FORBID_EXTRA)(cls)
        validate, signature = checked.__init__, inspect.signature(checked)

        @functools.wraps(validate)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            try:
                # By keyword, so that pydantic names a positional argument too.
                validate(self, **signature.bind(*args, **kwargs).arguments)
            except ValidationError as e:
                raise spec_error(e, path) from None

        checked.__init__ = __init__
        return section(path)(checked)

    return build


_FORBID_EXTRA = ConfigDict(extra="forbid")


class Form(BaseModel):
    """A mapping of the spec that no class of the spec keeps as it is written."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def arguments_of(component: type, path: str) -> type[BaseModel]:
    """The form of `component`'s keyword arguments, values unchecked: pydantic names an
    unknown or missing key, the component checks the values (and names its rule)."""
    params = inspect.signature(component).parameters.values()
    fields: dict[str, Any] = {p.name: (Any, ... if p.default is p.empty else None) for p in params}
    return section(path)(create_model(f"_{component.__name__}Form", __base__=Form, **fields))


def build_attributed(
    build: Callable[[Mapping[str, Any]], _T],
    given: Mapping[str, Any],
    *,
    error: type[Exception] | tuple[type[Exception], ...],
    prefix: str,
) -> _T:
    """`build(given)`, its error re-raised as a Blame of the argument that causes it.

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
    # Component errors start with their own short prefix ("data: "); the path replaces it.
    message = str(whole).removeprefix(f"{prefix}: ")
    if culprit is None:
        raise Blame(message) from whole
    raise Blame(message + _number_hint(given[culprit]), str(culprit)) from whole


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
