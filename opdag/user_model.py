"""A user's own model and the data that feeds it: what both ends of an upload agree on.

The submitter captures a user's `nn.Module` on one micro-batch shaped as the job's data
(`data_example`); a forward that returns logits is wrapped first (`wrap_with_loss`), so the
graph ends in the loss of the logits and the data's labels. The coordinator checks the
uploaded graph against the same shapes (`check_graph_inputs`), and the names a trained
model is exported under (`export_names`, `check_export_names`): each tensor under the name
the user's own module gives it, so the exported file loads into that module as it is.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from opdag.data import DataConfig
from opdag.data.manifest import Manifest
from opdag.errors import OpDagError
from opdag.ir import Graph, dtype_name

# The attribute the loss wrapper holds the user's module under: the graph's tensor names
# start with it, the exported names do not.
WRAPPED = "model"
# Export names are state_dict keys: printable, bounded, and no more of them than tensors.
_EXPORT_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,300}$")
# The side of the `synthetic-shapes` images (opdag.data.images).
_IMAGE_SIDE = 32


class UserModelError(OpDagError, ValueError):
    """A user's model does not fit the job: its inputs, its output, its tensor names."""


def data_example(
    data: DataConfig,
    context: int | None,
    manifest: Manifest | None = None,
    *,
    device: str | torch.device = "meta",
) -> dict[str, torch.Tensor]:
    """One micro-batch of the job's data as zeros, by input name (shapes and dtypes only);
    a user's stored dataset (`data.dataset`) is shaped by its `manifest`."""
    batch = data.micro_batch_size
    if data.dataset:
        if manifest is None:
            raise UserModelError(f"data.dataset: the manifest of {data.dataset!r} is needed")
        return _dataset_example(manifest, batch, context, device)
    if data.kind == "text":
        if context is None:
            raise UserModelError("model.context: text data needs the model's context length")
        shape = (batch, context)
        return {
            "tokens": torch.zeros(shape, dtype=torch.int64, device=device),
            "targets": torch.zeros(shape, dtype=torch.int64, device=device),
        }
    return {
        "images": torch.zeros(batch, 3, _IMAGE_SIDE, _IMAGE_SIDE, device=device),
        "labels": torch.zeros(batch, dtype=torch.int64, device=device),
    }


def _dataset_example(
    manifest: Manifest, batch: int, context: int | None, device: str | torch.device
) -> dict[str, torch.Tensor]:
    """A micro-batch of a stored dataset as its source gives it (`opdag.data.dataset`):
    token windows and their shift as int64 [batch, context]; rows of each array, integers
    as int64 and floats as float32."""
    if manifest.kind == "tokens":
        if context is None:
            raise UserModelError(
                f"model.context: dataset {manifest.name!r} holds tokens; give the model's "
                "context length"
            )
        return {
            name: torch.zeros(batch, context, dtype=torch.int64, device=device)
            for name in manifest.fields
        }
    out = {}
    for a in manifest.arrays:
        dtype = torch.float32 if a.dtype.startswith("float") else torch.int64
        out[a.name] = torch.zeros(batch, *a.shape[1:], dtype=dtype, device=device)
    return out


# -- the loss wrapper --------------------------------------------------------------------


def apply_loss(loss: str, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The scalar training loss `loss` of a model's output against the data's labels."""
    if loss == "cross_entropy":
        return F.cross_entropy(output.flatten(0, -2), labels.flatten())
    if loss == "nll":
        return F.nll_loss(output.flatten(0, -2), labels.flatten())
    if loss == "mse":
        return F.mse_loss(output, labels.type_as(output))
    raise UserModelError(f"model.loss: unknown loss {loss!r}")


class _TextLoss(nn.Module):
    """A text model that returns logits, and its loss against the next tokens."""

    def __init__(self, model: nn.Module, loss: str) -> None:
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return apply_loss(self.loss, self.model(tokens), targets)


class _ImageLoss(nn.Module):
    """An image model that returns logits (or predictions), and its loss against labels."""

    def __init__(self, model: nn.Module, loss: str) -> None:
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return apply_loss(self.loss, self.model(images), labels)


_WRAPPERS: dict[frozenset[str], type[nn.Module]] = {
    frozenset(("tokens", "targets")): _TextLoss,
    frozenset(("images", "labels")): _ImageLoss,
}


def wrap_with_loss(model: nn.Module, loss: str, input_names: Sequence[str]) -> nn.Module:
    """`model` (forward: the data's first input to logits) with its loss as the forward's
    result; its tensors are named `model.<its own name>` in the wrapper."""
    wrapper = _WRAPPERS.get(frozenset(input_names))
    if wrapper is None or len(input_names) != 2:
        known = "tokens, targets; images, labels"
        raise UserModelError(
            f"model.loss: data with inputs ({', '.join(input_names)}) cannot be wrapped "
            f"(inputs known: {known}); let the forward return its loss instead, or rename "
            "the dataset's inputs at `data put`"
        )
    if loss not in ("cross_entropy", "nll", "mse"):
        raise UserModelError(f"model.loss: unknown loss {loss!r}")
    wrapped: nn.Module = wrapper(model, loss)
    return wrapped.train(model.training)


# -- checks of a graph against the data --------------------------------------------------


def check_graph_inputs(graph: Graph, example: Mapping[str, torch.Tensor]) -> None:
    """UserModelError unless the graph takes exactly the data's inputs, each shaped and
    typed as one micro-batch of them, and ends in a scalar loss."""
    if set(graph.inputs) != set(example):
        raise UserModelError(
            f"model: the forward takes ({', '.join(graph.inputs)}) but the data gives "
            f"({', '.join(example)}); name the forward's parameters after the data's inputs, "
            "or give model.loss so that the forward takes only the data's first input"
        )
    for name in graph.inputs:
        meta, want = graph.node(name).meta, example[name]
        shape, dtype = tuple(want.shape), dtype_name(want.dtype)
        if meta is None or tuple(meta.shape) != shape or meta.dtype != dtype:
            got = "nothing known" if meta is None else f"{meta.dtype}{list(meta.shape)}"
            raise UserModelError(
                f"model: input {name!r} was captured as {got}; one micro-batch of the data "
                f"is {dtype}{list(shape)} (data.batch_size / data.micro_batches, model.context)"
            )
    if not graph.loss:
        raise UserModelError(
            "model: the forward does not return a scalar loss; give model.loss "
            "(cross_entropy, mse or nll) for a forward that returns logits"
        )


# -- names the trained model is exported under -------------------------------------------


def export_names(user: nn.Module, root: nn.Module, graph: Graph) -> list[tuple[str, str]]:
    """(name in the user's `state_dict`, name of the graph's tensor) for every tensor of
    the user's module the graph holds; `root` is what was captured (`user` itself, or its
    loss wrapper). A tensor under two names (tied weights) is exported under both."""
    held = graph.param_specs
    first: dict[int, str] = {}
    for name, t in (
        *root.named_parameters(remove_duplicate=False),
        *root.named_buffers(remove_duplicate=False),
    ):
        if name in held:
            first.setdefault(id(t), name)
    pairs: list[tuple[str, str]] = []
    for key, t in user.state_dict(keep_vars=True).items():
        tensor = first.get(id(t))
        if tensor is not None:
            pairs.append((key, tensor))
    return pairs


def missing_from_export(user: nn.Module, pairs: Iterable[tuple[str, str]]) -> list[str]:
    """The user's `state_dict` keys the export will lack (tensors the forward never uses)."""
    named = {name for name, _ in pairs}
    return [key for key in user.state_dict() if key not in named]


def check_export_names(graph: Graph, pairs: Sequence[tuple[str, str]]) -> None:
    """UserModelError unless each pair names a distinct, well-formed export name and a
    tensor of the graph."""
    held = graph.param_specs
    if len(pairs) > 2 * len(held) + 16:
        raise UserModelError(f"{len(pairs)} export names for {len(held)} tensors")
    seen: set[str] = set()
    for name, tensor in pairs:
        if not _EXPORT_NAME.match(name):
            raise UserModelError(f"export name {name[:64]!r} is not a tensor name")
        if name in seen:
            raise UserModelError(f"export name {name!r} is given twice")
        if tensor not in held:
            raise UserModelError(f"export name {name!r} names {tensor[:64]!r}, not in the graph")
        seen.add(name)
