"""`synthetic-shapes`: procedurally drawn 32x32 RGB images of ten shape classes.

Nothing is downloaded; each batch is drawn from a generator seeded by (seed, step), so any
process can produce step k's batch alone. Colours, position, size and stripe period vary
per image and pixel noise is added, so a model has to learn the shape, not a colour.
"""

from __future__ import annotations

import hashlib

import torch

from opdag.data.text import stream_seed

SIDE = 32
CLASS_NAMES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "horizontal-stripes",
    "vertical-stripes",
    "diagonal-stripes",
    "cross",
    "ring",
    "checker",
    "dots",
)
NUM_CLASSES = len(CLASS_NAMES)
# Per-channel normalisation: pixel values are roughly uniform on [0, 1].
PIXEL_MEAN = 0.5
PIXEL_STD = 0.3
NOISE_STD = 0.05
_VERSION = "synthetic-shapes/v1"  # change when the drawing changes, so fingerprints differ


def draw_masks(batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """Boolean foreground masks [NUM_CLASSES, B, 32, 32]: image b drawn as every class,
    with the same random geometry, so a label picks one out."""

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(batch_size, 1, 1, generator=generator)

    centre = torch.arange(SIDE, dtype=torch.float32) + 0.5
    yy = centre.view(1, SIDE, 1)
    xx = centre.view(1, 1, SIDE)
    cx, cy = uniform(10.0, 22.0), uniform(10.0, 22.0)
    radius = uniform(5.0, 9.0)
    stroke = uniform(1.2, 2.4)  # half-width of lines in cross and ring
    period = torch.randint(5, 10, (batch_size, 1, 1), generator=generator).float()
    phase = uniform(0.0, 10.0)
    slope = torch.randint(0, 2, (batch_size, 1, 1), generator=generator).float() * 2 - 1

    dx, dy = xx - cx, yy - cy
    dist = (dx * dx + dy * dy).sqrt()

    def band(u: torch.Tensor) -> torch.Tensor:
        return torch.floor((u + phase) / period) % 2 == 0

    dot_x = (xx + phase) % period - period / 2
    dot_y = (yy + phase) % period - period / 2
    masks = [
        dist <= radius,
        (dx.abs() <= 0.85 * radius) & (dy.abs() <= 0.85 * radius),
        (dy.abs() <= radius) & (dx.abs() <= (dy + radius) / 2),  # apex up, base at the bottom
        band(yy),
        band(xx),
        band(xx + slope * yy),
        ((dx.abs() <= stroke) & (dy.abs() <= radius))
        | ((dy.abs() <= stroke) & (dx.abs() <= radius)),
        (dist - radius).abs() <= stroke,
        (torch.floor((xx + phase) / period) + torch.floor((yy + phase) / period)) % 2 == 0,
        dot_x * dot_x + dot_y * dot_y <= (0.3 * period) ** 2,
    ]
    return torch.stack([m.expand(batch_size, SIDE, SIDE) for m in masks])


def draw_images(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Normalised float32 images [B, 3, 32, 32] of the classes in `labels`."""
    batch_size = labels.numel()
    masks = draw_masks(batch_size, generator)
    mask = masks[labels, torch.arange(batch_size)].unsqueeze(1).float()  # [B, 1, H, W]
    foreground = torch.rand(batch_size, 3, 1, 1, generator=generator)
    # Background = foreground shifted by 0.3..0.7 (mod 1) per channel: never too close.
    shift = 0.3 + 0.4 * torch.rand(batch_size, 3, 1, 1, generator=generator)
    background = (foreground + shift) % 1.0
    image = background + (foreground - background) * mask
    noise = NOISE_STD * torch.randn(batch_size, 3, SIDE, SIDE, generator=generator)
    image = (image + noise).clamp(0.0, 1.0)
    return (image - PIXEL_MEAN) / PIXEL_STD


def _draw_batch(generator: torch.Generator, batch_size: int) -> dict[str, torch.Tensor]:
    labels = torch.randint(0, NUM_CLASSES, (batch_size,), generator=generator)
    return {"images": draw_images(labels, generator), "labels": labels}


def _tensor_bytes(t: torch.Tensor) -> bytes:
    # No numpy: go through a uint8 view of the raw storage.
    return bytes(t.contiguous().view(torch.uint8).flatten().tolist())


class SyntheticShapes:
    """The `synthetic-shapes` image set: batches drawn on the fly per (seed, step)."""

    input_names = ("images", "labels")

    def __init__(self, *, seed: int = 0) -> None:
        self.seed = seed
        # Hashing a drawn sample catches workers whose torch draws different numbers
        # from the same seed, which would silently give them different data.
        digest = hashlib.sha256(f"{_VERSION}/{seed}".encode())
        for sample in (self.batch(0, 4), self.val_batches(1, 4)[0]):
            digest.update(_tensor_bytes(sample["images"]))
            digest.update(_tensor_bytes(sample["labels"]))
        self.fingerprint = digest.hexdigest()

    def batch(self, step: int, batch_size: int) -> dict[str, torch.Tensor]:
        """Training batch `step`: images float32 [B, 3, 32, 32], labels int64 [B]."""
        generator = torch.Generator().manual_seed(stream_seed(self.seed, "train", step))
        return _draw_batch(generator, batch_size)

    def val_batches(self, n: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
        """`n` fixed validation batches, independent of the seed."""
        return [
            _draw_batch(torch.Generator().manual_seed(stream_seed(0, "val", i)), batch_size)
            for i in range(n)
        ]
