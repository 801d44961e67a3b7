"""Read a peft-injected model back as an `Adapter` (plain fp32 CPU tensors keyed by kohya name)."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from trainer.lora_state import Adapter, LoraLayer

from .errors import AdapterFormatError
from .names import UNET_PREFIX, base_layer_path, kohya_name


def adapter_from_model(unet: nn.Module | None, text_encoders: dict[str, nn.Module] | None = None,
                       adapter_name: str = "default", unet_path: Callable[[str], str] | None = None) -> Adapter:
    """down = lora_A weight, up = lora_B weight, alpha such that alpha / r equals peft's scaling; keyed by kohya
    name (`unet_path`: the family's naming of UNet paths, as for module_index; BaseModel.injected_adapter())."""
    layers = {}
    components = ([(UNET_PREFIX, unet)] if unet is not None else []) + list((text_encoders or {}).items())
    for prefix, model in components:
        for path, module in model.named_modules():
            if _has_adapter(module, adapter_name):
                layer_path = base_layer_path(path)
                named = unet_path(layer_path) if unet_path and prefix == UNET_PREFIX else layer_path
                layers[kohya_name(prefix, named)] = _read_layer(module, adapter_name, prefix, path)
    return Adapter(layers=layers)


def _has_adapter(module: nn.Module, adapter_name: str) -> bool:
    lora_a = getattr(module, "lora_A", None)
    return isinstance(lora_a, nn.ModuleDict) and adapter_name in lora_a


def _read_layer(module: nn.Module, adapter_name: str, prefix: str, path: str) -> LoraLayer:
    where = f"{prefix} module {path}"
    if getattr(module, "use_dora", {}).get(adapter_name) or getattr(module, "lora_bias", {}).get(adapter_name):
        raise AdapterFormatError(f"{where} uses DoRA or a LoRA bias, which the kohya/diffusers LoRA formats cannot "
                                 f"hold; train without use_dora / lora_bias")
    r = module.r[adapter_name]
    alpha = float(module.lora_alpha[adapter_name])
    if getattr(module, "use_rslora", {}).get(adapter_name):
        alpha *= math.sqrt(r)  # rsLoRA scales by alpha/sqrt(r); store the alpha that gives that scale as alpha/r
    down = module.lora_A[adapter_name].weight.detach().to("cpu", dtype=torch.float32, copy=True)
    up = module.lora_B[adapter_name].weight.detach().to("cpu", dtype=torch.float32, copy=True)
    return LoraLayer(down=down, up=up, alpha=alpha)

