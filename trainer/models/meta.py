"""A family's models built from configs on the meta device (no memory for weights): their module index gives the
kohya names and module paths of a standard model without loading one (key sets, name maps, export of a file)."""
from __future__ import annotations

import functools
from pathlib import Path

from .detect import family_of_adapter, family_of_folder, get_family


@functools.lru_cache(maxsize=8)
def meta_models(family_name: str, config_dir: str) -> tuple:
    """(unet, {kohya prefix: text encoder}) built from the configs in config_dir, on the meta device."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from .loading import empty_models
    family = get_family(family_name)
    unet_config = UNet2DConditionModel.load_config(config_dir, subfolder="unet")
    builders = {"unet": lambda: UNet2DConditionModel.from_config(unet_config)}
    for spec in family.text_encoder_specs:
        cls = CLIPTextModelWithProjection if spec.component == "text_encoder_2" else CLIPTextModel
        config = CLIPTextConfig.from_pretrained(config_dir, subfolder=spec.component)
        builders[spec.prefix] = functools.partial(cls, config)
    models = empty_models(builders)
    return models.pop("unet"), models


def meta_index(family_name: str, config_dir: str | Path | None = None) -> dict:
    """The module index (trainer.formats.module_index) of a family's model, from config_dir (default: the
    family's standard model)."""
    from trainer.formats.names import module_index
    family = get_family(family_name)
    unet, encoders = meta_models(family_name, str(config_dir or family.meta_config_dir()))
    return module_index(unet, encoders, lambda path: family.kohya_unet_path(path, unet.config))


def adapter_index(adapter) -> dict:
    """The index of the standard model of the family an adapter was made for (SD 1.x when nothing tells)."""
    shapes = {name: tuple(layer.down.shape[:2]) for name, layer in adapter.layers.items()}
    family = family_of_adapter(adapter.layers, shapes, adapter.metadata) or get_family("sd1")
    return meta_index(family.name)


def model_index(model_path: str) -> dict:
    """The index of the model at model_path ("" = the tiny one) from its config files only."""
    from .info import config_folder, resolve_model_path
    folder = config_folder(resolve_model_path(model_path))
    if folder is None or not (folder / "unet" / "config.json").is_file():
        raise FileNotFoundError(f"no diffusers configs found for {model_path}")
    return meta_index(family_of_folder(folder).name, folder)
