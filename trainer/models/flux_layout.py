"""FLUX.1's transformer in Black Forest Labs' original (BFL) layout <-> diffusers' FluxTransformer2DModel.

diffusers reads BFL's single file (`convert_flux_transformer_checkpoint_to_diffusers`, diffusers 0.42.1
loaders/single_file_utils.py:2294-2489) but has no way back. This module is that way back, as one table of module
correspondences used for both the weights (baking a single file) and the LoRA names (kohya files, whose FLUX modules
are BFL module paths: sd-scripts networks/lora_flux.py:826-827 names `lora_unet_double_blocks_0_img_attn_qkv` from
its Flux model's `double_blocks.0.img_attn.qkv`, library/flux_models.py:649-677 and 762-793).

Facts the table encodes, from that converter:
- Double blocks (double_blocks.{i} -> transformer_blocks.{i}) have an image and a text stream. Each fuses q, k and v
  into one `qkv` Linear in q, k, v order (torch.chunk(..., 3), lines 2375-2396): img_attn.qkv holds attn.to_q/k/v,
  txt_attn.qkv attn.add_q/k/v_proj.
- Single blocks (single_blocks.{i} -> single_transformer_blocks.{i}): `linear1` holds to_q, to_k, to_v and proj_mlp,
  rows h, h, h, 4h (unequal: torch.split with (3072, 3072, 3072, 12288), lines 2453-2466); `linear2` is proj_out
  as one module, 1:1 (line 2476): both take [attention; mlp] concatenated in that order (flux_models.py:836,
  diffusers transformer_flux.py:404).
- The modulation Linears are copied unchanged (img_mod.lin -> norm1.linear, txt_mod.lin -> norm1_context.linear,
  modulation.lin -> norm.linear; lines 2360-2372, 2446-2452): BFL chunks them (shift, scale, gate)[x2]
  (flux_models.py:641, ModulationOut fields at 627-631) as diffusers' AdaLayerNormZero(Single) does
  (normalization.py:168, 200). Only the final layer's adaLN stores (shift, scale) (flux_models.py:869) where
  diffusers' AdaLayerNormContinuous wants (scale, shift) (normalization.py:349): its rows' halves swap (lines
  2309-2312, 2480-2486).
- qk RMS norms keep their weight as `scale`: img_attn.norm.query_norm.scale -> attn.norm_q.weight (lines 2397-2410,
  2468-2474). guidance_in exists only where the model embeds guidance (dev; not schnell) (lines 2333-2346).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

from ..formats.names import UNET_PREFIX, kohya_name
from .family import FusedName

if TYPE_CHECKING:
    import torch

ORIGINAL_PREFIX = "model.diffusion_model."  # what ComfyUI-saved checkpoints add; BFL's own files have none
HIDDEN = 3072  # FLUX.1's width (dev, schnell and their derivatives): flux_models.py:386, 418
MLP_RATIO = 4  # diffusers' FluxSingleTransformerBlock default, never overridden (transformer_flux.py:360)


@dataclass(frozen=True)
class _Module:
    """One BFL module and the diffusers modules it holds, in the order of its output rows."""
    bfl: str                  # path under the block (double_blocks.{i}. / single_blocks.{i}.), else from the root
    parts: tuple[str, ...]    # diffusers paths, under the block's diffusers path for block modules
    widths: tuple[int, ...] = ()  # fused: each part's rows as a multiple of the block width (its parts' in_features)
    swap: bool = False        # BFL stores the rows' two halves the other way round
    param: str = ""           # BFL's name for diffusers' `weight` (the RMS norms' `scale`); "" keeps the name

    @property
    def layer(self) -> bool:
        """An nn.Linear (LoRA can target it); False for the qk-norm weights."""
        return not self.param


@dataclass(frozen=True)
class _Kind:
    """Double or single blocks: the BFL and diffusers block paths and the modules of one block."""
    bfl: str
    diffusers: str
    modules: tuple[_Module, ...]


QKV = (1, 1, 1)
DOUBLE = _Kind("double_blocks.{i}.", "transformer_blocks.{i}.", (
    _Module("img_mod.lin", ("norm1.linear",)),
    _Module("img_attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v"), QKV),
    _Module("img_attn.norm.query_norm", ("attn.norm_q",), param="scale"),
    _Module("img_attn.norm.key_norm", ("attn.norm_k",), param="scale"),
    _Module("img_attn.proj", ("attn.to_out.0",)),
    _Module("img_mlp.0", ("ff.net.0.proj",)),
    _Module("img_mlp.2", ("ff.net.2",)),
    _Module("txt_mod.lin", ("norm1_context.linear",)),
    _Module("txt_attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), QKV),
    _Module("txt_attn.norm.query_norm", ("attn.norm_added_q",), param="scale"),
    _Module("txt_attn.norm.key_norm", ("attn.norm_added_k",), param="scale"),
    _Module("txt_attn.proj", ("attn.to_add_out",)),
    _Module("txt_mlp.0", ("ff_context.net.0.proj",)),
    _Module("txt_mlp.2", ("ff_context.net.2",)),
))
SINGLE = _Kind("single_blocks.{i}.", "single_transformer_blocks.{i}.", (
    _Module("modulation.lin", ("norm.linear",)),
    _Module("linear1", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), (1, 1, 1, MLP_RATIO)),
    _Module("norm.query_norm", ("attn.norm_q",), param="scale"),
    _Module("norm.key_norm", ("attn.norm_k",), param="scale"),
    _Module("linear2", ("proj_out",)),
))
TOP = (
    _Module("img_in", ("x_embedder",)),
    _Module("txt_in", ("context_embedder",)),
    _Module("time_in.in_layer", ("time_text_embed.timestep_embedder.linear_1",)),
    _Module("time_in.out_layer", ("time_text_embed.timestep_embedder.linear_2",)),
    _Module("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",)),
    _Module("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",)),
    _Module("guidance_in.in_layer", ("time_text_embed.guidance_embedder.linear_1",)),
    _Module("guidance_in.out_layer", ("time_text_embed.guidance_embedder.linear_2",)),
    _Module("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap=True),
    _Module("final_layer.linear", ("proj_out",)),
)
_TOP_BY_PART = {p: (m, k) for m in TOP for k, p in enumerate(m.parts)}
_BY_PART = {kind: {p: (m, k) for m in kind.modules for k, p in enumerate(m.parts)} for kind in (DOUBLE, SINGLE)}
# fullmatch: "single_transformer_blocks.0.x" does not match the double blocks' pattern
_BLOCK_PATHS = {DOUBLE: re.compile(r"transformer_blocks\.(\d+)\.(.+)"),
                SINGLE: re.compile(r"single_transformer_blocks\.(\d+)\.(.+)")}


@dataclass(frozen=True)
class _Place:
    """Where a diffusers module sits in the table: its BFL module, the block kind and number (None at the top)."""
    module: _Module
    kind: _Kind | None
    block: int | None

    def bfl_path(self) -> str:
        return self.module.bfl if self.kind is None else self.kind.bfl.format(i=self.block) + self.module.bfl

    def diffusers_path(self, part: int) -> str:
        head = "" if self.kind is None else self.kind.diffusers.format(i=self.block)
        return head + self.module.parts[part]


def _lookup(path: str, num_double: int, num_single: int) -> tuple[_Place, int]:
    """(place, part index) of a diffusers module path; KeyError(path) where a model of these counts has none."""
    if path in _TOP_BY_PART:
        module, part = _TOP_BY_PART[path]
        return _Place(module, None, None), part
    for kind, count in ((DOUBLE, num_double), (SINGLE, num_single)):
        m = _BLOCK_PATHS[kind].fullmatch(path)
        if m and m.group(2) in _BY_PART[kind] and int(m.group(1)) < count:
            module, part = _BY_PART[kind][m.group(2)]
            return _Place(module, kind, int(m.group(1))), part
    raise KeyError(path)


def original_module(path: str, num_double: int, num_single: int) -> tuple[str, int, int, bool]:
    """A diffusers FluxTransformer2DModel module path -> (its BFL module path without a prefix, its part index in
    that module's rows, how many parts it has, whether BFL stores the rows' halves swapped).
    `original_module("single_transformer_blocks.3.proj_mlp", 19, 38)` -> ("single_blocks.3.linear1", 3, 4, False).
    Also maps the qk-norm modules (attn.norm_q -> img_attn.norm.query_norm). KeyError(path) for a path the model
    has not (a block past num_double / num_single included)."""
    place, part = _lookup(path, num_double, num_single)
    return place.bfl_path(), part, len(place.module.parts), place.module.swap


def _config_value(config, key: str):
    """A value of a diffusers config (FrozenDict, plain dict or an object with attributes)."""
    return config[key] if isinstance(config, dict) else getattr(config, key)


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    """(a, b) -> (b, a) along the rows; its own inverse (diffusers' swap_scale_shift, single_file_utils.py:2309)."""
    import torch
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def transformer_to_original(state_dict: dict, config, prefix: str = "") -> dict:
    """diffusers transformer weights -> BFL's single-file names (under `prefix`; "" as BFL ships them,
    ORIGINAL_PREFIX as ComfyUI saves them): q, k, v (and the single blocks' MLP input) concatenated into qkv /
    linear1, the final adaLN's (scale, shift) put back as (shift, scale), RMS-norm weights as `scale`, biases
    included. The exact inverse of diffusers' convert_flux_transformer_checkpoint_to_diffusers. `config`: the
    transformer's (num_layers, num_single_layers bound the block numbers)."""
    import torch
    counts = int(_config_value(config, "num_layers")), int(_config_value(config, "num_single_layers"))
    out, fused = {}, {}
    for key, tensor in state_dict.items():
        path, param = key.rsplit(".", 1)
        place, part = _lookup(path, *counts)
        name = f"{place.bfl_path()}.{place.module.param or param}"
        fused.setdefault(name, (place, {}))[1][part] = tensor
    for name, (place, pieces) in fused.items():
        if len(pieces) != len(place.module.parts):
            missing = [place.diffusers_path(k) for k in range(len(place.module.parts)) if k not in pieces]
            raise ValueError(f"{name} needs {', '.join(missing)} too, which the state dict lacks")
        tensor = torch.cat([pieces[k] for k in range(len(pieces))]) if len(pieces) > 1 else pieces[0]
        out[prefix + name] = _swap_halves(tensor) if place.module.swap else tensor
    return out


def original_to_transformer(original: dict, shapes: dict[str, tuple], num_double: int, num_single: int) -> dict:
    """BFL's single-file weights (with or without ORIGINAL_PREFIX) -> the diffusers names of `shapes` (a
    FluxTransformer2DModel's state-dict shapes): each key gets its rows of the BFL tensor it is part of (qkv and
    linear1 cut by the parts' own row counts, the final adaLN's halves swapped back). The inverse of
    transformer_to_original, for any width: diffusers' converter fixes FLUX.1's 3072 (single_file_utils.py:2305).
    KeyError names a weight the file lacks."""
    own = {k.removeprefix(ORIGINAL_PREFIX): v for k, v in original.items()}
    out, used = {}, set()
    for key, shape in shapes.items():
        path, param = key.rsplit(".", 1)
        place, part = _lookup(path, num_double, num_single)
        name = f"{place.bfl_path()}.{place.module.param or param}"
        tensor = own[name]
        used.add(name)
        tensor = _swap_halves(tensor) if place.module.swap else tensor
        if len(place.module.parts) > 1:
            start = sum(shapes[f"{place.diffusers_path(j)}.{param}"][0] for j in range(part))
            tensor = tensor[start:start + shape[0]]
        out[key] = tensor
    left = sorted(set(own) - used)
    if left:  # ComfyUI's "scaled fp8" files carry per-weight scales (*.scale_weight) that plain weights would lose
        raise ValueError(f"{len(left)} tensor(s) are not FLUX.1 transformer weights this loader takes, e.g. "
                         f"{', '.join(left[:3])}; give the plain (bf16, fp16 or fp8) transformer file")
    return out


def _group_rows(place: _Place, present: dict[int, tuple[str, object]]) -> tuple[int, ...]:
    """Every part's output rows: a present part's from its layer, a missing one's from the table's widths times
    the block width, which is any present part's in_features (all parts of a fused module read the same input)."""
    some_layer = next(iter(present.values()))[1]
    width = int(some_layer.weight.shape[1])
    widths = place.module.widths or (1,)
    return tuple(int(present[k][1].weight.shape[0]) if k in present else widths[k] * width
                 for k in range(len(place.module.parts)))


def kohya_file_layout(index: dict, num_double: int, num_single: int) -> list[FusedName]:
    """How a kohya file (sd-scripts' BFL layout) groups the transformer modules of `index` (a module_index: kohya
    name -> (prefix, diffusers path, layer)): one FusedName per BFL module with at least one part in the index,
    named `lora_unet_<BFL path>` (`lora_unet_single_blocks_0_linear1`), its parts the internal (plain
    diffusers-path) kohya names in row order with each part's rows (linear1's are unequal: h, h, h, 4h). Text-encoder
    entries keep their names and are left out. A fused module whose index lacks some parts still lists all of them,
    the missing ones' rows from the table (_group_rows), so that the rows always add up to the file module's."""
    groups: dict[str, tuple[_Place, dict[int, tuple[str, object]]]] = {}
    for name, (prefix, path, layer) in index.items():
        if prefix != UNET_PREFIX:
            continue
        place, part = _lookup(path, num_double, num_single)
        groups.setdefault(place.bfl_path(), (place, {}))[1][part] = (name, layer)
    out = []
    for bfl, (place, present) in groups.items():
        parts = tuple(present[k][0] if k in present else kohya_name(UNET_PREFIX, place.diffusers_path(k))
                      for k in range(len(place.module.parts)))
        out.append(FusedName(kohya_name(UNET_PREFIX, bfl), parts, _group_rows(place, present), place.module.swap))
    return out


def _name_pattern(module: _Module, kind: _Kind | None) -> re.Pattern:
    """The kohya file name of a BFL module, with the block number as a group for block modules (built from the
    table's template; never by turning a name's '_' back into '.')."""
    if kind is None:
        return re.compile(re.escape(kohya_name(UNET_PREFIX, module.bfl)))
    head, tail = kohya_name(UNET_PREFIX, kind.bfl.format(i="#") + module.bfl).split("#")
    return re.compile(re.escape(head) + r"(\d+)" + re.escape(tail))


_NAME_PATTERNS = [(_name_pattern(m, kind), m, kind) for kind in (DOUBLE, SINGLE) for m in kind.modules if m.layer]
_NAME_PATTERNS += [(_name_pattern(m, None), m, None) for m in TOP if m.layer]


def _parse_file_name(name: str) -> _Place | None:
    """The place of a BFL-layout kohya name, or None for any other name."""
    for pattern, module, kind in _NAME_PATTERNS:
        m = pattern.fullmatch(name)
        if m:
            return _Place(module, kind, int(m.group(1)) if kind is not None else None)
    return None


def _file_rows(module: _Module, total: int | None) -> tuple[int, ...]:
    """A fused module's part rows read from its up's row count: the block width h is total / sum(widths)
    (qkv: 3h, linear1: 3h + 4h = 7h). Without the count, FLUX.1's real widths (h = 3072). () where the count does
    not divide (the reader then reports the mismatch) or for a one-part module."""
    if len(module.parts) == 1:
        return ()
    if total is None:
        return tuple(w * HIDDEN for w in module.widths)
    width, rest = divmod(int(total), sum(module.widths))
    return () if rest else tuple(w * width for w in module.widths)


def file_parts(names: Iterable[str], num_double: int | None = None, num_single: int | None = None,
               rows_of: dict[str, int] | None = None) -> list[FusedName]:
    """The reading side of kohya_file_layout, with no model at hand: for each BFL-layout lora_unet name of a file
    (`lora_unet_double_blocks_0_img_attn_qkv`), the FusedName whose parts are the internal kohya names in row
    order, swap_halves as when writing. Rows of fused modules (names alone cannot tell the width): from
    `rows_of` (file name -> its up's row count, up.shape[0]) by h = rows / sum(widths), linear1 being 7h; for a
    name rows_of lacks (or rows_of None), FLUX.1's real widths (3072 x 3, and 12288 for linear1's MLP part).
    Other names (text encoders, diffusers-layout `lora_unet_transformer_blocks_...`) are skipped, as are blocks
    past num_double / num_single (None: no bound)."""
    bounds = {DOUBLE: num_double, SINGLE: num_single}
    out, seen = [], set()
    for name in names:
        place = None if name in seen else _parse_file_name(name)
        seen.add(name)
        if place is None or (place.kind is not None and bounds[place.kind] is not None
                             and place.block >= bounds[place.kind]):
            continue
        parts = tuple(kohya_name(UNET_PREFIX, place.diffusers_path(k)) for k in range(len(place.module.parts)))
        rows = _file_rows(place.module, (rows_of or {}).get(name))
        out.append(FusedName(name, parts, rows, place.module.swap))
    return out
