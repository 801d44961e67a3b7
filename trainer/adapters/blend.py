"""Exact, fused blending of several adapters (any mix of LoRA, LoCon, LoHa, LoKr, DoRA) into a base model's weights.

For every layer some enabled adapter touches: W = W0 + sum_i w_i * delta_i (for LoRA delta_i = (alpha_i / r_i) B_i A_i;
a DoRA layer adds applied_i(W0, w_i) - W0 instead, the rule of trainer.adapters.delta), computed in fp32 and
written into the module's own weight, so a denoising step costs exactly what the base model's does (no extra
modules, no hooks, no per-step work).

Why hand-written: peft/diffusers `set_adapters` keeps the LoRA modules in the forward path, so every step pays for
each active adapter; diffusers' `fuse_lora` fuses one adapter set at a time and unfuses by subtraction, which is not
exactly reversible in fp16/bf16 and has no cheap way to change one adapter's weight. Here a pristine copy of W0 is
kept for touched layers only; removal restores W0 from that copy bit for bit, and changing one adapter's weight
recomputes only the layers that adapter touches, always from W0 (never by subtracting), in a fixed adapter order, so
the same set of adapters and weights gives the same bits whatever the history.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.finite import adapter_weight
from trainer.lora_state import Adapter, LoraLayer, delta_shape

from trainer.formats import AdapterFormatError, module_index
from trainer.formats.check import aligned_names, family_mismatch

from .delta import change, fits as fits_weight, is_plain, on_device, type_name


@dataclass
class _Entry:
    adapter: Adapter
    weight: float
    enabled: bool = True


class FusedBlender:
    """Blend named adapters into `unet` (and text encoders, `{kohya prefix: module}`) in place."""

    def __init__(self, unet: torch.nn.Module, text_encoders: dict[str, torch.nn.Module] | None = None,
                 unet_path=None, family=None, keep_on: str | torch.device | None = None):
        """`keep_on`: where the pristine W0 copies live (None: beside each weight; "cpu" spares GPU memory)."""
        self._index = module_index(unet, text_encoders or {}, unet_path)
        self._family = family
        self._keep_on = keep_on
        self._entries: dict[str, _Entry] = {}  # insertion order = summation order
        self._pristine: dict[str, torch.Tensor] = {}  # W0 of every layer currently holding a delta

    @classmethod
    def of(cls, base, keep_on: str | torch.device | None = None) -> "FusedBlender":
        """A blender over a loaded BaseModel, with its family's names."""
        return cls(base.denoiser, base.text_encoders, base.kohya_unet_path, base.family, keep_on)

    # ---- public API ------------------------------------------------------------------------------------------

    def add(self, name: str, adapter: Adapter, weight: float = 1.0, enabled: bool = True) -> None:
        """Blend `adapter` in under `name` (an existing `name` is replaced)."""
        weight = adapter_weight(weight, _label(name))
        adapter = aligned_names(adapter, self._index)
        self._check(name, adapter)
        old = self._entries.pop(name, None)
        self._entries[name] = _Entry(adapter, weight, bool(enabled))
        self._refresh(set(adapter.layers) | (set(old.adapter.layers) if old else set()))

    def set_weight(self, name: str, weight: float) -> None:
        self.update(name, weight=weight)

    def set_enabled(self, name: str, enabled: bool) -> None:
        self.update(name, enabled=enabled)

    def update(self, name: str, weight: float | None = None, enabled: bool | None = None) -> None:
        """Change weight and/or enabled; the adapter's layers are recomputed once, and only if something changed."""
        entry = self._entry(name)
        was_enabled = entry.enabled
        new_weight = entry.weight if weight is None else adapter_weight(weight, _label(name))
        new_enabled = entry.enabled if enabled is None else bool(enabled)
        if (new_weight, new_enabled) == (entry.weight, entry.enabled):
            return
        entry.weight, entry.enabled = new_weight, new_enabled
        if was_enabled or new_enabled:  # a disabled adapter's weight does not reach the model
            self._refresh(set(entry.adapter.layers))

    def remove(self, name: str) -> None:
        self._entry(name)  # a clear KeyError for an unknown name
        entry = self._entries.pop(name)
        self._refresh(set(entry.adapter.layers))

    def clear(self) -> None:
        self._entries.clear()
        self._refresh(set(self._pristine))

    def active(self) -> dict[str, float]:
        """{name: weight} of the enabled adapters, in summation order."""
        return {name: e.weight for name, e in self._entries.items() if e.enabled}

    def names(self) -> list[str]:
        return list(self._entries)

    def adapter(self, name: str) -> Adapter:
        return self._entry(name).adapter

    def weight(self, name: str) -> float:
        return self._entry(name).weight

    def is_enabled(self, name: str) -> bool:
        return self._entry(name).enabled

    def blended_delta(self, kohya_name: str) -> torch.Tensor:
        """sum_i w_i * delta_i for one layer (a DoRA layer's term: applied_i(W0, w_i) - W0), fp32, in the weight's
        shape (zeros when no enabled adapter has it)."""
        weight = self._weight(kohya_name)
        total = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for entry in self._entries.values():
            layer = entry.adapter.layers.get(kohya_name)
            if entry.enabled and layer is not None and is_plain(layer):
                total += entry.weight * _layer_delta(layer, weight)
            elif entry.enabled and layer is not None:
                total += _change(layer, entry.weight, self.base_weight(kohya_name).to(weight.device))
        return total

    def base_weight(self, kohya_name: str) -> torch.Tensor:
        """W0 of a layer: its pristine copy while blended, else the model's weight itself."""
        return self._pristine.get(kohya_name, self._weight(kohya_name))

    def base_weights(self) -> dict[str, torch.Tensor]:
        """kohya name -> W0 of every layer of the model (what DoRA layers need to be blended to a file)."""
        return {name: self.base_weight(name) for name in self._index}

    def touched_layers(self) -> list[str]:
        """Layers whose weights currently differ from (or may differ from) W0."""
        return list(self._pristine)

    # ---- internals -------------------------------------------------------------------------------------------

    def _entry(self, name: str) -> _Entry:
        if name not in self._entries:
            known = ", ".join(self._entries) or "none"
            raise KeyError(f"no adapter named {name!r} in the blend (adapters: {known})")
        return self._entries[name]

    def _weight(self, kohya_name: str) -> torch.Tensor:
        return self._index[kohya_name][2].weight

    def _check(self, name: str, adapter: Adapter) -> None:
        name = _label(name)
        missing = [k for k in adapter.layers if k not in self._index]
        mismatch = family_mismatch(adapter, self._family) if missing else None
        if mismatch:
            raise AdapterFormatError(f"adapter {name!r}: {mismatch}")
        if missing:
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise AdapterFormatError(f"adapter {name!r}: {len(missing)} of its {len(adapter)} layers are not in this "
                                     f"base model ({shown}); was it trained for another model family (SD1 vs SDXL)?")
        for key, layer in adapter.layers.items():
            weight = self._weight(key)
            if not is_plain(layer):
                self._check_typed(name, key, layer, tuple(weight.shape))
                continue
            numel = layer.up.shape[0] * layer.down[0].numel()
            fits = numel == weight.numel() and layer.up.shape[0] == weight.shape[0]
            if not fits or layer.up.shape[1] != layer.rank:
                raise AdapterFormatError(f"adapter {name!r}: layer {key} has shape up {tuple(layer.up.shape)} x "
                                         f"down {tuple(layer.down.shape)}, which does not fit the model's weight "
                                         f"{tuple(weight.shape)}; it was trained for another base model")

    @staticmethod
    def _check_typed(name: str, key: str, layer, weight_shape: tuple[int, ...]) -> None:
        if not fits_weight(layer, weight_shape):
            raise AdapterFormatError(f"adapter {name!r}: {type_name(layer)} layer {key} has an update of shape "
                                     f"{delta_shape(layer)}, which does not fit the model's weight {weight_shape}; "
                                     f"it was trained for another base model")

    @torch.no_grad()
    def _refresh(self, kohya_names: set[str]) -> None:
        """Rewrite each layer as W0 + blended delta (or W0 itself when nothing enabled touches it)."""
        for key in sorted(kohya_names):
            weight = self._weight(key)
            parts = [(e.adapter.layers[key], e.weight) for e in self._entries.values()
                     if e.enabled and key in e.adapter.layers]
            if not parts:
                if key in self._pristine:
                    weight.copy_(self._pristine.pop(key))
                continue
            w0 = self._pristine.setdefault(key, weight.detach().to(self._keep_on or weight.device, copy=True))
            weight.copy_(_fused(w0.to(weight.device), parts).reshape(weight.shape).to(weight.dtype))


def _label(name: str) -> str:
    """An adapter's name as messages give it: a file's name, not its folder (a Generator names adapters by their
    resolved path, which is a server path in the app)."""
    return Path(name).name if "/" in name or "\\" in name else name


@contextmanager
def fused(base, adapter: Adapter, keep_on: str | torch.device | None = None):
    """`adapter` fused into `base`'s weights (weight 1) inside the block; W0 restored bit for bit after."""
    blender = FusedBlender.of(base, keep_on)
    try:
        blender.add("adapter", adapter)  # inside: a failure halfway still restores the layers already fused
        yield
    finally:
        blender.clear()


def _fused(w0: torch.Tensor, parts: list[tuple[LoraLayer, float]]) -> torch.Tensor:
    """W0 + sum_i w_i s_i B_i A_i in fp32 as one addmm over the stacked factors (one GEMM of the summed rank
    instead of one per adapter); other layer types' changes (trainer.adapters.delta) are added after, in the
    blend's order, each computed on W0."""
    typed = [(layer, w) for layer, w in parts if not is_plain(layer)]
    if typed:
        plain = [(layer, w) for layer, w in parts if is_plain(layer)]
        total = _fused(w0, plain) if plain else w0.to(torch.float32).flatten(1).clone()
        for layer, w in typed:
            total += _change(layer, w, w0).flatten(1)
        return total
    device = w0.device
    ups = torch.cat([(w * layer.scale) * layer.up.to(device, torch.float32).flatten(1) for layer, w in parts], 1)
    downs = torch.cat([layer.down.to(device, torch.float32).flatten(1) for layer, _ in parts], 0)
    return torch.addmm(w0.to(torch.float32).flatten(1), ups, downs)


def _change(layer, weight: float, w0: torch.Tensor) -> torch.Tensor:
    """Any layer's fp32 change at `weight` on w0's device, in w0's shape."""
    return change(on_device(layer, w0.device), weight, w0).reshape(w0.shape)


def _layer_delta(layer: LoraLayer, weight: torch.Tensor) -> torch.Tensor:
    """The layer's fp32 delta on the weight's device, reshaped to the weight (a 1x1 conv may hold a linear LoRA)."""
    down = layer.down.to(weight.device, torch.float32)
    up = layer.up.to(weight.device, torch.float32)
    return (layer.scale * (up.flatten(1) @ down.flatten(1))).reshape(weight.shape)
