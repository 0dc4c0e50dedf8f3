"""What a stage keeps of its recent steps so that the coordinator can check one afterwards.

With spot checks on (the job's `trust.spot_checks`, `StagePlan.spot_keep` > 0), a stage
keeps, for each of its last `keep` steps, a copy of its parameters and buffers as its
forwards of that step used them, every micro-batch's inputs as it took them from its inbox
(or loaded them, at stage 0), and the gradients it was sent for each, as they arrived. The
coordinator picks a (step, stage, micro-batch) only after the step ran, asks this stage for
its inputs, gradients and parameters and its neighbours for what they received from it
(`SpotEvidence`), recomputes the stage's forward and backward and compares
(`coordinator.spot_checks`): a stage cannot tell which of its micro-batches will be checked
while it sends them, and a receiver's evidence is what it actually received.

Memory: `keep` copies of the stage's parameters and buffers, and `keep` steps of inputs and
gradients (references to what the stage received; the inbox would have freed them).
Nothing is kept with spot checks off.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from opdag.values import Value

# The most steps a stage is asked to keep (`trust.spot_checks.keep` is checked against the
# same bound by the coordinator's spec).
MAX_SPOT_KEEP = 16


class EvidenceGone(LookupError):
    """The step or micro-batch asked for is not (or no longer) kept."""


@dataclass
class _Step:
    params: dict[str, torch.Tensor]
    inputs: dict[int, dict[str, Value]] = field(default_factory=dict)
    # micro-batch -> "SRC/NAME" -> the gradient stage SRC sent for value NAME
    gradients: dict[int, dict[str, Value]] = field(default_factory=dict)


class SpotEvidence:
    """The last `keep` steps' parameters and inputs of one stage."""

    def __init__(self, keep: int) -> None:
        if not 1 <= keep <= MAX_SPOT_KEEP:
            raise ValueError(f"spot evidence keeps 1 to {MAX_SPOT_KEEP} steps, not {keep}")
        self.keep = keep
        self._steps: OrderedDict[int, _Step] = OrderedDict()

    def begin(self, step: int, state: dict[str, torch.Tensor]) -> None:
        """Step `step` starts with parameters and buffers `state` (a copy: `copy_state`,
        made in the compute thread); the oldest step beyond `keep` is forgotten."""
        self._steps[step] = _Step(params=state)
        self._steps.move_to_end(step)
        while len(self._steps) > self.keep:
            self._steps.popitem(last=False)

    def record(self, step: int, mb: int, inputs: Mapping[str, Value]) -> None:
        """The inputs micro-batch `mb` of `step` ran forward with."""
        held = self._steps.get(step)
        if held is not None:
            held.inputs[mb] = dict(inputs)

    def record_gradients(self, step: int, mb: int, src: int, grads: Mapping[str, Value]) -> None:
        """The gradients stage `src` sent for micro-batch `mb` of `step`, as received."""
        held = self._steps.get(step)
        if held is not None:
            mine = held.gradients.setdefault(mb, {})
            mine.update({f"{src}/{name}": g for name, g in grads.items()})

    def gradients(self, step: int, mb: int) -> dict[str, Value]:
        held = self._steps.get(step)
        if held is None or mb not in held.gradients:
            raise EvidenceGone(f"no gradients of micro-batch {mb} of step {step} ({self._span()})")
        return held.gradients[mb]

    def inputs(self, step: int, mb: int) -> dict[str, Value]:
        held = self._steps.get(step)
        if held is None or mb not in held.inputs:
            raise EvidenceGone(f"micro-batch {mb} of step {step} is not kept ({self._span()})")
        return held.inputs[mb]

    def params(self, step: int) -> dict[str, torch.Tensor]:
        held = self._steps.get(step)
        if held is None:
            raise EvidenceGone(f"step {step} is not kept ({self._span()})")
        return held.params

    def _span(self) -> str:
        if not self._steps:
            return "nothing kept yet"
        return f"steps {min(self._steps)}..{max(self._steps)} are"


def copy_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of a module's parameters and buffers, on the CPU, that training cannot change."""
    return {k: v.detach().clone().cpu() for k, v in state.items()}
