"""Facts about the file layouts shared by the reader and the writer."""
from __future__ import annotations

import torch

from .errors import AdapterFormatError

DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}
FORMATS = ("kohya", "diffusers")
# diffusers keeps a peft LoraConfig per component in this safetensors metadata key (what save_lora_weights writes)
DIFFUSERS_CONFIG_KEY = "lora_adapter_metadata"


def _components() -> dict[str, str]:
    """kohya prefix -> the pipeline component name diffusers puts in front of module paths (the families' specs)."""
    from trainer.models.detect import all_families
    out = {"lora_unet": "unet"}
    for family in all_families():
        out.update({spec.prefix: spec.component for spec in family.text_encoder_specs})
    return out


def _denoiser_components() -> tuple[str, ...]:
    """The diffusers components a family's denoiser comes as (unet, transformer), all under kohya's lora_unet."""
    from trainer.models.detect import all_families
    return tuple(dict.fromkeys(family.denoiser_component for family in all_families()))


COMPONENTS = _components()
DENOISER_COMPONENTS = _denoiser_components()


def torch_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"unknown adapter dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def shape_problem(name: str, down: torch.Tensor | None, up: torch.Tensor | None) -> str | None:
    """Why a (down, up) pair cannot be a LoRA layer, or None if it can."""
    if down is None or up is None:
        have, lack = ("lora_up", "lora_down") if down is None else ("lora_down", "lora_up")
        return f"{name}: has {have} but no {lack}"
    if down.dim() not in (2, 4) or up.dim() != down.dim():
        return f"{name}: down {tuple(down.shape)} and up {tuple(up.shape)} are not a linear (2-d) or conv (4-d) pair"
    if up.shape[1] != down.shape[0]:
        return f"{name}: up {tuple(up.shape)} does not match down {tuple(down.shape)} (up.shape[1] must equal the " \
               f"rank down.shape[0])"
    if up.dim() == 4 and tuple(up.shape[2:]) != (1, 1):
        return f"{name}: conv up {tuple(up.shape)} must have a 1x1 kernel"
    return None


def check_metadata(metadata: dict, where: str) -> dict[str, str]:
    bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise AdapterFormatError(f"{where}: safetensors metadata must map strings to strings; convert the values of "
                                 f"{', '.join(map(repr, bad[:10]))} with str() or json.dumps()")
    return dict(metadata)
