"""Which model family a diffusers folder, a single-file checkpoint or a LoRA belongs to. Torch-free: the families'
modules import torch only inside their functions, so the app can ask while it builds a form."""
from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

from .errors import ModelLoadError

# name -> (module, instance); the order is the order of detection (the most specific first)
FAMILIES = {"flux2": ("flux2", "FLUX2_FAMILY"), "flux": ("flux", "FLUX_FAMILY"), "sd3": ("sd3", "SD3_FAMILY"), "sdxl": ("sdxl", "SDXL_FAMILY"), "sd2": ("sd2", "SD2_FAMILY"),
            "sd1": ("sd1", "SD1_FAMILY")}


def get_family(name: str):
    """The Family object of a name in FAMILIES."""
    if name not in FAMILIES:
        raise ModelLoadError(f"unknown model family {name!r}; choose one of {', '.join(sorted(FAMILIES))} (or "
                             f"'auto' to read it from the model)")
    module, attr = FAMILIES[name]
    return getattr(importlib.import_module(f".{module}", __package__), attr)


DEFAULT_FAMILY = "sd1"  # what a model or adapter whose files tell nothing is taken to be (the most common base)


def default_family():
    return get_family(DEFAULT_FAMILY)


def adapter_family(adapter):
    """The family an Adapter was made for (family_of_adapter), the default family when nothing tells."""
    from trainer.lora_state import rank_and_width
    shapes = {name: rank_and_width(layer) for name, layer in adapter.layers.items()}
    return family_of_adapter(adapter.layers, shapes, adapter.metadata) or default_family()


def all_families() -> list:
    return [get_family(name) for name in FAMILIES]


# the file kinds a base model may come as: safetensors, or a pickle (read only with model.trust_pickle)
SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
CHECKPOINT_SUFFIXES = SAFE_SUFFIXES + PICKLE_SUFFIXES
COMPONENTS = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "scheduler")  # what the families
# load from a folder (SD3's text_encoder_3, T5, is optional: it may be left out)


def check_model_files(source: Path):
    """What loading the base model at `source` (a local folder or file) would refuse, found from its config files
    and a .safetensors header, without torch: raised as the ModelLoadError loading would raise. The family when its
    files tell it (None for a pickle, which is not opened before it is loaded). validate, the app's Check and train
    all ask this (trainer.job.model_problems), so none of them passes what loading then refuses."""
    if not source.exists():  # a hub id (config.validate names a local path that is missing)
        return None
    if source.is_dir():
        return check_folder(source)
    if source.suffix.lower() in PICKLE_SUFFIXES:
        return None
    if source.suffix.lower() not in SAFE_SUFFIXES:
        raise ModelLoadError(not_a_checkpoint_message(source))
    return family_of_checkpoint(dict.fromkeys(safetensors_keys(source)), source)


def check_folder(folder: Path):
    """The family of a diffusers folder whose model_index.json reads and whose components are all there."""
    if not (folder / "model_index.json").is_file():
        raise ModelLoadError(not_a_model_folder_message(folder))
    family = family_of_folder(folder)
    family.refuse_folder(folder)
    index = read_json(folder / "model_index.json")
    for name in COMPONENTS:
        named = isinstance(index.get(name), list) and None not in index[name]  # [library, class]; null = absent
        if named and not (folder / name).is_dir():
            raise ModelLoadError(f"{folder / name} is missing; a {family.label} folder needs every component "
                                 f"folder its model_index.json names: copy the complete model folder")
    return family


def family_of_folder(folder: Path):
    """The family of a diffusers folder, from model_index.json and the UNet config."""
    index = read_json(folder / "model_index.json")
    if not isinstance(index, dict):
        raise ModelLoadError(f"{folder / 'model_index.json'} is not a diffusers model index (no JSON object); "
                             f"restore it from the model's original files")
    name = str(index.get("_class_name", ""))
    if not name.startswith(("StableDiffusion", "Flux")):
        raise ModelLoadError(f"{folder} holds {'a ' + name if name else 'a model of unknown kind'}, not a Stable "
                             f"Diffusion or FLUX model; give a Stable Diffusion 1.x, 2.x, SDXL, 3.x or FLUX.1 model "
                             f"folder or checkpoint")
    if "unet" not in index and "transformer" not in index:
        raise ModelLoadError(f"{folder / 'model_index.json'} names no UNet or transformer, so {folder} is not a "
                             f"complete {name} folder; copy the complete model folder again")
    unet_config = folder / "unet" / "config.json"
    config = read_json(unet_config) if unet_config.is_file() else {}
    return next(f for f in all_families() if f.claims_folder(index, config))


def safetensors_keys(path: Path) -> list[str]:
    """The tensor names in a .safetensors file's header (8 bytes of length, then JSON), checked against the file's
    size, so random bytes or a truncated download are found without reading the weights."""
    return list(safetensors_shapes(path))


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Each tensor's shape from a .safetensors file's header (safetensors_keys' check), without the weights."""
    try:
        with open(path, "rb") as f:
            size, head = os.fstat(f.fileno()).st_size, f.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else 0
            if not 0 < length <= min(size - 8, 100 << 20):
                raise ValueError("its header length is impossible")
            header = json.loads(f.read(length))
        ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
        if 8 + length + max(ends, default=0) > size:
            raise ValueError("it is shorter than its header says")
        shapes = {key: list(entry["shape"]) for key, entry in header.items() if key != "__metadata__"}
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
        raise ModelLoadError(f"{path} is not a readable .safetensors file ({err}); it is probably truncated or "
                             f"corrupt: download or copy it again") from err
    return shapes


def not_a_checkpoint_message(path: Path) -> str:
    return (f"{path} is not a model checkpoint loradesk can read (expected .safetensors, or "
            f"{'/'.join(PICKLE_SUFFIXES)} with model.trust_pickle=true); give a .safetensors file or a diffusers "
            f"folder")


def not_a_model_folder_message(folder: Path) -> str:
    try:
        files = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in CHECKPOINT_SUFFIXES)
    except OSError:
        files = []
    hint = f"; it contains {', '.join(files[:3])}: give that file as model.path" if files else ""
    return (f"{folder} is not a diffusers model folder (no model_index.json); give the folder that contains "
            f"model_index.json, or a single .safetensors checkpoint{hint}")


def family_of_checkpoint(state_dict: dict, path: Path):
    """The family of a single-file checkpoint in the original (CompVis/SGM) key layout."""
    keys = set(state_dict)
    for family in all_families():
        if family.claims_checkpoint(keys):
            return family
    has_unet = any(k.startswith("model.diffusion_model.") for k in keys)
    raise ModelLoadError(f"{path} is not a full Stable Diffusion checkpoint: {_what_it_is(sorted(keys), has_unet)}")


def family_of_adapter(names, shapes: dict[str, tuple], metadata: dict | None = None):
    """The family a LoRA was made for: the first (in FAMILIES' order, the most specific first) that claims its
    sd-scripts metadata, else its kohya names (Family.claims_adapter), else by the widths of its text layers (768 for
    SD 1.x's CLIP, 1024 for SD 2.x's OpenCLIP, 2048 for SDXL's joined conditioning in a diffusers-named file);
    None when nothing tells (a LoRA of a small custom model)."""
    metadata, names = metadata or {}, set(names)
    families = all_families()
    for family in families:
        if family.claims_metadata(metadata):
            return family
    for family in families:
        if family.claims_adapter(names):
            return family
    widths = {shape[1] for name, shape in shapes.items() if name.endswith(("attn2_to_k", "self_attn_q_proj"))}
    for width, name in ((2048, "sdxl"), (1024, "sd2"), (768, "sd1")):
        if width in widths:
            return get_family(name)
    return None


def text_encoder_prefixes(components: set[str] | dict[str, str]) -> dict[str, str]:
    """diffusers component -> kohya prefix for a file whose text-encoder components are `components` (text_encoder
    alone: lora_te; with text_encoder_2: SDXL's lora_te1 and lora_te2, or FLUX's CLIP-L and T5 as lora_te1 and
    lora_te3): the family with the fewest encoders that has them all, of the kind each is (component -> "clip" or
    "t5", from its module paths, when given as a dict)."""
    # a plain set: CLIP encoders (what files written before a family had T5 hold)
    kinds = components if isinstance(components, dict) else dict.fromkeys(components, "clip")
    families = sorted(all_families(), key=lambda f: len(f.text_encoder_specs))
    for family in families:
        specs = {spec.component: spec for spec in family.text_encoder_specs}
        if any(s.kind not in ("clip", "t5") for s in specs.values()):
            continue  # (FLUX.2 klein's Qwen3: its files are told by their denoiser names and metadata first)
        if set(components) <= set(specs) and all(specs[c].kind == k for c, k in kinds.items()):
            return {c: spec.prefix for c, spec in specs.items()}
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
