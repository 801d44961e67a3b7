"""Fusing trained modules into one file module (SD3's qkv in the SAI/sd-scripts kohya layout) and splitting it back.

A `FusedName` (trainer.models.family) names one file module and the internal layers it holds, in the order of its
output rows. Fusing stacks the parts' downs and puts each part's up in its own rows and rank columns (block
diagonal), so the file's delta is exactly the stacked parts' deltas: (alpha/R) * up @ down with R the summed rank.

sd-scripts fuses the same way (networks/lora_sd3.py:550-566, state_dict with split_qkv) but writes the parts'
alpha unchanged (line 566; "alpha is unchanged" at line 524) although the module's rank is now 3r: a reader that
takes alpha/rank of the file (ComfyUI, Forge) gets a third of the trained scale alpha/r (lora_flux.py:100). We
write alpha = scale * R instead, so every reader gets the trained scale.
"""
from __future__ import annotations

import torch

from trainer.lora_state import LoraLayer

from .errors import AdapterFormatError


def fuse(layers: dict[str, LoraLayer], fused) -> LoraLayer | None:
    """The file module `fused` holds, from the parts present in `layers` (None when none is). A part missing from
    the adapter contributes zero rows and no rank; the alpha is the module's own, chosen so alpha/R is the first
    part's scale (a part of another scale has the ratio folded into its up)."""
    present = [(i, layers[p]) for i, p in enumerate(fused.parts) if p in layers]
    if not present:
        return None
    if len(fused.parts) == 1:
        layer = present[0][1]
        return LoraLayer(down=layer.down, up=_swap(layer.up, fused.swap_halves), alpha=layer.alpha)
    rows = _fuse_rows(fused, present)
    scale = present[0][1].scale
    rank = sum(layer.rank for _, layer in present)
    col, row_starts = 0, [sum(rows[:i]) for i in range(len(rows))]
    up = present[0][1].up.new_zeros((sum(rows), rank, *present[0][1].up.shape[2:]))
    for i, layer in present:
        part_up = layer.up if layer.scale == scale else (layer.up.double() * (layer.scale / scale)).to(up.dtype)
        up[row_starts[i]:row_starts[i] + rows[i], col:col + layer.rank] = part_up
        col += layer.rank
    down = torch.cat([layer.down for _, layer in present], dim=0)
    # alpha/R must equal the first part's alpha/r: alpha_0 * (R / r_0) is exact for whole numbers
    first = present[0][1]
    alpha = None if first.alpha is None else float(first.alpha) * rank / first.rank
    return LoraLayer(down=down, up=_swap(up, fused.swap_halves), alpha=alpha)


def _fuse_rows(fused, present: list[tuple[int, LoraLayer]]) -> list[int]:
    """Each part's output rows: a present part's from its up; a missing part's from fused.rows, or (rows not given,
    or given for another model's widths) the rows the present parts share."""
    actual = {i: layer.up.shape[0] for i, layer in present}
    if fused.rows and all(fused.rows[i] == n for i, n in actual.items()):
        return list(fused.rows)
    if len(actual) < len(fused.parts) and len(set(actual.values())) != 1:
        raise AdapterFormatError(f"cannot write {fused.name}: the widths of its missing parts are unknown (the "
                                 f"present ones differ: {sorted(set(actual.values()))})")
    shared = next(iter(actual.values()))
    return [actual.get(i, shared) for i in range(len(fused.parts))]


def split(layer: LoraLayer, fused) -> dict[str, LoraLayer]:
    """The internal layers a file module holds (the inverse of fuse). A block-diagonal up with equal rank blocks
    (what fuse and sd-scripts write) gives each part its own down rows, up block and alpha * r_i / R (its scale);
    any other up gives every part the whole down and its rows of up, at the file's alpha: the same delta."""
    up = _swap(layer.up, fused.swap_halves)
    if len(fused.parts) == 1:
        return {fused.parts[0]: LoraLayer(down=layer.down, up=up, alpha=layer.alpha)}
    rows = _split_rows(fused, up.shape[0])
    slices = [up[sum(rows[:i]):sum(rows[:i + 1])] for i in range(len(rows))]
    blocks = _rank_blocks(slices, layer.rank)
    if blocks is None:
        return {part: LoraLayer(down=layer.down, up=part_up, alpha=layer.alpha)
                for part, part_up in zip(fused.parts, slices)}
    out = {}
    for i, (start, stop) in blocks.items():
        alpha = None if layer.alpha is None else float(layer.alpha) * (stop - start) / layer.rank
        out[fused.parts[i]] = LoraLayer(down=layer.down[start:stop], up=slices[i][:, start:stop], alpha=alpha)
    return out


def _split_rows(fused, total: int) -> list[int]:
    """The parts' output rows: fused.rows where they add up to the file's; else in fused.rows' proportions (a
    model of another width: FLUX's linear1 is q, k, v and the MLP input as 1:1:1:4 at any size); else an equal
    split."""
    if fused.rows and sum(fused.rows) == total:
        return list(fused.rows)
    if fused.rows and (total * fused.rows[0]) % sum(fused.rows) == 0:
        scaled = [total * r // sum(fused.rows) for r in fused.rows]
        if sum(scaled) == total and all(total * r % sum(fused.rows) == 0 for r in fused.rows):
            return scaled
    n = len(fused.parts)
    if total % n:
        raise AdapterFormatError(f"{fused.name}: its {total} output rows do not split into its {n} parts "
                                 f"({', '.join(fused.parts)}); is the file for another model?")
    return [total // n] * n


def _rank_blocks(slices: list[torch.Tensor], rank: int) -> dict[int, tuple[int, int]] | None:
    """part index -> its rank columns, when up is block diagonal with equal blocks in part order: over all parts,
    else over the parts with non-zero rows (fuse gives a part the adapter lacked zero rows and no rank). None
    when up is not block diagonal that way."""
    candidates = [list(range(len(slices))), [i for i, s in enumerate(slices) if bool(s.any())]]
    for owners in candidates:
        if not owners or rank % len(owners):
            continue
        width = rank // len(owners)
        blocks = {i: (k * width, (k + 1) * width) for k, i in enumerate(owners)}
        if all(_zero_outside(s, blocks.get(i)) for i, s in enumerate(slices)):
            return blocks
    return None


def _zero_outside(rows: torch.Tensor, block: tuple[int, int] | None) -> bool:
    mask = torch.ones(rows.shape[1], dtype=torch.bool)
    if block is not None:
        mask[block[0]:block[1]] = False
    return not bool(rows[:, mask].any())


def _swap(up: torch.Tensor, swap: bool) -> torch.Tensor:
    """up with the two halves of its rows exchanged (SAI's (shift, scale) vs diffusers' (scale, shift))."""
    if not swap:
        return up
    first, second = up.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def fuse_layers(layers: dict[str, LoraLayer], layout) -> dict[str, LoraLayer]:
    """The layers under the file's names: each FusedName's parts as its one module, every other layer as it is."""
    taken = {part for fused in layout for part in fused.parts}
    out = {name: layer for name, layer in layers.items() if name not in taken}
    for fused in layout:
        layer = fuse(layers, fused)
        if layer is not None:
            out[fused.name] = layer
    return out


def split_layers(layers: dict[str, LoraLayer], parts) -> dict[str, LoraLayer]:
    """The inverse of fuse_layers for the FusedNames of `parts` present in `layers`."""
    out = dict(layers)
    for fused in parts:
        if fused.name in out:
            out.update(split(out.pop(fused.name), fused))
    return out
