"""kohya module names <-> diffusers/transformers module paths, and the index of adaptable modules of a model.

kohya names are `<prefix>_<module path with every '.' replaced by '_'>`. The format fixes the text-encoder names to
the `text_model.` layout of older transformers (ComfyUI maps only that literal form), so paths of a flattened
transformers 5.x CLIPTextModel are normalised here.
"""
from __future__ import annotations

import re

from torch import nn

UNET_PREFIX = "lora_unet"
TEXT_ENCODER_PREFIXES = ("lora_te", "lora_te1", "lora_te2")
PREFIXES = (UNET_PREFIX, *TEXT_ENCODER_PREFIXES)

# roots of CLIPTextModel's inner CLIPTextTransformer, which transformers 5.x hoisted to the top level
_CLIP_TRANSFORMER_ROOTS = ("encoder.", "embeddings.", "final_layer_norm")
_KOHYA_CLIP_ROOTS = tuple(r.replace(".", "_") for r in _CLIP_TRANSFORMER_ROOTS)
# peft's inner modules of a wrapped layer: never adaptable targets themselves
_PEFT_INNER = {"lora_A", "lora_B", "lora_dropout", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"}
# module-name words that contain '_' in diffusers' UNet and transformers' CLIP; used to undo kohya's '.'->'_'
_COMPOUND_WORDS = sorted(
    ["down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out", "proj_in",
     "proj_out", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out", "conv_norm_out", "time_embedding",
     "linear_1", "linear_2", "add_embedding", "class_embedding", "add_k_proj", "add_v_proj", "text_model",
     "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "text_projection", "final_layer_norm", "layer_norm1",
     "layer_norm2", "token_embedding", "position_embedding"],
    key=lambda w: -w.count("_"))


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


def split_kohya_name(name: str) -> tuple[str, str]:
    """`lora_unet_down_blocks_0_..._to_q` -> ("lora_unet", "down_blocks.0....to_q") without needing the model.

    kohya's '.'->'_' is lossy, so the path is rebuilt from the words that diffusers/transformers module names use;
    with a model at hand prefer `module_index`, which is exact.
    """
    prefix = next((p for p in sorted(PREFIXES, key=len, reverse=True) if name.startswith(p + "_")), None)
    if prefix is None:
        raise ValueError(f"{name!r} is not a kohya module name (expected a prefix among {', '.join(PREFIXES)})")
    parts, words, i = name[len(prefix) + 1:].split("_"), [], 0
    while i < len(parts):
        for word in _COMPOUND_WORDS + [parts[i]]:
            n = word.count("_") + 1
            if "_".join(parts[i:i + n]) == word:
                words.append(word)
                i += n
                break
    return prefix, ".".join(words)


def base_layer_path(module_path: str) -> str | None:
    """The adaptable layer a (possibly peft-wrapped) module path stands for, or None for peft's own modules."""
    parts = module_path.split(".")
    if any(p in _PEFT_INNER for p in parts):
        return None
    if parts[-1] == "base_layer":
        parts = parts[:-1]
    return ".".join(parts)


def module_index(unet: nn.Module | None, text_encoders: dict[str, nn.Module] | None = None
                 ) -> dict[str, tuple[str, str, nn.Module]]:
    """kohya name -> (prefix, module path, layer) for every nn.Linear / nn.Conv2d of the UNet and text encoders
    (`text_encoders` maps kohya prefix -> model, e.g. {"lora_te": text_encoder})."""
    index = {}
    components = ([(UNET_PREFIX, unet)] if unet is not None else []) + list((text_encoders or {}).items())
    for prefix, model in components:
        for path, module in model.named_modules():
            if not isinstance(module, (nn.Linear, nn.Conv2d)):
                continue
            layer_path = base_layer_path(path)
            if layer_path:
                index[kohya_name(prefix, layer_path)] = (prefix, layer_path, module)
    return index
