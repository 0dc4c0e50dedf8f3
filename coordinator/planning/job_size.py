"""How big a job is, predicted from its spec alone (nothing is allocated or built), and
`check_job_size`, which refuses a job past a coordinator's `SpecLimits`.

A spec's model is refused from these figures before the coordinator builds it (it builds
and captures every job's model in its own memory). The parameter count is exact (a unit
test compares it with the built model's); the operator count and the activation memory are
estimates, made generous, of what capture and training would take.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Any

from coordinator.planning.spec_errors import JobSpecError
from coordinator.planning.spec_limits import FLAGS, GB, SpecLimits
from opdag.zoo import (
    GPTConfig,
    MLPConfig,
    ModelConfig,
    MoEGPTConfig,
    ResNetConfig,
    model_config,
)
from opdag.zoo.gpt import VOCAB

if TYPE_CHECKING:  # jobspec imports this module
    from coordinator.planning.jobspec import JobSpec

FLOAT_BYTES = 4  # parameters, gradients, optimizer state and activations are float32
# Optimizer state per parameter, in floats: adam(w) keeps two moments, sgd one momentum.
OPTIMIZER_SLOTS = {"adamw": 2, "adam": 2, "sgd": 1}
IMAGE_SIDE = 32  # the zoo's image models eat 32x32 images


@dataclass(frozen=True)
class ModelSize:
    """A model's predicted size: its parameters, the operators of its captured graph, and
    the bytes one process needs to train it (parameters, gradients, optimizer state and
    one micro-batch's activations)."""

    parameters: int
    operators: int
    memory_bytes: int


def predicted_size(
    zoo: str, args: Mapping[str, Any], *, micro_batch_size: int, optimizer: str = "adamw"
) -> ModelSize:
    """The size of zoo model `zoo` with `args`, trained on micro-batches of
    `micro_batch_size` samples by `optimizer`."""
    config = model_config(zoo, args)
    params, operators, activations = _figures(config, micro_batch_size)
    state = params * (2 + OPTIMIZER_SLOTS.get(optimizer, 2))  # weights, gradients, slots
    return ModelSize(params, operators, (state + activations) * FLOAT_BYTES)


def _figures(config: ModelConfig, batch: int) -> tuple[int, int, int]:
    """(parameters, operators, activation floats of a micro-batch of `batch` samples)."""
    if isinstance(config, MoEGPTConfig):
        return _moe_gpt(config, batch)
    if isinstance(config, GPTConfig):
        return _gpt(config, batch)
    if isinstance(config, ResNetConfig):
        return _resnet(config, batch)
    if isinstance(config, MLPConfig):
        return _mlp(config, batch)
    raise TypeError(f"no size model for {type(config).__name__}")


def _linear(fan_in: int, fan_out: int, *, bias: bool = True) -> int:
    return fan_in * fan_out + (fan_out if bias else 0)


def _transformer(d: int, heads: int, context: int, layers: int, batch: int) -> tuple[int, int, int]:
    """What every zoo transformer has: embeddings, attention, norms, head (no feed-forward).
    Per layer: two norms, the qkv and output projections, and the saved activations of
    attention with its probabilities (heads x context per token: the unfused kernel's)."""
    attention = 2 * 2 * d + _linear(d, 3 * d) + _linear(d, d)
    params = VOCAB * d + context * d + layers * attention + 2 * d + _linear(d, VOCAB)
    tokens = batch * context
    per_layer = tokens * (8 * d + heads * context)
    activations = layers * per_layer + tokens * (3 * d + 3 * VOCAB)
    # ATen operators of the captured graph, parameter reads included.
    return params, 17 + 30 * layers, activations


def _feed_forward(d: int, hidden: int, tokens: int) -> tuple[int, int]:
    """A transformer MLP's parameters and the activations it saves for `tokens` tokens."""
    return _linear(d, hidden) + _linear(hidden, d), tokens * (3 * d + 2 * hidden)


def _gpt(c: GPTConfig, batch: int) -> tuple[int, int, int]:
    params, operators, activations = _transformer(c.d_model, c.heads, c.context, c.layers, batch)
    ff_params, ff_acts = _feed_forward(c.d_model, c.mlp_ratio * c.d_model, batch * c.context)
    return params + c.layers * ff_params, operators + 6 * c.layers, activations + c.layers * ff_acts


def _moe_gpt(c: MoEGPTConfig, batch: int) -> tuple[int, int, int]:
    params, operators, activations = _transformer(c.d_model, c.heads, c.context, c.layers, batch)
    d, hidden, tokens = c.d_model, c.mlp_ratio * c.d_model, batch * c.context
    ff_params, ff_acts = _feed_forward(d, hidden, tokens)
    moe_blocks = sum(c.is_moe_block(i) for i in range(c.layers))
    dense = c.layers - moe_blocks
    # The expert buffers hold `capacity` rows each (as opdag.zoo.moe_gpt.MoE sizes them);
    # the one-hot dispatch and combine tensors are tokens x experts x capacity.
    ratio = Fraction(c.capacity_factor).limit_denominator(1000)
    capacity = -(-(tokens * c.top_k * ratio.numerator) // (c.experts * ratio.denominator))
    expert_params, expert_acts = _feed_forward(d, hidden, capacity)
    moe_params = _linear(d, c.experts, bias=False) + c.experts * expert_params
    moe_acts = 4 * tokens * c.experts * (capacity + 2) + c.experts * expert_acts + 6 * tokens * d
    return (
        params + dense * ff_params + moe_blocks * moe_params,
        operators + 6 * dense + moe_blocks * (37 + 9 * c.experts),
        activations + dense * ff_acts + moe_blocks * moe_acts,
    )


def _resnet(c: ResNetConfig, batch: int) -> tuple[int, int, int]:
    first = c.widths[0]
    side = IMAGE_SIDE
    # The stem: conv, norm (weight and bias), relu; about five maps of its output are saved.
    params = _linear(9 * c.in_channels, first, bias=False) + 2 * first
    operators = 23
    maps = 5 * first * side * side + c.in_channels * side * side
    channels = first
    for stage, (width, count) in enumerate(zip(c.widths, c.blocks, strict=True)):
        for block in range(count):
            stride = 2 if stage > 0 and block == 0 else 1
            side = -(-side // stride)
            convs = _linear(9 * channels, width, bias=False) + _linear(9 * width, width, bias=False)
            params += convs + 4 * width
            operators += 21
            maps += 9 * width * side * side
            if stride != 1 or channels != width:
                params += _linear(channels, width, bias=False) + 2 * width
                operators += 4
                maps += 2 * width * side * side
            channels = width
    params += _linear(channels, c.num_classes)
    return params, operators, batch * (maps + 2 * channels + 3 * c.num_classes)


def _mlp(c: MLPConfig, batch: int) -> tuple[int, int, int]:
    widths = [c.in_features] + [c.hidden] * (c.layers - 1)
    params = sum(_linear(a, b) for a, b in itertools.pairwise(widths))
    params += _linear(widths[-1], c.num_classes)
    activations = batch * (c.in_features + 3 * c.hidden * (c.layers - 1) + 3 * c.num_classes)
    return params, 3 + 4 * c.layers, activations


def _over(where: str, what: str, limit: str, bound: str) -> JobSpecError:
    return JobSpecError(
        f"{where}: {what}; this coordinator accepts at most {limit} ({FLAGS[bound]})"
    )


def check_job_size(spec: JobSpec, limits: SpecLimits) -> ModelSize | None:
    """The model's predicted size, if `spec` keeps within `limits`; else JobSpecError
    (None for a user's model, which is sized from its graph once uploaded)."""
    data = spec.data
    for where, value, bound in (
        ("data.batch_size", data.batch_size, "max_batch_size"),
        ("data.micro_batches", data.micro_batches, "max_micro_batches"),
        ("steps", spec.steps, "max_steps"),
    ):
        limit = getattr(limits, bound)
        if value > limit:
            raise _over(where, f"{value} is too many", str(limit), bound)
    if spec.model.zoo is None:
        # A user's model is sized from its uploaded graph (`coordinator.model_upload`).
        return None
    size = predicted_size(
        spec.model.zoo,
        spec.model.args_dict(),
        micro_batch_size=data.micro_batch_size,
        optimizer=spec.optimizer.name,
    )
    model = f"{spec.model.zoo} with these args"
    if size.parameters > limits.max_parameters:
        raise _over(
            "model.args",
            f"{model} has {size.parameters:.3g} parameters",
            f"{limits.max_parameters:.3g}",
            "max_parameters",
        )
    if size.operators > limits.max_operators:
        raise _over(
            "model.args",
            f"{model} has about {size.operators} operators",
            str(limits.max_operators),
            "max_operators",
        )
    if size.memory_bytes > limits.max_memory_bytes:
        raise _over(
            "model.args",
            f"{model} needs about {size.memory_bytes / GB:.1f} GB to train on micro-batches "
            f"of {data.micro_batch_size} (parameters, gradients, optimizer state, activations)",
            f"{limits.max_memory_bytes / GB:g} GB",
            "max_memory_bytes",
        )
    return size
