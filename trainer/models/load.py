"""Loading a base model: a diffusers folder, a single-file checkpoint (offline, with local configs) or a hub id.

`load_base_model(path)` finds out what `path` is, detects the model family (model_index.json, or the
checkpoint's keys), lets the family (sd1.py, sd2.py, sdxl.py) load the components, then freezes them and moves them
to the device. `""` means the tiny built-in model.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .base import BaseModel
from .checkpoint import read_state_dict
from .detect import FAMILIES, check_folder, family_of_checkpoint, get_family
from .errors import ModelLoadError
from .hub import fetch_hub_model, looks_like_hub_id
from .info import original_yaml_prediction, resolve_model_path, sidecar_config_dir

__all__ = ["SUPPORTED_FAMILIES", "load_base_model"]

SUPPORTED_FAMILIES = tuple(FAMILIES)

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def load_base_model(path: str = "", *, family: str = "auto", trust_pickle: bool = False,
                    dtype: torch.dtype | str = torch.float32, device: torch.device | str = "cpu",
                    config_dir: str | Path | None = None, options: dict | None = None,
                    vae_dtype: torch.dtype | str | None = None) -> BaseModel:
    """Load a frozen base model.

    path: a diffusers folder (model_index.json), a single-file checkpoint in the original layout (.safetensors;
    .ckpt/.pt/.pth/.bin only with trust_pickle=True), a hub id (needs network) or "" (the tiny built-in model).
    config_dir: diffusers configs for a single file that is not standard-size (else a '<stem>' or '<stem>.config'
    folder beside the file is used, else the family's shipped configs).
    options: the family's model options (config.model_options: SD3's T5 length and separate component files).
    dtype: the denoiser's and the text encoders' weights, read in that precision (a bf16 FLUX.1 transformer never
    exists in fp32: 24 GB less CPU memory); vae_dtype: the VAE's (default: dtype).
    """
    options = dict(options or {})
    dtype, device = _check_dtype(dtype), _check_device(device)
    # the loaders' options: the family's, and the VAE's dtype (loading.vae_dtype reads it)
    loader = {**options, "vae_dtype": _check_dtype(vae_dtype) if vae_dtype is not None else None}
    source = resolve_model_path(path)
    local = Path(source)
    if local.is_dir():
        detected, parts = _load_folder(local, family, dtype, trust_pickle, loader)
    elif local.is_file():
        detected, parts = _load_single_file(local, family, dtype, trust_pickle, config_dir, loader)
    elif looks_like_hub_id(source):
        detected, parts = _load_folder(fetch_hub_model(source), family, dtype, trust_pickle, loader, shown=source)
    else:
        raise ModelLoadError(_missing_message(source, path))
    base = BaseModel(family=detected, source=source, options=options, **parts)
    _freeze(base)
    return _to_device(base, device)


def _load_folder(folder: Path, family: str, dtype, trust_pickle: bool, options: dict, shown: str | None = None):
    detected = _agree(check_folder(folder), family, shown or folder, "model")  # the check validate makes too
    return detected, detected.load_folder(folder, dtype=dtype, trust_pickle=trust_pickle, options=options)


def _load_single_file(file: Path, family: str, dtype, trust_pickle: bool, config_dir, options: dict):
    state_dict = read_state_dict(file, trust_pickle=trust_pickle)
    detected = _agree(family_of_checkpoint(state_dict, file), family, file, "checkpoint")
    configs = _sidecar_configs(file, config_dir)
    parts = detected.load_single_file(state_dict, source=file, config_dir=configs, dtype=dtype,
                                      prediction=original_yaml_prediction(file), options=options)
    return detected, parts


def _agree(detected, requested: str, where, kind: str):
    """The detected family, refused when model.family names another one (the structure decides)."""
    if requested not in ("auto", detected.name):
        forced = get_family(requested)  # an unknown name gets the list of families
        raise ModelLoadError(f"{where} is a {detected.label} {kind} ({detected.name}), but model.family is "
                             f"{requested!r} ({forced.label}); set model.family=auto (or {detected.name})")
    return detected


def _sidecar_configs(file: Path, config_dir) -> Path | None:
    """Configs for a checkpoint: config_dir, else '<stem>/' or '<stem>.config/' beside it, else None (defaults)."""
    if config_dir is not None:
        folder = Path(config_dir).expanduser()
        if not (folder / "model_index.json").is_file():
            raise ModelLoadError(f"config_dir {folder} has no model_index.json; give a diffusers model folder "
                                 f"(weights not needed) that describes {file.name}")
        return folder
    return sidecar_config_dir(file)


def _freeze(base: BaseModel) -> None:
    """Base weights never train (LoRA adds its own parameters); eval mode until the loop says otherwise."""
    for module in base.components:
        module.requires_grad_(False)
        module.eval()


def _to_device(base: BaseModel, device: torch.device) -> BaseModel:
    if device.type != "cpu":
        for module in base.components:
            module.to(device)
    return base


def _check_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise ModelLoadError(f"unsupported dtype {dtype!r}; use one of fp32, fp16, bf16")


def _check_device(device) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ModelLoadError(f"unknown device {device!r}; use 'cpu' or 'cuda'") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {str(device)!r} was requested but this PyTorch ({torch.__version__}) sees no "
                             f"CUDA GPU; use device 'cpu', or install a CUDA build of PyTorch and a GPU driver")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ModelLoadError(f"device {str(device)!r} does not exist; this machine has "
                             f"{torch.cuda.device_count()} CUDA GPU(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError("device 'mps' was requested but Apple's MPS backend is not available; use 'cpu'")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ModelLoadError(f"device {str(device)!r} is not supported; use 'cpu' or 'cuda'")
    return device


def _missing_message(source: str, given: str) -> str:
    if not str(given).strip():
        return (f"the built-in tiny model is missing at {source}; reinstall loradesk (or rebuild it with "
                f"tools/build_tiny_base.py)")
    return (f"model.path {source} does not exist; give a diffusers folder (with model_index.json), a "
            f".safetensors checkpoint, or a hub id like 'owner/name' (needs network); empty means the built-in "
            f"tiny model")
