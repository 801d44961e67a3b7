"""LoRA dropout whose mask for each image comes from that image's own seed.

peft's LoRA dropout is an nn.Dropout, which draws from the process's global generator: the same global batch split
over two processes would drop different inputs than in one (issue 16). Here each image's mask is drawn from
(seed, batch, its position in the global batch) mixed with the layer's name, so it does not matter which process,
or which micro-batch neighbours, an image has; and a forward recomputed under gradient checkpointing draws the same
mask again. The seeds are set for one micro-batch's forward and backward by `image_seeds` (a plain module global:
on CUDA the backward, and with it the recomputation, runs in autograd's own thread, which a ContextVar misses).
"""
from __future__ import annotations

import zlib
from contextlib import contextmanager

import torch
from torch import nn

from .seeds import mix

_seeds: list[list[int] | None] = [None]  # the images' seeds of the micro-batch being trained, else None


@contextmanager
def image_seeds(seeds: list[int]):
    """Inside, ImageDropout draws the mask of the i-th image of a batch from seeds[i]."""
    _seeds[0] = list(seeds)
    try:
        yield
    finally:
        _seeds[0] = None


class ImageDropout(nn.Module):
    """Dropout on the LoRA input, x * mask / (1 - p), each image's mask from its own seed and this layer's name."""

    def __init__(self, p: float, layer: str):
        super().__init__()
        self.p, self.layer = p, zlib.crc32(layer.encode())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        seeds = _seeds[0]
        if seeds is None or len(seeds) != x.shape[0]:  # not one of a training step's batches: plain dropout
            return nn.functional.dropout(x, self.p, training=True)
        g = torch.Generator(device=x.device)
        keep = torch.stack([torch.rand(x.shape[1:], generator=g.manual_seed(mix(s, self.layer)), device=x.device)
                            for s in seeds]) >= self.p
        # where() keeps the bool mask for backward (a product would keep it in x's dtype, 2-4x the memory)
        return torch.where(keep, x * (1.0 / (1.0 - self.p)), torch.zeros((), dtype=x.dtype, device=x.device))


def per_image_dropout(model: nn.Module, adapter: str, component: str) -> None:
    """Replace peft's dropout of `adapter` in every LoRA layer of `model` by ImageDropout of the same p, keyed by
    '<component>.<module name>' (SDXL's two text encoders have the same module names)."""
    for name, module in model.named_modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, nn.ModuleDict) and adapter in dropouts and isinstance(dropouts[adapter], nn.Dropout):
            dropouts[adapter] = ImageDropout(dropouts[adapter].p, f"{component}.{name}")
