"""FLUX.2 klein's LoRA modules under Black Forest Labs' original (BFL) names, the layout of kohya-style klein files.

diffusers reads such a file (`_convert_kohya_flux2_lora_to_diffusers`, diffusers 0.42.1
loaders/lora_conversion_utils.py:2596-2779, called by Flux2LoraLoaderMixin.lora_state_dict, lora_pipeline.py:5832)
with this correspondence, which is the whole table below:
- double blocks: `lora_unet_double_blocks_{i}_img_attn_qkv` holds attn.to_q, to_k, to_v (equal rows, split by
  the block-diagonal check in _convert_to_ai_toolkit_cat, l. 2622-2672), `txt_attn_qkv` attn.add_q/k/v_proj, `img_attn_proj`
  attn.to_out.0, `txt_attn_proj` attn.to_add_out, `img_mlp_0/2` ff.linear_in/out, `txt_mlp_0/2`
  ff_context.linear_in/out (l. 2688-2746);
- single blocks: `linear1` is attn.to_qkv_mlp_proj and `linear2` attn.to_out, one module each (l. 2748-2761): klein's
  diffusers model keeps q, k, v and the MLP input fused as BFL does, so nothing is split there.
There is no sd-scripts klein trainer; these names are the ones the only reader we know of (diffusers) expects.
"""
from __future__ import annotations

import re
from typing import Iterable

from ..formats.names import UNET_PREFIX, kohya_name
from .family import FusedName

# BFL module under a double block -> the diffusers modules it holds, in row order
DOUBLE = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
          "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
          "img_attn.proj": ("attn.to_out.0",), "txt_attn.proj": ("attn.to_add_out",),
          "img_mlp.0": ("ff.linear_in",), "img_mlp.2": ("ff.linear_out",),
          "txt_mlp.0": ("ff_context.linear_in",), "txt_mlp.2": ("ff_context.linear_out",)}
SINGLE = {"linear1": ("attn.to_qkv_mlp_proj",), "linear2": ("attn.to_out",)}
KINDS = (("double_blocks", "transformer_blocks", DOUBLE), ("single_blocks", "single_transformer_blocks", SINGLE))


def _table() -> list[tuple[re.Pattern, re.Pattern, str, str, tuple[str, ...]]]:
    """(internal-name pattern, file-name pattern, BFL block path, diffusers block path, parts) per module."""
    out = []
    for bfl_block, diffusers_block, modules in KINDS:
        for bfl, parts in modules.items():
            for k, part in enumerate(parts):
                head, tail = kohya_name(UNET_PREFIX, f"{diffusers_block}.#.{part}").split("#")
                fhead, ftail = kohya_name(UNET_PREFIX, f"{bfl_block}.#.{bfl}").split("#")
                out.append((re.compile(re.escape(head) + r"(\d+)" + re.escape(tail)),
                            re.compile(re.escape(fhead) + r"(\d+)" + re.escape(ftail)),
                            f"{bfl_block}.{{i}}.{bfl}", f"{diffusers_block}.{{i}}.", parts))
    return out


TABLE = _table()


def _fused(bfl: str, block: str, parts: tuple[str, ...], i: str) -> FusedName:
    """rows (): q, k and v have equal rows, which fused.split_layers and fuse find from the tensors."""
    return FusedName(kohya_name(UNET_PREFIX, bfl.format(i=i)),
                     tuple(kohya_name(UNET_PREFIX, block.format(i=i) + p) for p in parts), ())


def kohya_file_layout(names: Iterable[str]) -> list[FusedName]:
    """The FusedNames of the internal (plain diffusers-path) transformer names among `names`; text-encoder names and
    modules outside the table (none of klein's target groups) keep their names."""
    out = {}
    for name in names:
        for internal, _, bfl, block, parts in TABLE:
            m = internal.fullmatch(name)
            if m:
                fused = _fused(bfl, block, parts, m.group(1))
                out.setdefault(fused.name, fused)
                break
    return list(out.values())


def file_parts(names: Iterable[str]) -> list[FusedName]:
    """The reading side: the FusedName of each BFL-named module of a kohya klein file."""
    out = {}
    for name in names:
        for _, file_name, bfl, block, parts in TABLE:
            m = file_name.fullmatch(name)
            if m:
                out.setdefault(name, _fused(bfl, block, parts, m.group(1)))
                break
    return list(out.values())
