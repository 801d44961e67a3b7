"""What adapter layers change in a weight, for every layer type (LoRA, LoCon, LoHa, LoKr, DoRA on any): the one rule
the Generate tab's fused blend, bake, blend to file and resize share.

An additive layer at weight w changes W by w * delta. DoRA is not additive (W' = m (W0 + delta) / ||W0 + delta||
depends on W0), so its change at weight w is applied(W0, w) - W0 (lora_state.applied, ComfyUI's strength rule),
which needs the base weight W0. Several layers on one weight: their changes add, each computed on W0 alone:

    W = W0 + sum_i change_i,   change_i = w_i delta_i (additive)  or  applied_i(W0, w_i) - W0 (DoRA)

Exact for additive layers (any mix of types is W0 + sum_i w_i delta_i), the adapter itself when a DoRA layer is
alone, and independent of the adapters' order. ComfyUI instead applies patches one after another, each DoRA
normalising the weight patched so far (comfy/lora.py calculate_weight / weight_decompose), so two DoRA adapters on
one layer give an order-dependent result there that differs from this one by a second-order term.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import torch

from trainer.formats import AdapterFormatError
from trainer.lora_state import delta_shape, is_plain  # noqa: F401 (is_plain: the rule, re-exported for blend, merge)

_NAMES = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr"}


def type_name(layer) -> str:
    """'LoRA', 'LoCon (Tucker)', 'LoHa', 'LoKr', each '+ DoRA' with a magnitude: what messages call a layer."""
    name = "LoCon (Tucker)" if layer.kind == "lora" and layer.mid is not None else _NAMES.get(layer.kind, layer.kind)
    return name + (" + DoRA" if layer.dora_scale is not None else "")


def on_device(layer, device):
    """A copy with every tensor on `device` (the blender works where the weight is)."""
    return replace(layer, **{k: v.to(device) for k, v in layer.tensors().items()})


def fits(layer, weight_shape: tuple[int, ...]) -> bool:
    """The layer's delta reshapes to the weight (same rows, same size: a 1x1 conv may hold a linear update), and a
    DoRA magnitude has one entry per output row or per input column."""
    shape = delta_shape(layer)
    if shape[0] != weight_shape[0] or torch.Size(shape).numel() != torch.Size(weight_shape).numel():
        return False
    m = layer.dora_scale
    return m is None or m.numel() in (shape[0], shape[1])


def change(layer, weight: float, w0: torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
           name: str = "the layer") -> torch.Tensor:
    """The layer's change of W at `weight`, in the layer's own delta shape (lora_state.delta_shape), `dtype` (DoRA's:
    fp32, as applied computes). A DoRA layer needs the base weight `w0` (on the layer's device)."""
    if layer.dora_scale is None:
        return weight * layer.delta(dtype)
    if w0 is None:
        raise AdapterFormatError(f"{name} is {type_name(layer)}: its change depends on the base model's weight (DoRA "
                                 f"rescales W0 + delta), so this needs the base model (--model)")
    w = w0.to(torch.float32).reshape(delta_shape(layer))  # the layer's own layout: the magnitude's axis lines up
    return (layer.applied(w, weight) - w).to(dtype)


def summed_change(name: str, parts: list[tuple[object, float]], base: Mapping | None = None,
                  dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """sum_i change_i of one weight (the module docstring's rule), on the CPU, in the first layer's delta shape.
    `base`: kohya name -> W0 (a model's weights), needed only where a layer has DoRA."""
    w0 = None
    if base is not None and name in base and any(layer.dora_scale is not None for layer, _ in parts):
        w0 = base[name].detach().to("cpu")
    shape = delta_shape(parts[0][0])
    total = torch.zeros(shape, dtype=dtype)
    try:
        for layer, weight in parts:
            total += change(layer, weight, w0, dtype, f"layer {name}").reshape(shape)
    except RuntimeError as e:
        shapes = ", ".join(str(delta_shape(layer)) for layer, _ in parts)
        raise AdapterFormatError(f"layer {name}: the adapters' update shapes ({shapes}) do not agree; they were "
                                 f"trained for different base models") from e
    return total


def base_weights(index: Mapping) -> dict[str, torch.Tensor]:
    """kohya name -> weight of a module index (trainer.formats.module_index): the `base` DoRA layers need."""
    return {name: module.weight for name, (_, _, module) in index.items()}
