"""Which model family a diffusers folder, a single-file checkpoint or a LoRA belongs to. Torch-free: the families'
modules import torch only inside their functions, so the app can ask while it builds a form."""
from __future__ import annotations

import importlib
import json
from pathlib import Path

from .errors import ModelLoadError

# name -> (module, instance); the order is the order of detection (the most specific first)
FAMILIES = {"sdxl": ("sdxl", "SDXL_FAMILY"), "sd2": ("sd2", "SD2_FAMILY"), "sd1": ("sd1", "SD1_FAMILY")}


def get_family(name: str):
    """The Family object of a name in FAMILIES."""
    if name not in FAMILIES:
        raise ModelLoadError(f"unknown model family {name!r}; choose one of {', '.join(sorted(FAMILIES))} (or "
                             f"'auto' to read it from the model)")
    module, attr = FAMILIES[name]
    return getattr(importlib.import_module(f".{module}", __package__), attr)


def all_families() -> list:
    return [get_family(name) for name in FAMILIES]


def family_of_folder(folder: Path):
    """The family of a diffusers folder, from model_index.json and the UNet config."""
    index = read_json(folder / "model_index.json")
    name = str(index.get("_class_name", ""))
    if not name.startswith("StableDiffusion") or "unet" not in index:
        raise ModelLoadError(f"{folder} holds a {name or 'unknown'} model, not a Stable Diffusion pipeline; give "
                             f"a Stable Diffusion 1.x, 2.x or SDXL model folder or checkpoint")
    unet_config = folder / "unet" / "config.json"
    config = read_json(unet_config) if unet_config.is_file() else {}
    return next(f for f in all_families() if f.claims_folder(index, config))


def family_of_checkpoint(state_dict: dict, path: Path):
    """The family of a single-file checkpoint in the original (CompVis/SGM) key layout."""
    keys = set(state_dict)
    for family in all_families():
        if family.claims_checkpoint(keys):
            return family
    has_unet = any(k.startswith("model.diffusion_model.") for k in keys)
    raise ModelLoadError(f"{path} is not a full Stable Diffusion checkpoint: {_what_it_is(sorted(keys), has_unet)}")


def family_of_adapter(names, shapes: dict[str, tuple], metadata: dict | None = None):
    """The family a LoRA was made for, from sd-scripts' metadata, else its kohya names (SDXL's two text encoders
    and SGM UNet names) and the widths of its text layers (768 for SD 1.x's CLIP, 1024 for SD 2.x's OpenCLIP);
    None when nothing tells (a LoRA of a small custom model)."""
    version = (metadata or {}).get("ss_base_model_version", "")
    for prefix, name in (("sdxl", "sdxl"), ("sd_v2", "sd2"), ("sd_v1", "sd1")):
        if version.startswith(prefix):
            return get_family(name)
    names = set(names)
    if any(n.startswith(("lora_te1_", "lora_te2_", "lora_unet_input_blocks", "lora_unet_middle_block",
                         "lora_unet_output_blocks")) for n in names):
        return get_family("sdxl")
    widths = {shape[1] for name, shape in shapes.items() if name.endswith(("attn2_to_k", "self_attn_q_proj"))}
    if widths & {2048}:  # SDXL's joined text conditioning (768 + 1280), in a diffusers-named file
        return get_family("sdxl")
    if widths & {1024}:
        return get_family("sd2")
    if widths & {768}:
        return get_family("sd1")
    return None


def text_encoder_prefixes(components: set[str]) -> dict[str, str]:
    """diffusers component -> kohya prefix for a file whose text-encoder components are `components` (text_encoder
    alone: lora_te; with text_encoder_2: SDXL's lora_te1 and lora_te2): the family with the fewest encoders that
    has them all."""
    families = sorted(all_families(), key=lambda f: len(f.text_encoder_specs))
    for family in families:
        specs = {spec.component: spec.prefix for spec in family.text_encoder_specs}
        if components <= set(specs):
            return specs
    return {spec.component: spec.prefix for spec in families[-1].text_encoder_specs}


def _what_it_is(keys: list[str], has_unet: bool) -> str:
    if any(k.startswith(("lora_unet_", "lora_te")) or ".lora_" in k for k in keys):
        return "it is a LoRA adapter, not a base model; give the base model it was trained on"
    if has_unet:
        return "it holds a UNet but no text encoder; give a checkpoint with UNet, VAE and text encoder"
    if any(k.startswith(("down_blocks.", "unet.", "text_model.")) for k in keys):
        return ("it is one component in diffusers layout; give the diffusers folder that contains "
                "model_index.json")
    sample = ", ".join(keys[:3]) or "no tensors"
    return f"its keys ({sample}, ...) are not in the Stable Diffusion layout"


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{path} could not be read as JSON ({err}); restore it from the model's "
                             f"original files") from err
