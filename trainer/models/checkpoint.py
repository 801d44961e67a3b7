"""Reading a single-file checkpoint (.safetensors, or a trusted pickle) into a flat state dict."""
from __future__ import annotations

import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .detect import PICKLE_SUFFIXES, SAFE_SUFFIXES
from .detect import not_a_checkpoint_message
from .errors import ModelLoadError, pickle_refused_message


def read_state_dict(path: Path, *, trust_pickle: bool) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint file, on the CPU, with any `state_dict` nesting removed."""
    suffix = path.suffix.lower()
    if suffix in SAFE_SUFFIXES:
        return _read_safetensors(path)
    if suffix in PICKLE_SUFFIXES:
        if not trust_pickle:
            raise ModelLoadError(pickle_refused_message(path))
        return _read_pickle(path)
    raise ModelLoadError(not_a_checkpoint_message(path))


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as err:
        raise ModelLoadError(f"{path} is not a readable .safetensors file ({err}); it is probably truncated or "
                             f"corrupt: download or copy it again") from err


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ModelLoadError(f"{path} holds objects other than tensors, so it cannot be read safely even with "
                             f"model.trust_pickle=true; convert it to .safetensors in an environment you trust") from err
    except (RuntimeError, EOFError, OSError) as err:
        raise ModelLoadError(f"{path} is not a readable checkpoint ({err}); it is probably truncated or corrupt: "
                             f"download or copy it again") from err
    # A1111/Lightning checkpoints keep the weights under "state_dict" (sometimes nested twice)
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ModelLoadError(f"{path} does not contain a state dict (found {type(obj).__name__}); give a "
                             f"Stable Diffusion checkpoint")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
