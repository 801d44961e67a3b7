"""An adapter as plain tensors, independent of peft and of any file layout.

Every format reader produces an `Adapter` and every writer consumes one, so blending, resizing and export never
care where a file came from. Layers are keyed by their kohya module name (`lora_unet_..._to_q`, `lora_te_...`):
that name is the one identifier A1111, ComfyUI and kohya agree on, and it is model-independent.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LoraLayer:
    """One adapted module: delta = (alpha / rank) * up @ down (Hu et al. 2021, eq. 3)."""
    down: torch.Tensor  # A: [r, in] or [r, in, kh, kw]
    up: torch.Tensor  # B: [out, r] or [out, r, 1, 1]
    alpha: float | None = None  # None: the file had no alpha, which A1111 and ComfyUI read as scale 1

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The full update in the shape of the adapted weight: [out, in] or [out, in, kh, kw]."""
        down, up = self.down.to(dtype), self.up.to(dtype)
        if down.dim() == 2:
            return self.scale * (up @ down)
        # conv: up is [out, r, 1, 1]; the product acts on the flattened input kernel
        out = up.flatten(1) @ down.flatten(1)
        return self.scale * out.reshape(up.shape[0], *down.shape[1:])


@dataclass
class Adapter:
    """A whole adapter: layers keyed by kohya module name, plus string metadata (ss_*, modelspec.*)."""
    layers: dict[str, LoraLayer] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.layers)

    def num_parameters(self) -> int:
        return sum(layer.down.numel() + layer.up.numel() for layer in self.layers.values())
