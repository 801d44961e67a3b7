"""SVD of a LoRA layer's delta without forming it, and rebuilding a layer from the truncated SVD.

delta = scale * up @ down has rank <= r, so its SVD comes from the QR factors of up and down^T and the SVD of an
r x r core: exact, and cheap even for SD1.5's 10240 x 1280 feed-forward layers. fp64 inside, so "100% of the norm
kept" means 1 - 1e-12, not 1 - 1e-6.
"""
from __future__ import annotations

import torch

from trainer.lora_state import LoraLayer


def layer_svd(layer: LoraLayer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U [out, k], S [k] (descending), Vh [k, in*kh*kw] of the layer's (flattened) delta, fp64, k = min(out, r, in)."""
    up = layer.up.flatten(1).to(torch.float64) * layer.scale
    down = layer.down.flatten(1).to(torch.float64)
    q_up, r_up = torch.linalg.qr(up)
    q_down, r_down = torch.linalg.qr(down.T)
    u_core, s, vh_core = torch.linalg.svd(r_up @ r_down.T, full_matrices=False)
    return q_up @ u_core, s, vh_core @ q_down.T


def kept_share(s: torch.Tensor, k: int) -> float:
    """Share of the Frobenius norm kept by the top k singular values: sqrt(sum s[:k]^2) / sqrt(sum s^2)."""
    total = float((s ** 2).sum())
    return 1.0 if total == 0 else float((s[:k] ** 2).sum() / total) ** 0.5


def rank_for_share(s: torch.Tensor, keep: float) -> int:
    """Smallest k (>= 1) whose kept share reaches `keep` (kohya resize_lora's sv_fro criterion)."""
    total = float((s ** 2).sum())
    if total == 0:
        return 1
    shares = ((s ** 2).cumsum(0) / total).sqrt()
    reached = (shares >= keep - 1e-12).nonzero()
    return int(reached[0]) + 1 if len(reached) else len(s)


def layer_from_svd(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, k: int, like: LoraLayer) -> LoraLayer:
    """A rank-k layer (alpha = k, so scale 1) with the shapes of `like`; sqrt(s) on each side keeps fp16 in range."""
    k = max(1, min(k, len(s)))
    root = s[:k].sqrt()
    up = (u[:, :k] * root).to(torch.float32)
    down = (root[:, None] * vh[:k]).to(torch.float32)
    down = down.reshape(k, *like.down.shape[1:])
    up = up.reshape(like.up.shape[0], k, *like.up.shape[2:])
    return LoraLayer(down.contiguous(), up.contiguous(), float(k))
