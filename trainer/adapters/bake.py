"""Bake adapters into a base model and save it as a diffusers folder or as one original-layout .safetensors file."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from trainer.atomic import atomic_dir, atomic_path
from trainer.lora_state import Adapter

from trainer.formats import load_adapter
from trainer.models import load_base_model
from .blend import FusedBlender

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def bake(model_path: str, pairs: list[tuple[Adapter | str | Path, float]], out: str | Path,
         dtype: str | None = None) -> Path:
    """Load the base model, fuse the weighted adapters into it and save it to `out`.

    `out` ending in .safetensors: one file in the original single-file layout (A1111, ComfyUI; default fp16);
    otherwise a diffusers folder (default: the model's own dtype).
    """
    out = Path(out)
    base = load_base_model(model_path)
    fuse_into(base, pairs)
    if out.suffix.lower() == ".safetensors":
        return save_single_file(base, out, dtype or "fp16", _baked_metadata(model_path, pairs))
    return save_diffusers(base, out, dtype)


def fuse_into(base, pairs: list[tuple[Adapter | str | Path, float]]) -> None:
    """Fuse the adapters into base's weights for good (the blender's pristine copies are dropped)."""
    blender = FusedBlender.of(base)
    for label, (adapter, weight) in zip(adapter_labels([a for a, _ in pairs]), pairs):
        blender.add(label, _as_adapter(adapter), weight)


def adapter_labels(adapters: list[Adapter | str | Path]) -> list[str]:
    """Names for error messages: a file's name, or 'in-memory adapter <n>'; a repeated name gets its position."""
    labels = [Path(a).name if not isinstance(a, Adapter) else f"in-memory adapter {i + 1}"
              for i, a in enumerate(adapters)]
    return [label if labels.count(label) == 1 else f"{label} (#{i + 1})" for i, label in enumerate(labels)]


def save_single_file(base, path: str | Path, dtype: str = "fp16", metadata: dict | None = None) -> Path:
    """UNet + VAE + text encoders as one original-layout .safetensors (the family's layout), written atomically."""
    from safetensors.torch import save_file
    path = Path(path)
    cast = _dtype(dtype)
    state = base.family.original_checkpoint(base)
    tensors = _unshared({k: v.detach().to("cpu", cast).contiguous() for k, v in state.items()})
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", **(metadata or {})})
    return path


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each name its own storage: safetensors refuses tensors that share memory, and a layout may hold one weight
    under two names (SD3's T5 embedding, tied in the model, is `shared` and `encoder.embed_tokens` in the file)."""
    seen: set[int] = set()
    out = {}
    for key, tensor in tensors.items():
        ptr = tensor.untyped_storage().data_ptr()
        out[key] = tensor.clone() if ptr in seen else tensor
        seen.add(ptr)
    return out


def save_diffusers(base, folder: str | Path, dtype: str | None = None) -> Path:
    """`StableDiffusionPipeline.save_pretrained` (safetensors) into a temporary folder, then swapped in.

    A given dtype casts base's modules in place (bake owns the model it loaded).
    """
    folder = Path(folder)
    if is_foreign_folder(folder):
        raise FileExistsError(f"{folder} exists and is not a diffusers model folder; choose a new output path")
    pipe = base.pipeline()
    if dtype:
        pipe.to(dtype=_dtype(dtype))
    with atomic_dir(folder) as tmp:  # a crash leaves the old model or the new one, never half
        pipe.save_pretrained(tmp, safe_serialization=True)
    return folder


def is_foreign_folder(folder: str | Path) -> bool:
    """A non-empty folder that is not a diffusers model: baking into it would replace the user's files."""
    folder = Path(folder)
    return folder.is_dir() and any(folder.iterdir()) and not (folder / "model_index.json").is_file()


def _as_adapter(adapter: Adapter | str | Path) -> Adapter:
    return adapter if isinstance(adapter, Adapter) else load_adapter(adapter)


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _baked_metadata(model_path: str, pairs) -> dict[str, str]:
    sources = [{"adapter": str(a) if not isinstance(a, Adapter) else "(in memory)", "weight": float(w)}
               for a, w in pairs]
    return {"loradesk.base_model": model_path or "tiny built-in", "loradesk.baked_adapters": json.dumps(sources)}
