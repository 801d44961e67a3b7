"""SD3 / SD3.5's transformer in Stability AI's original (SAI, "MMDiT") layout <-> diffusers' SD3Transformer2DModel.

diffusers reads the SAI single file (`convert_sd3_transformer_checkpoint_to_diffusers`, diffusers 0.42.1
loaders/single_file_utils.py:2018-2216) but has no way back. This module is that way back, as one table of module
correspondences used for both the weights (baking a single file) and the LoRA names (kohya files, whose SD3
modules are SAI module paths: sd-scripts networks/lora_sd3.py names `lora_unet_joint_blocks_0_x_block_attn_qkv`
from its MMDiT's `joint_blocks.0.x_block.attn.qkv`).

Facts the table encodes, from that converter:
- SAI fuses q, k and v into one `qkv` Linear, rows in q, k, v order (torch.chunk(..., 3), lines 2063-2072); the
  x stream's are diffusers' attn.to_q/k/v, the context stream's attn.add_q/k/v_proj, SD3.5 Medium's second
  (dual) attention's attn2.to_q/k/v (lines 2116-2124).
- The last joint block is context_pre_only: its context stream has no proj and no mlp (lines 2102, 2168, 2188), and
  its adaLN Linear stores (shift, scale) where diffusers' AdaLayerNormContinuous wants (scale, shift), so its rows'
  halves are swapped (swap_scale_shift, lines 1990-1993 and 2176-2183); so is the final layer's (lines 2209-2214).
- qk RMS-norm weights (SD3.5) are `attn.ln_q` / `attn.ln_k` per stream (lines 2087-2099, 2132-2138).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

from ..formats.names import UNET_PREFIX, kohya_name
from .family import FusedName

if TYPE_CHECKING:
    import torch

ORIGINAL_PREFIX = "model.diffusion_model."
BLOCK = "joint_blocks.{i}."          # SAI's block path
DIFFUSERS_BLOCK = "transformer_blocks.{i}."
# whole parameters that are not a module's weight/bias: the position-embedding table (a buffer of PatchEmbed)
_WHOLE_KEYS = {"pos_embed.pos_embed": "pos_embed"}


@dataclass(frozen=True)
class _Module:
    """One SAI module and the diffusers modules it holds, in the order of its output rows."""
    sai: str                  # path under joint_blocks.{i}. for block modules, else from the model's root
    parts: tuple[str, ...]    # diffusers paths (under transformer_blocks.{i}. for block modules)
    not_last: bool = False    # absent from the last (context_pre_only) block
    swap: str = ""            # "last": halves swapped in the last block only; "always"; "": never
    layer: bool = True        # an nn.Linear / nn.Conv2d (LoRA can target it); False for qk-norm weights


_BLOCK_MODULES = (
    _Module("x_block.attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
    _Module("x_block.attn.proj", ("attn.to_out.0",)),
    _Module("x_block.attn.ln_q", ("attn.norm_q",), layer=False),
    _Module("x_block.attn.ln_k", ("attn.norm_k",), layer=False),
    _Module("x_block.attn2.qkv", ("attn2.to_q", "attn2.to_k", "attn2.to_v")),
    _Module("x_block.attn2.proj", ("attn2.to_out.0",)),
    _Module("x_block.attn2.ln_q", ("attn2.norm_q",), layer=False),
    _Module("x_block.attn2.ln_k", ("attn2.norm_k",), layer=False),
    _Module("x_block.mlp.fc1", ("ff.net.0.proj",)),
    _Module("x_block.mlp.fc2", ("ff.net.2",)),
    _Module("x_block.adaLN_modulation.1", ("norm1.linear",)),
    _Module("context_block.attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    _Module("context_block.attn.proj", ("attn.to_add_out",), not_last=True),
    _Module("context_block.attn.ln_q", ("attn.norm_added_q",), layer=False),
    _Module("context_block.attn.ln_k", ("attn.norm_added_k",), layer=False),
    _Module("context_block.mlp.fc1", ("ff_context.net.0.proj",), not_last=True),
    _Module("context_block.mlp.fc2", ("ff_context.net.2",), not_last=True),
    _Module("context_block.adaLN_modulation.1", ("norm1_context.linear",), swap="last"),
)
_TOP_MODULES = (
    _Module("x_embedder.proj", ("pos_embed.proj",)),
    _Module("t_embedder.mlp.0", ("time_text_embed.timestep_embedder.linear_1",)),
    _Module("t_embedder.mlp.2", ("time_text_embed.timestep_embedder.linear_2",)),
    _Module("y_embedder.mlp.0", ("time_text_embed.text_embedder.linear_1",)),
    _Module("y_embedder.mlp.2", ("time_text_embed.text_embedder.linear_2",)),
    _Module("context_embedder", ("context_embedder",)),
    _Module("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap="always"),
    _Module("final_layer.linear", ("proj_out",)),
)
# diffusers path (block-relative for block modules) -> (module, part index)
_BLOCK_BY_PART = {p: (m, k) for m in _BLOCK_MODULES for k, p in enumerate(m.parts)}
_TOP_BY_PART = {p: (m, k) for m in _TOP_MODULES for k, p in enumerate(m.parts)}
_BLOCK_PATH = re.compile(r"transformer_blocks\.(\d+)\.(.+)")


def _swapped(module: _Module, block: int | None, num_layers: int) -> bool:
    return module.swap == "always" or (module.swap == "last" and block == num_layers - 1)


def _sai_path(module: _Module, block: int | None) -> str:
    return module.sai if block is None else BLOCK.format(i=block) + module.sai


def _diffusers_path(module: _Module, block: int | None, part: int) -> str:
    return module.parts[part] if block is None else DIFFUSERS_BLOCK.format(i=block) + module.parts[part]


def _lookup(path: str, num_layers: int) -> tuple[_Module, int | None, int]:
    """(module, block number or None, part index) of a diffusers module path; KeyError where the model has none."""
    if path in _TOP_BY_PART:
        module, part = _TOP_BY_PART[path]
        return module, None, part
    m = _BLOCK_PATH.fullmatch(path)
    if m is None or m.group(2) not in _BLOCK_BY_PART:
        raise KeyError(path)
    block = int(m.group(1))
    module, part = _BLOCK_BY_PART[m.group(2)]
    # a block past the last, or a context-stream output module of the last block, is not in the model
    if block >= num_layers or (module.not_last and block == num_layers - 1):
        raise KeyError(path)
    return module, block, part


def original_module(path: str, num_layers: int) -> tuple[str, int, int, bool]:
    """A diffusers SD3Transformer2DModel module path -> (its SAI module path without `model.diffusion_model.`, its
    part index in that module's rows, how many parts it has, whether SAI stores the rows' halves swapped).
    `original_module("transformer_blocks.3.attn.to_k", 24)` -> ("joint_blocks.3.x_block.attn.qkv", 1, 3, False).
    Also maps the qk-norm modules (attn.norm_q -> attn.ln_q). KeyError(path) for a path the model has not."""
    module, block, part = _lookup(path, num_layers)
    return _sai_path(module, block), part, len(module.parts), _swapped(module, block, num_layers)


def _config_value(config, key: str):
    """A value of a diffusers config (FrozenDict, plain dict or an object with attributes)."""
    return config[key] if isinstance(config, dict) else getattr(config, key)


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    """(a, b) -> (b, a) along the rows; its own inverse (diffusers' swap_scale_shift, single_file_utils.py:1990)."""
    import torch
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def transformer_to_original(state_dict: dict, config, prefix: str = ORIGINAL_PREFIX) -> dict:
    """diffusers transformer weights -> the SAI single-file names (under `prefix`): q, k and v concatenated into
    qkv, (scale, shift) halves put back as (shift, scale), qk-norm weights as ln_q / ln_k, biases included. The
    exact inverse of diffusers' convert_sd3_transformer_checkpoint_to_diffusers. `config`: the transformer's
    (num_layers decides which block is the context_pre_only one)."""
    import torch
    num_layers = int(_config_value(config, "num_layers"))
    out, fused = {}, {}
    for key, tensor in state_dict.items():
        if key in _WHOLE_KEYS:
            out[prefix + _WHOLE_KEYS[key]] = tensor
            continue
        path, param = key.rsplit(".", 1)
        module, block, part = _lookup(path, num_layers)
        name = f"{_sai_path(module, block)}.{param}"
        fused.setdefault(name, (module, block, {}))[2][part] = tensor
    for name, (module, block, pieces) in fused.items():
        if len(pieces) != len(module.parts):
            missing = [_diffusers_path(module, block, k) for k in range(len(module.parts)) if k not in pieces]
            raise ValueError(f"{name} needs {', '.join(missing)} too, which the state dict lacks")
        tensor = torch.cat([pieces[k] for k in range(len(pieces))]) if len(pieces) > 1 else pieces[0]
        out[prefix + name] = _swap_halves(tensor) if _swapped(module, block, num_layers) else tensor
    return out


def kohya_file_layout(index: dict, num_layers: int) -> list[FusedName]:
    """How a kohya file (sd-scripts' SAI layout) groups the transformer modules of `index` (a module_index: kohya
    name -> (prefix, diffusers path, layer)): one FusedName per SAI module with at least one part in the index,
    named `lora_unet_<SAI path>`, its parts the internal kohya names in row order. Text-encoder entries keep their
    names and are left out. A fused module whose index lacks some parts still lists all of them (the plain kohya
    name of each missing one, its rows those of a present sibling: SAI's fused modules are equal-sized q, k, v),
    so that the rows always add up to the file module's."""
    groups: dict[tuple[str, int | None], dict[int, tuple[str, int]]] = {}
    modules: dict[tuple[str, int | None], _Module] = {}
    for name, (prefix, path, layer) in index.items():
        if prefix != UNET_PREFIX:
            continue
        module, block, part = _lookup(path, num_layers)
        groups.setdefault((module.sai, block), {})[part] = (name, int(layer.weight.shape[0]))
        modules[(module.sai, block)] = module
    out = []
    for key, present in groups.items():
        module, block = modules[key], key[1]
        some_rows = next(iter(present.values()))[1]
        parts = [present.get(k) or (kohya_name(UNET_PREFIX, _diffusers_path(module, block, k)), some_rows)
                 for k in range(len(module.parts))]
        out.append(FusedName(kohya_name(UNET_PREFIX, _sai_path(module, block)), tuple(n for n, _ in parts),
                             tuple(r for _, r in parts), _swapped(module, block, num_layers)))
    return out


def _name_pattern(module: _Module, in_block: bool) -> re.Pattern:
    """The kohya file name of an SAI module, with the block number as a group for block modules (built from the
    table's template; never by turning a name's '_' back into '.')."""
    if not in_block:
        return re.compile(re.escape(kohya_name(UNET_PREFIX, module.sai)))
    head, tail = kohya_name(UNET_PREFIX, BLOCK.format(i="#") + module.sai).split("#")
    return re.compile(re.escape(head) + r"(\d+)" + re.escape(tail))


_NAME_PATTERNS = ([(_name_pattern(m, True), m, True) for m in _BLOCK_MODULES if m.layer]
                  + [(_name_pattern(m, False), m, False) for m in _TOP_MODULES if m.layer])


def _parse_file_name(name: str) -> tuple[_Module, int | None] | None:
    """(module, block number or None) of an SAI-layout kohya name, or None for any other name."""
    for pattern, module, in_block in _NAME_PATTERNS:
        m = pattern.fullmatch(name)
        if m:
            return module, int(m.group(1)) if in_block else None
    return None


def _guess_num_layers(parsed: list[tuple[_Module, int | None]]) -> int:
    """The block count a file's names imply: its largest block number + 1. A guess where the file leaves out the
    last block (sd-scripts' train_block_indices): then only "is block i the last?" matters, and a highest block
    that has a context-stream proj or mlp cannot be the last one (those modules are not_last), so count one more."""
    blocks = [b for _, b in parsed if b is not None]
    if not blocks:
        return 0
    top = max(blocks)
    not_last = any(b == top and m.not_last for m, b in parsed)
    return top + (2 if not_last else 1)


def file_parts(names: Iterable[str], num_layers: int | None = None) -> list[FusedName]:
    """The reading side of kohya_file_layout, with no model at hand: for each SAI-layout lora_unet name of a file
    (`lora_unet_joint_blocks_0_x_block_attn_qkv`), the FusedName whose parts are the internal (plain diffusers-path)
    kohya names in row order, rows () (an equal split of the up rows, true of SAI's qkv), swap_halves as when
    writing. Other names (text encoders, diffusers-layout `lora_unet_transformer_blocks_...`) are skipped, as are
    names of modules a model of `num_layers` blocks lacks. num_layers None: guessed from the names (see
    _guess_num_layers)."""
    parsed = {}
    for name in names:
        if name not in parsed and (found := _parse_file_name(name)) is not None:
            parsed[name] = found
    if num_layers is None:
        num_layers = _guess_num_layers(list(parsed.values()))
    out = []
    for name, (module, block) in parsed.items():
        if block is not None and (block >= num_layers or (module.not_last and block == num_layers - 1)):
            continue
        parts = tuple(kohya_name(UNET_PREFIX, _diffusers_path(module, block, k)) for k in range(len(module.parts)))
        out.append(FusedName(name, parts, (), _swapped(module, block, num_layers)))
    return out
