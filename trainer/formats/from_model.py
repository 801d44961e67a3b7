"""Read a peft-injected model back as an `Adapter` (plain fp32 CPU tensors keyed by kohya name).

Each peft tuner becomes the layer type whose delta() / applied(W0) is what its forward adds: LoRA and LoCon (with
DoRA's magnitude) a LoraLayer, LoHa a LohaLayer, LoKr a LokrLayer, with alpha such that the layer's scale equals
peft's scaling.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from trainer.lora_state import Adapter, LohaLayer, LokrLayer, LoraLayer, axis_shape

from trainer.network import DORA_MAGNITUDE

from .errors import AdapterFormatError
from .names import UNET_PREFIX, base_layer_path, kohya_name

# the peft attribute (a ModuleDict or ParameterDict keyed by adapter name) that every layer of a tuner has
_MARKERS = {"lora": ("lora_A",), "loha": ("hada_w1_a",), "lokr": ("lokr_w1", "lokr_w1_a")}


def adapter_from_model(unet: nn.Module | None, text_encoders: dict[str, nn.Module] | None = None,
                       adapter_name: str = "default", unet_path: Callable[[str], str] | None = None) -> Adapter:
    """The injected adapter keyed by kohya name (`unet_path`: the family's naming of UNet paths, as for
    module_index; BaseModel.injected_adapter())."""
    layers = {}
    components = ([(UNET_PREFIX, unet)] if unet is not None else []) + list((text_encoders or {}).items())
    for prefix, model in components:
        for path, module in model.named_modules():
            kind = _kind(module, adapter_name)
            if kind:
                layer_path = base_layer_path(path)
                named = unet_path(layer_path) if unet_path and prefix == UNET_PREFIX else layer_path
                where = f"{prefix} module {path}"
                layers[kohya_name(prefix, named)] = _READERS[kind](module, adapter_name, where)
    return Adapter(layers=layers)


def _kind(module: nn.Module, adapter_name: str) -> str | None:
    for kind, attributes in _MARKERS.items():
        for attribute in attributes:
            held = getattr(module, attribute, None)
            if isinstance(held, (nn.ModuleDict, nn.ParameterDict)) and adapter_name in held:
                return kind
    return None


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", dtype=torch.float32, copy=True)


def _base_weight(module: nn.Module) -> torch.Tensor:
    return module.get_base_layer().weight


def _read_lora(module: nn.Module, adapter_name: str, where: str) -> LoraLayer:
    """down = lora_A weight, up = lora_B weight, alpha such that alpha / r equals peft's scaling; DoRA's magnitude
    as dora_scale per output row."""
    if getattr(module, "lora_bias", {}).get(adapter_name):
        raise AdapterFormatError(f"{where} uses a LoRA bias, which the kohya/diffusers LoRA formats cannot hold; "
                                 f"train without lora_bias")
    r = module.r[adapter_name]
    alpha = float(module.lora_alpha[adapter_name])
    if getattr(module, "use_rslora", {}).get(adapter_name):
        alpha *= math.sqrt(r)  # rsLoRA scales by alpha/sqrt(r); store the alpha that gives that scale as alpha/r
    dora_scale = _own_magnitude(module, adapter_name)
    if getattr(module, "use_dora", {}).get(adapter_name):
        # peft keeps it as [out] for a Linear and [1, out, 1, 1] for a conv (peft/tuners/lora/dora.py
        # get_weight_norm, both per output row)
        dora_scale = _per_row(module, module.lora_magnitude_vector[adapter_name].weight)
    return LoraLayer(down=_cpu(module.lora_A[adapter_name].weight), up=_cpu(module.lora_B[adapter_name].weight),
                     alpha=alpha, dora_scale=dora_scale)


def _params(module: nn.Module, adapter_name: str, names: tuple[str, ...]) -> dict[str, torch.Tensor | None]:
    out = {}
    for name in names:
        held = getattr(module, name)
        out[name] = _cpu(held[adapter_name]) if adapter_name in held else None
    return out


def _read_loha(module: nn.Module, adapter_name: str, where: str) -> LohaLayer:
    """peft's hada_* as LyCORIS's (peft/tuners/loha/layer.py create_adapter_parameters: the same shapes, the
    Tucker factors [r, out] / [r, in] as LyCORIS's use_tucker); scale alpha / r (update_layer)."""
    p = _params(module, adapter_name, ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"))
    return LohaLayer(w1a=p["hada_w1_a"], w1b=p["hada_w1_b"], w2a=p["hada_w2_a"], w2b=p["hada_w2_b"],
                     t1=p["hada_t1"], t2=p["hada_t2"], alpha=float(module.alpha[adapter_name]),
                     dora_scale=_own_magnitude(module, adapter_name), shape=tuple(_base_weight(module).shape))


def _read_lokr(module: nn.Module, adapter_name: str, where: str) -> LokrLayer:
    """peft's lokr_* as LyCORIS's. peft scales by alpha / r even when w1 and w2 are both full matrices
    (peft 0.21 tuners/lokr/layer.py line 189), where LyCORIS's scale is 1 (lycoris 4.1.3 modules/lokr.py lines
    210-212: alpha = lora_dim when use_w1 and use_w2): there the scale is folded into w1, so every reader computes
    peft's delta."""
    p = _params(module, adapter_name, ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b",
                                       "lokr_t2"))
    r, alpha, scaling = module.r[adapter_name], float(module.alpha[adapter_name]), module.scaling[adapter_name]
    if p["lokr_w1"] is not None and p["lokr_w2"] is not None:
        p["lokr_w1"] = p["lokr_w1"] * scaling
        alpha = float(r)
    return LokrLayer(w1=p["lokr_w1"], w1a=p["lokr_w1_a"], w1b=p["lokr_w1_b"], w2=p["lokr_w2"], w2a=p["lokr_w2_a"],
                     w2b=p["lokr_w2_b"], t2=p["lokr_t2"], alpha=alpha,
                     dora_scale=_own_magnitude(module, adapter_name), shape=tuple(_base_weight(module).shape))


def _own_magnitude(module: nn.Module, adapter_name: str) -> torch.Tensor | None:
    """The DoRA magnitude trainer.network adds where peft has none (LoHa, LoKr, the input axis), kept in
    dora_scale's shape already: [out, 1, ...] or [1, in, ...]."""
    held = getattr(module, DORA_MAGNITUDE, None)
    return _cpu(held[adapter_name]) if held is not None and adapter_name in held else None


def _per_row(module: nn.Module, magnitude: torch.Tensor) -> torch.Tensor:
    """A magnitude per output row as LyCORIS's dora_scale: [out, 1, ...] (LyCORIS modules/locon.py lines 119-126,
    wd_on_out), which lora_state.applied reads as the output axis."""
    weight = _base_weight(module)
    return _cpu(magnitude).reshape(axis_shape(weight.shape[0], weight.dim(), "out"))


_READERS = {"lora": _read_lora, "loha": _read_loha, "lokr": _read_lokr}
