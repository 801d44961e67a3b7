"""Which model family a diffusers folder or a single-file checkpoint holds, read from its configs or its keys."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import ModelLoadError

NOT_YET = {
    "sdxl": "SDXL {kind}s are not supported yet; loradesk trains Stable Diffusion 1.x models for now. "
            "Choose an SD 1.x (e.g. SD1.5-based) model",
    "sd2": "Stable Diffusion 2.x {kind}s are not supported yet; loradesk trains Stable Diffusion 1.x models for "
           "now. Choose an SD 1.x (e.g. SD1.5-based) model",
}


def unsupported(family: str, path: Path | str, kind: str) -> ModelLoadError:
    return ModelLoadError(f"{path}: " + NOT_YET[family].format(kind=kind))


def family_of_folder(folder: Path) -> str:
    """'sd1', 'sd2' or 'sdxl' from model_index.json (and the UNet config, which tells SD2 from SD1)."""
    index = read_json(folder / "model_index.json")
    name = str(index.get("_class_name", ""))
    if "XL" in name:
        return "sdxl"
    if not name.startswith("StableDiffusion") or "unet" not in index:
        raise ModelLoadError(f"{folder} holds a {name or 'unknown'} model, not a Stable Diffusion pipeline; give "
                             f"a Stable Diffusion 1.x model folder or checkpoint")
    unet_config = folder / "unet" / "config.json"
    cross_dim = read_json(unet_config).get("cross_attention_dim") if unet_config.is_file() else None
    return "sd2" if cross_dim == 1024 else "sd1"


def family_of_checkpoint(state_dict: dict, path: Path) -> str:
    """'sd1', 'sd2' or 'sdxl' from the original (CompVis/SGM) key layout of a single-file checkpoint."""
    keys = list(state_dict)
    if any(k.startswith("conditioner.embedders.") for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in keys):  # OpenCLIP text encoder
        return "sd2"
    has_unet = any(k.startswith("model.diffusion_model.") for k in keys)
    if has_unet and any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1"
    raise ModelLoadError(f"{path} is not a full Stable Diffusion checkpoint: {_what_it_is(keys, has_unet)}")


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
