"""Load the exported model into the module of model.py and let it continue a prompt:
`python generate.py` after `archipelago export JOB --out model.safetensors`."""

import torch
from model import build
from safetensors.torch import load_file

model = build(d=64, layers=2, context=64)
model.load_state_dict(load_file("model.safetensors"), strict=True)
model.eval()
prompt = torch.tensor([list(b"def main(")])
with torch.no_grad():
    for _ in range(40):
        logits = model(prompt[:, -64:])
        prompt = torch.cat([prompt, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
print(bytes(prompt[0].tolist()).decode("utf-8", "replace"))
