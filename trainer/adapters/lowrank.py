"""SVD of a layer's delta (of any type) or of several layers' summed change, and a plain LoRA rebuilt from the
truncated SVD.

A LoRA's delta = scale * up @ down has rank <= r, so its SVD comes from the QR factors of up and down^T and the SVD
of an r x r core: exact, and cheap even for SD1.5's 10240 x 1280 feed-forward layers. LoHa, LoKr and LoCon's Tucker
form have no such factors (a Hadamard or Kronecker product reaches rank r^2 or full rank), so their delta is formed
and decomposed whole. fp64 inside, so "100% of the norm kept" means 1 - 1e-12, not 1 - 1e-6.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from trainer.formats import AdapterFormatError
from trainer.lora_state import LoraLayer, is_plain

from .delta import summed_change

Svd = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def layer_svd(layer) -> Svd:
    """U [out, k], S [k] (descending), Vh [k, in*kh*kw] of the layer's (flattened) delta, fp64; k = min(out, r, in)
    for a LoRA (through its factors), min(out, in*kh*kw) for other types (a DoRA magnitude is left out: this is
    the spectrum of the update's direction, delta)."""
    if layer.kind != "lora" or layer.mid is not None:
        return matrix_svd(layer.delta(torch.float64))
    up = layer.up.flatten(1).to(torch.float64) * layer.scale
    down = layer.down.flatten(1).to(torch.float64)
    q_up, r_up = torch.linalg.qr(up)
    q_down, r_down = torch.linalg.qr(down.T)
    u_core, s, vh_core = torch.linalg.svd(r_up @ r_down.T, full_matrices=False)
    return q_up @ u_core, s, vh_core @ q_down.T


def matrix_svd(matrix: torch.Tensor) -> Svd:
    """Thin SVD of a (flattened) delta, fp64."""
    return torch.linalg.svd(matrix.flatten(1).to(torch.float64), full_matrices=False)


def change_svd(name: str, parts: list[tuple[object, float]], base: Mapping | None = None):
    """(U, S, Vh, like) of the summed change sum_i w_i delta_i of one layer (trainer.adapters.delta's rule);
    `like` is what layer_from_svd needs: the plain layer itself (one plain LoRA at weight 1, or several stacked)
    or the change's shape (the formed sum). `base`: W0 by kohya name, for DoRA."""
    if len(parts) == 1 and parts[0][1] == 1.0 and is_plain(parts[0][0]):
        return (*layer_svd(parts[0][0]), parts[0][0])
    if all(is_plain(layer) for layer, _ in parts):
        stacked = stack_layers(name, parts)
        return (*layer_svd(stacked), stacked)
    total = summed_change(name, parts, base)
    return (*matrix_svd(total), tuple(total.shape))


def stack_layers(name: str, parts: list[tuple[LoraLayer, float]]) -> LoraLayer:
    """One plain LoRA whose delta is exactly sum_i w_i s_i B_i A_i: the ranks stacked (down = the downs
    concatenated, up = the w_i s_i up_i concatenated, alpha = total rank so scale 1)."""
    tail = parts[0][0].down.shape[1:]  # [in] or [in, kh, kw]: every part is reshaped to the first one's layout
    try:
        downs = [layer.down.to(torch.float32).reshape(layer.rank, *tail) for layer, _ in parts]
        ups = [(w * layer.scale * layer.up.to(torch.float32)).reshape(layer.up.shape[0], layer.rank,
                                                                      *[1] * (len(tail) - 1))
               for layer, w in parts]
        down, up = torch.cat(downs, 0), torch.cat(ups, 1)
    except RuntimeError as e:
        shapes = ", ".join(f"{tuple(layer.up.shape)}x{tuple(layer.down.shape)}" for layer, _ in parts)
        raise AdapterFormatError(f"layer {name}: the adapters' shapes ({shapes}) do not agree; they were trained "
                                 f"for different base models") from e
    return LoraLayer(down.contiguous(), up.contiguous(), float(down.shape[0]))


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


def layer_from_svd(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, k: int,
                   like: LoraLayer | tuple[int, ...]) -> LoraLayer:
    """A rank-k plain LoRA (alpha = k, so scale 1) with the factor shapes of `like`, or for a delta shape
    [out, in, kh, kw] down [k, in, kh, kw] and up [out, k, 1, 1] (kohya's conv LoRA); sqrt(s) on each side keeps
    fp16 in range."""
    k = max(1, min(k, len(s)))
    root = s[:k].sqrt()
    up = (u[:, :k] * root).to(torch.float32)
    down = (root[:, None] * vh[:k]).to(torch.float32)
    if isinstance(like, tuple):
        down, up = down.reshape(k, *like[1:]), up.reshape(like[0], k, *[1] * (len(like) - 2))
    else:
        down = down.reshape(k, *like.down.shape[1:])
        up = up.reshape(like.up.shape[0], k, *like.up.shape[2:])
    return LoraLayer(down.contiguous(), up.contiguous(), float(k))
