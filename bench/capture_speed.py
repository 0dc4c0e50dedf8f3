"""How long capturing (torch.export) and partitioning take, against one plain PyTorch
forward + backward of the same model measured in the same run: the zoo's 12-layer gpt, and a
Hugging Face Llama of the same size (rotary embeddings, RMSNorm, grouped-query attention).

"cold" is the first capture of a model in this process (for the first model it also pays
torch's one-time warm-up of the exporter, the meta device and the FLOP counter); "warm" is
the median of later ones.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from opdag.capture import capture
from opdag.partition import balanced_assignment, partition
from opdag.zoo import build_model, example_batch

GPT = {"layers": 12, "d_model": 256, "heads": 8, "context": 128}
BATCH = 16
STAGES = 4


def _gpt() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    model = build_model("gpt", GPT, seed=0)
    batch = {k: torch.randint(0, 256, v.shape) for k, v in example_batch("gpt", GPT, BATCH).items()}
    return model, batch


def _llama() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=GPT["d_model"],
        intermediate_size=4 * GPT["d_model"],
        num_hidden_layers=GPT["layers"],
        num_attention_heads=GPT["heads"],
        num_key_value_heads=GPT["heads"] // 2,
        max_position_embeddings=GPT["context"],
        use_cache=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    tokens = torch.randint(0, 256, (BATCH, GPT["context"]))
    return transformers.LlamaForCausalLM(config), {"input_ids": tokens, "labels": tokens}


MODELS: dict[str, Callable[[], tuple[nn.Module, dict[str, torch.Tensor]]]] = {
    "gpt": _gpt,
    "llama": _llama,
}


def capture_and_partition(name: str) -> tuple[float, int]:
    model, batch = MODELS[name]()
    example = {k: v.to("meta") for k, v in batch.items()}
    began = time.perf_counter()
    captured = capture(model, example, name=name)
    partition(captured.graph, balanced_assignment(captured.graph, STAGES))
    return time.perf_counter() - began, len(captured.graph.nodes)


def plain_training_step(name: str) -> float:
    model, batch = MODELS[name]()

    def step() -> None:
        out = model(**batch)
        loss = out if isinstance(out, torch.Tensor) else out.loss
        loss.backward()

    step()  # warm-up
    times = []
    for _ in range(3):
        began = time.perf_counter()
        step()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def main() -> None:
    for name in MODELS:
        cold, nodes = capture_and_partition(name)
        warm = statistics.median(capture_and_partition(name)[0] for _ in range(3))
        step = plain_training_step(name)
        print(f"{name} ({GPT['layers']} layers x {GPT['d_model']}, batch {BATCH}): {nodes} nodes")
        print(f"  capture + partition into {STAGES} stages, cold: {cold:6.2f} s")
        print(f"  capture + partition into {STAGES} stages, warm: {warm:6.2f} s")
        print(f"  baseline, one plain PyTorch forward+backward of the same model: {step:6.2f} s")
        print(f"  ratio, cold capture / training step: {cold / step:5.2f}")
        print(f"  ratio, warm capture / training step: {warm / step:5.2f}")


if __name__ == "__main__":
    main()
