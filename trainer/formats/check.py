"""Does an adapter fit a model? Names present, delta shapes equal to weight shapes."""
from __future__ import annotations

from torch import nn

from trainer.lora_state import Adapter

from .errors import AdapterFormatError

Index = dict[str, tuple[str, str, nn.Module]]


def delta_shape(layer) -> tuple[int, ...]:
    return (layer.up.shape[0], *layer.down.shape[1:])


def check_against_model(adapter: Adapter, index: Index) -> None:
    """Raise AdapterFormatError listing layers with no module in the model and layers whose shapes differ."""
    missing = [name for name in adapter.layers if name not in index]
    mismatched = []
    for name, layer in adapter.layers.items():
        if name in index:
            weight_shape = tuple(index[name][2].weight.shape)
            if not _same_shape(delta_shape(layer), weight_shape):
                mismatched.append(f"{name}: adapter delta shape {delta_shape(layer)} vs model weight shape "
                                  f"{weight_shape}")
    problems = []
    if missing:
        more = f" and {len(missing) - 20} more" if len(missing) > 20 else ""
        problems.append(f"{len(missing)} layer(s) have no module in this model: {', '.join(missing[:20])}{more}")
    if mismatched:
        problems.append(f"{len(mismatched)} layer(s) do not fit their module: {'; '.join(mismatched[:20])}")
    if problems:
        raise AdapterFormatError("the adapter does not fit this base model (was it trained for another model "
                                 "family, e.g. SDXL vs SD1.x?): " + " | ".join(problems))


def align_to_model(adapter: Adapter, index: Index) -> Adapter:
    """Rename `lora_te1_` <-> `lora_te_` to the spelling the model's index uses, then check the fit.

    diffusers' kohya converter writes `lora_te1_` even for SD1.x, whose single text encoder kohya calls `lora_te`.
    """
    prefixes = {prefix for prefix, _, _ in index.values()}
    layers = {}
    for name, layer in adapter.layers.items():
        if name.startswith("lora_te1_") and "lora_te" in prefixes and "lora_te1" not in prefixes:
            name = "lora_te_" + name[len("lora_te1_"):]
        elif name.startswith("lora_te_") and "lora_te1" in prefixes and "lora_te" not in prefixes:
            name = "lora_te1_" + name[len("lora_te_"):]
        layers[name] = layer
    aligned = Adapter(layers=layers, metadata=dict(adapter.metadata))
    check_against_model(aligned, index)
    return aligned


def _same_shape(delta: tuple[int, ...], weight: tuple[int, ...]) -> bool:
    # a linear delta fits a 1x1 conv and back (SD2 vs SD1 proj_in/proj_out); A1111 and diffusers reshape likewise
    return delta == weight or (delta[:2] == weight[:2] and all(d == 1 for d in delta[2:] + weight[2:]))
