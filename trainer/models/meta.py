"""A family's models built from configs on the meta device (no memory for weights): their module index gives the
kohya names and module paths of a standard model without loading one (key sets, name maps, export of a file)."""
from __future__ import annotations

import functools
from pathlib import Path

from .detect import adapter_family, family_of_folder, get_family


@functools.lru_cache(maxsize=8)
def meta_models(family_name: str, config_dir: str) -> tuple:
    """(denoiser, {kohya prefix: text encoder}) built from the configs in config_dir, on the meta device."""
    from .loading import empty_models
    models = empty_models(get_family(family_name).model_builders(Path(config_dir)))
    return models.pop("denoiser"), models


def meta_index(family_name: str, config_dir: str | Path | None = None) -> dict:
    """The module index (trainer.formats.module_index) of a family's model, from config_dir (default: the
    family's standard model)."""
    from trainer.formats.names import module_index
    family = get_family(family_name)
    denoiser, encoders = meta_models(family_name, str(config_dir or family.meta_config_dir()))
    return module_index(denoiser, encoders, lambda path: family.kohya_unet_path(path, denoiser.config))


def adapter_index(adapter) -> dict:
    """The index of the standard model of the family an adapter was made for (SD 1.x when nothing tells)."""
    family = adapter_family(adapter)
    return meta_index(family.name, family.meta_config_dir(set(adapter.layers), adapter.metadata))


def model_index(model_path: str) -> dict:
    """The index of the model at model_path ("" = the tiny one) from its config files only."""
    from .info import config_folder, resolve_model_path
    folder = config_folder(resolve_model_path(model_path))
    if folder is None or not any((folder / sub / "config.json").is_file() for sub in ("unet", "transformer")):
        raise FileNotFoundError(f"no diffusers configs found for {model_path}")
    return meta_index(family_of_folder(folder).name, folder)
