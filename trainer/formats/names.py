"""kohya module names <-> diffusers/transformers module paths, and the index of adaptable modules of a model.

kohya names are `<prefix>_<module path with every '.' replaced by '_'>`, the path in the layout the family's files
use (diffusers' for SD 1.x/2.x, the original SGM layout for SDXL's UNet). The format fixes the text-encoder names to
the `text_model.` layout of older transformers (ComfyUI maps only that literal form), so paths of a flattened
transformers 5.x CLIPTextModel are normalised here.

'.' -> '_' cannot be undone by rewriting strings (module names hold '_' too), so names are read back through an
index built from a model's modules (`module_index`): exactly, or, for a model of the same classes with other block
counts, by the shape of the index's names with their numbers free (`resolve_paths`).
"""
from __future__ import annotations

import re
from typing import Callable

from torch import nn

from .layout import COMPONENTS

UNET_PREFIX = "lora_unet"
TEXT_ENCODER_PREFIXES = tuple(p for p in COMPONENTS if p != UNET_PREFIX)  # every family's (trainer/models owns them)
PREFIXES = (UNET_PREFIX, *TEXT_ENCODER_PREFIXES)

# roots of CLIPTextModel's inner CLIPTextTransformer, which transformers 5.x hoisted to the top level
# (`encoder.layers.`, not `encoder.`: T5's modules are `encoder.block.*` and keep their plain names, lora_te3_...)
_CLIP_TRANSFORMER_ROOTS = ("encoder.layers.", "embeddings.", "final_layer_norm")
_KOHYA_CLIP_ROOTS = tuple(r.replace(".", "_") for r in _CLIP_TRANSFORMER_ROOTS)
# peft's inner modules of a wrapped layer: never adaptable targets themselves
_PEFT_INNER = {"lora_A", "lora_B", "lora_dropout", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"}
def normalise_path(prefix: str, module_path: str) -> str:
    """The module path as the kohya format spells it: text-encoder paths always include `text_model.`."""
    if prefix in TEXT_ENCODER_PREFIXES and module_path.startswith(_CLIP_TRANSFORMER_ROOTS):
        return "text_model." + module_path
    return module_path


def kohya_name(prefix: str, module_path: str) -> str:
    """`kohya_name("lora_te", "encoder.layers.0.self_attn.q_proj")` -> `lora_te_text_model_encoder_layers_0_...`."""
    if prefix not in PREFIXES:
        raise ValueError(f"unknown kohya prefix {prefix!r}; expected one of {', '.join(PREFIXES)}")
    return f"{prefix}_{normalise_path(prefix, module_path).replace('.', '_')}"


def normalise_kohya_name(name: str) -> str:
    """Put back the `text_model_` that files converted under transformers 5.x lack (the format requires it)."""
    m = re.match(r"^(lora_te[12]?)_(.*)$", name)
    if m and m.group(2).startswith(_KOHYA_CLIP_ROOTS):
        return f"{m.group(1)}_text_model_{m.group(2)}"
    return name


def base_layer_path(module_path: str) -> str | None:
    """The adaptable layer a (possibly peft-wrapped) module path stands for, or None for peft's own modules."""
    parts = module_path.split(".")
    if any(p in _PEFT_INNER for p in parts):
        return None
    if parts[-1] == "base_layer":
        parts = parts[:-1]
    return ".".join(parts)


def module_index(unet: nn.Module | None, text_encoders: dict[str, nn.Module] | None = None,
                 unet_path: Callable[[str], str] | None = None) -> dict[str, tuple[str, str, nn.Module]]:
    """kohya name -> (prefix, module path, layer) for every nn.Linear / nn.Conv2d of the UNet and text encoders
    (`text_encoders` maps kohya prefix -> model, e.g. {"lora_te": text_encoder}). `unet_path` turns a UNet module
    path into the one kohya names (the family's: SDXL's original layout); the stored path stays diffusers'."""
    index = {}
    components = ([(UNET_PREFIX, unet)] if unet is not None else []) + list((text_encoders or {}).items())
    for prefix, model in components:
        for path, module in model.named_modules():
            if not isinstance(module, (nn.Linear, nn.Conv2d)):
                continue
            layer_path = base_layer_path(path)
            if layer_path:
                named = unet_path(layer_path) if unet_path and prefix == UNET_PREFIX else layer_path
                index[kohya_name(prefix, named)] = (prefix, layer_path, module)
    return index


def diffusers_aliases(index: dict) -> dict[str, str]:
    """kohya name in diffusers' own layout -> the index's name, where they differ (SDXL files that diffusers'
    kohya exporter wrote keep diffusers' UNet paths; kohya's trainer writes the original layout)."""
    out = {}
    for name, (prefix, path, _) in index.items():
        plain = kohya_name(prefix, path)
        if plain != name:
            out[plain] = name
    return out


def resolve_paths(names, index: dict) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """kohya name -> (prefix, diffusers module path) for each name, from `index`: exactly, else (where kohya's name
    is the module path itself) by a name of the index that differs only in its numbers; and the names found in
    neither way."""
    aliases = diffusers_aliases(index)
    found, unknown = {}, []
    templates = _templates(index)
    for name in names:
        entry = index.get(name) or index.get(aliases.get(name, ""))
        if entry is not None:
            found[name] = (entry[0], entry[1])
            continue
        match = next(((t, m) for t in templates if (m := t[0].fullmatch(name))), None)
        if match is None:
            unknown.append(name)
            continue
        (_, prefix, path_template), m = match
        found[name] = (prefix, path_template.format(*m.groups()))
    return found, unknown


def _templates(index: dict) -> list[tuple[re.Pattern, str, str]]:
    """(name pattern, prefix, path template) from the index's plain names (digits as groups), one per shape."""
    seen, out = set(), []
    for name, (prefix, path, _) in index.items():
        if kohya_name(prefix, path) != name:
            continue  # an original-layout UNet name: only exact matches map it back
        shape = re.sub(r"\d+", "#", name)
        if shape in seen:
            continue
        seen.add(shape)
        pattern = re.compile(r"(\d+)".join(map(re.escape, shape.split("#"))))
        out.append((pattern, prefix, re.sub(r"\d+", "{}", path)))
    return out
