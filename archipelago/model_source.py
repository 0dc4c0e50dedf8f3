"""A user's own model, made ready on the submitting machine for upload with its job.

A spec's `model: {file: mymodel.py, factory: build, args: {...}}` names a Python file (a
path relative to the spec's own folder) and the function in it that builds the model:
the file is imported and the factory called here, on the user's machine, and nowhere else.
The module is captured on one micro-batch shaped as the job's data (meta tensors: nothing
is computed), wrapped first in the spec's `loss` when its forward returns logits. A spec's
`model: {opdag: model.opdag}` names a model captured already (`opdag.model_file`), read and
checked the same way. What goes up is the graph with its initial tensors, and the name each
tensor has in the user's own module, for `archipelago export`.

Every way this can fail is a `ModelSourceError`: one line that names the problem.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from coordinator.planning.jobspec import JobSpec
from opdag import model_file
from opdag.capture import capture
from opdag.data.manifest import Manifest
from opdag.errors import OpDagError
from opdag.ir import CapturedModel
from opdag.user_model import (
    UserModelError,
    check_graph_inputs,
    data_example,
    export_names,
    missing_from_export,
    wrap_with_loss,
)

# Bytes of an upload at most (graph and initial tensors): far above the models a volunteer
# cluster trains, far below what would exhaust the coordinator's memory.
MAX_UPLOAD_BYTES = 8 << 30


class ModelSourceError(Exception):
    """The user's model cannot be loaded, built or captured for the job (one line)."""


@dataclass(frozen=True)
class PreparedModel:
    """A user's model ready for upload: captured, and the names it is exported under
    ((state_dict name, graph tensor name); empty: the graph's own). `missing` lists the
    user's tensors the graph does not hold (its forward never reads them)."""

    captured: CapturedModel
    names: list[tuple[str, str]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def encode(self) -> bytes:
        """The `.opdag` bytes of the captured model, as uploaded."""
        blob = model_file.encode_model(self.captured)
        if len(blob) > MAX_UPLOAD_BYTES:
            raise ModelSourceError(
                f"model: the captured model is {len(blob) / 2**30:.1f} GiB; an upload holds "
                f"at most {MAX_UPLOAD_BYTES >> 30} GiB"
            )
        return blob


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 400 else text[:397] + "..."


def prepare_model(spec: JobSpec, base: Path, manifest: Manifest | None = None) -> PreparedModel:
    """The job's model, captured (or read) and checked against its data (a stored
    dataset's: its `manifest`, from the coordinator); `base`: the folder the spec's paths
    are relative to."""
    m = spec.model
    try:
        example = data_example(spec.data, spec.context(), manifest)
    except UserModelError as e:
        raise ModelSourceError(str(e)) from None
    if m.opdag is not None:
        path = _resolve(base, m.opdag, "model.opdag")
        try:
            captured = model_file.load(path)
        except OpDagError as e:
            raise ModelSourceError(f"model.opdag: {_one_line(e)}") from None
        _check_inputs(captured, example)
        return PreparedModel(captured)
    assert m.file is not None  # the spec has exactly one form
    factory = load_factory(_resolve(base, m.file, "model.file"), m.factory_name)
    user = build_user_model(factory, m.args_dict(), seed=spec.seed, label=m.label)
    root = user
    if m.loss is not None:
        try:
            root = wrap_with_loss(user, m.loss, tuple(example))
        except UserModelError as e:
            raise ModelSourceError(str(e)) from None
    else:
        _check_forward(user, tuple(example))
    try:
        captured = capture(root, example, name=type(user).__name__)
    except Exception as e:  # capture refuses (CaptureError), or the forward itself fails
        raise ModelSourceError(f"model: cannot capture {m.label}: {_one_line(e)}") from None
    _check_inputs(captured, example)
    names = export_names(user, root, captured.graph)
    return PreparedModel(captured, names, missing_from_export(user, names))


def _resolve(base: Path, given: str, where: str) -> Path:
    path = Path(given).expanduser()
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise ModelSourceError(f"{where}: no file {str(path)!r}")
    return path


def load_factory(path: Path, name: str) -> Callable[..., Any]:
    """The function `name` of the Python file at `path`, which is imported (here only)."""
    module_name = f"archipelago_user_model_{uuid.uuid4().hex[:8]}"
    loader = importlib.util.spec_from_file_location(module_name, path)
    if loader is None or loader.loader is None:
        raise ModelSourceError(f"model.file: {str(path)!r} is not a Python file")
    module = importlib.util.module_from_spec(loader)
    # Registered while it runs: a dataclass in the file looks its module up by name.
    sys.modules[module_name] = module
    try:
        loader.loader.exec_module(module)
    except Exception as e:  # the user's code, whatever it raises
        sys.modules.pop(module_name, None)
        raise ModelSourceError(
            f"model.file: importing {path.name} failed: {type(e).__name__}: {_one_line(e)}"
        ) from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ModelSourceError(f"model.factory: {path.name} has no function {name!r}")
    return factory


def build_user_model(
    factory: Callable[..., Any], args: dict[str, Any], *, seed: int, label: str
) -> nn.Module:
    """`factory(**args)` with the global RNG seeded by `seed` (and left as it was), in
    training mode."""
    shown = ", ".join(f"{k}={v!r}" for k, v in args.items())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = factory(**args)
        except Exception as e:  # the user's code, whatever it raises
            raise ModelSourceError(
                f"model.factory: {label}({shown}) raised {type(e).__name__}: {_one_line(e)}"
            ) from None
    if not isinstance(model, nn.Module):
        raise ModelSourceError(
            f"model.factory: {label} returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model.train()


def _check_forward(model: nn.Module, inputs: tuple[str, ...]) -> None:
    """A forward that returns its own loss takes the data's inputs by name."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return  # capture will say what it cannot follow
    named = tuple(p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
    if set(named) != set(inputs):
        raise ModelSourceError(
            f"model: the forward takes ({', '.join(named)}) but the data gives "
            f"({', '.join(inputs)}); name the forward's parameters after the data's inputs, "
            "or give model.loss for a forward that takes the first input and returns logits"
        )


def _check_inputs(captured: CapturedModel, example: dict[str, torch.Tensor]) -> None:
    try:
        check_graph_inputs(captured.graph, example)
    except UserModelError as e:
        raise ModelSourceError(str(e)) from None
