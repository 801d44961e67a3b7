"""An adapter as plain tensors, independent of peft and of any file layout.

Every format reader produces an `Adapter` and every writer consumes one, so blending, resizing and export never
care where a file came from. Layers are keyed by their kohya module name (`lora_unet_..._to_q`, `lora_te_...`):
that name is the one identifier A1111, ComfyUI and kohya agree on, and it is model-independent.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch


def _scaled(alpha: float | None, rank: int | None) -> float:
    """alpha / rank; 1 where a file has no alpha (A1111 and ComfyUI read it so) or nothing is low-rank."""
    return 1.0 if alpha is None or not rank else alpha / rank


class _Layer:
    """What every layer type shares: its scale from alpha and rank, its tensors by name, DoRA-aware applied()."""

    @property
    def scale(self) -> float:
        return _scaled(self.alpha, self.rank)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in vars(self).items() if isinstance(v, torch.Tensor)}

    def applied(self, weight: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        return applied(self, weight, strength)


@dataclass
class LoraLayer(_Layer):
    """One adapted module: delta = (alpha / rank) * up @ down (Hu et al. 2021, eq. 3). LoCon's Tucker form for a
    k x k convolution (LyCORIS lora_mid) puts a [r, r, kh, kw] core between 1x1 down and up."""
    down: torch.Tensor  # A: [r, in] or [r, in, kh, kw] ([r, in, 1, 1] with mid)
    up: torch.Tensor  # B: [out, r] or [out, r, 1, 1]
    alpha: float | None = None  # None: the file had no alpha, which A1111 and ComfyUI read as scale 1
    mid: torch.Tensor | None = None  # LyCORIS lora_mid: [r, r, kh, kw]
    dora_scale: torch.Tensor | None = None  # DoRA magnitude (see applied)
    kind = "lora"

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The full update in the shape of the adapted weight: [out, in] or [out, in, kh, kw] (DoRA's
        rescaling aside: applied() adds it)."""
        down, up = self.down.to(dtype), self.up.to(dtype)
        if self.mid is not None:  # LyCORIS functional/general.py tucker_weight_from_conv
            core = torch.einsum("m n ..., i m, n j -> i j ...", self.mid.to(dtype), up.flatten(1), down.flatten(1))
            return self.scale * core
        if down.dim() == 2:
            return self.scale * (up @ down)
        # conv: up is [out, r, 1, 1]; the product acts on the flattened input kernel
        out = up.flatten(1) @ down.flatten(1)
        return self.scale * out.reshape(up.shape[0], *down.shape[1:])


@dataclass
class LohaLayer(_Layer):
    """LoHa (LyCORIS; Hyeon-Woo et al. 2022, FedPara): delta = (alpha / r) (w1a w1b) o (w2a w2b), a Hadamard
    product of two rank-r products, so rank up to r^2 for the parameters of two rank-r LoRAs. With t1/t2 (Tucker,
    k x k convolutions) each product is rebuilt through its core."""
    w1a: torch.Tensor  # [out, r]
    w1b: torch.Tensor  # [r, in] (or [r, in, kh, kw] for a convolution without Tucker)
    w2a: torch.Tensor
    w2b: torch.Tensor
    alpha: float | None = None
    t1: torch.Tensor | None = None  # [r, r, kh, kw]
    t2: torch.Tensor | None = None
    dora_scale: torch.Tensor | None = None
    shape: tuple[int, ...] | None = None  # the adapted weight's (a convolution's w*b are stored flattened)
    kind = "loha"

    @property
    def rank(self) -> int:
        return self.w1b.shape[0]

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        product = _product(self.w1a, self.w1b, self.t1, dtype) * _product(self.w2a, self.w2b, self.t2, dtype)
        return self.scale * (product.reshape(self.shape) if self.shape else product)


@dataclass
class LokrLayer(_Layer):
    """LoKr (LyCORIS; Yeh et al. 2024, "Navigating Text-To-Image Customization"): delta = scale kron(w1, w2), each
    side a full matrix or a rank-r product (w*a w*b; w2 also through a Tucker core t2). LyCORIS's scale is
    alpha / r where a side is low-rank (r = that side's inner size) and 1 when both are full matrices
    (modules/lokr.py: alpha = lora_dim when use_w1 and use_w2)."""
    w1: torch.Tensor | None = None  # [out1, in1]
    w1a: torch.Tensor | None = None  # [out1, r]
    w1b: torch.Tensor | None = None  # [r, in1]
    w2: torch.Tensor | None = None  # [out2, in2] or [out2, in2, kh, kw]
    w2a: torch.Tensor | None = None  # [out2, r] (with t2: [r, out2])
    w2b: torch.Tensor | None = None  # [r, in2] or [r, in2 * kh * kw] (with t2: [r, in2])
    t2: torch.Tensor | None = None  # [r, r, kh, kw]
    alpha: float | None = None
    dora_scale: torch.Tensor | None = None
    shape: tuple[int, ...] | None = None  # the adapted weight's (a convolution's w2b is stored flattened)
    kind = "lokr"

    @property
    def rank(self) -> int | None:
        """The low-rank side's inner size r, w1b's or w2b's first (LyCORIS's lora_dim as it trains and as ComfyUI
        reads a file; LyCORIS's own reader takes w2a's second size, which is r too except with a Tucker t2)."""
        if self.w1b is not None:
            return self.w1b.shape[0]
        if self.w2b is not None:
            return self.w2b.shape[0]
        return None

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The update, in `shape` where set (else kron's own 2-D or 4-D shape)."""
        w1 = self.w1.to(dtype) if self.w1 is not None else self.w1a.to(dtype) @ self.w1b.to(dtype)
        if self.w2 is not None:
            w2 = self.w2.to(dtype)
        elif self.t2 is not None:  # LyCORIS functional/general.py rebuild_tucker
            w2 = torch.einsum("i j ..., i p, j r -> p r ...", self.t2.to(dtype), self.w2a.to(dtype),
                              self.w2b.to(dtype))
        else:
            w2 = (self.w2a.to(dtype) @ self.w2b.to(dtype).flatten(1)).reshape(self.w2a.shape[0], *self.w2b.shape[1:])
        while w1.dim() < w2.dim():
            w1 = w1.unsqueeze(-1)
        product = torch.kron(w1, w2.contiguous())
        return self.scale * (product.reshape(self.shape) if self.shape else product)


def _product(wa: torch.Tensor, wb: torch.Tensor, t: torch.Tensor | None, dtype) -> torch.Tensor:
    """wa wb in the weight's shape; through a Tucker core t when given (LyCORIS functional/loha.py)."""
    wa, wb = wa.to(dtype), wb.to(dtype)
    if t is not None:
        return torch.einsum("i j ..., j r, i p -> p r ...", t.to(dtype), wb, wa)
    return (wa @ wb.flatten(1)).reshape(wa.shape[0], *wb.shape[1:])


def delta_shape(layer) -> tuple[int, ...]:
    """The shape delta() returns, without computing it: the same code on the factors moved to the meta device
    (shapes only), so it cannot disagree with delta() for any layer type."""
    return tuple(replace(layer, **{k: v.to("meta") for k, v in layer.tensors().items()}).delta().shape)


def rank_and_width(layer) -> tuple[int, int]:
    """(rank, input width), what families are told apart by: a LoRA's down [r, in], a LyCORIS layer's rank and
    its update's width."""
    return tuple(layer.down.shape[:2]) if layer.kind == "lora" else (layer.rank, delta_shape(layer)[1])


def dora_axis(dora_scale: torch.Tensor) -> str:
    """"out" for a magnitude per output row ([out, 1, ...]: LyCORIS's default, peft's), "in" per input column
    ([1, in, ...]: the only axis A1111's built-in Lora applies, extensions-builtin/Lora/network.py
    apply_weight_decompose). Newer ComfyUI and Forge read the axis from the shape as here (ComfyUI
    comfy/weight_adapter/base.py:62-89 weight_decompose at 9c0cf36, as in v0.3.77: wd_on_output_axis =
    dora_scale.shape[0] == weight.shape[0]; Forge backend/patcher/lora.py:52-81 since 0ced1d0, May 2025); older
    ComfyUI (comfy/lora.py before the weight_adapter split, base.py at 14c2085) and Forge normalise per input column
    whatever the shape. LyCORIS 4.1.3's own reader cannot load an input-column magnitude at all
    (tests/test_lycoris_files.py pins it)."""
    return "in" if dora_scale.shape[0] == 1 and dora_scale.dim() > 1 and dora_scale.shape[1] != 1 else "out"


def axis_shape(size: int, dims: int, axis: str) -> tuple[int, ...]:
    """dora_scale's shape for a weight of `dims` dimensions: [size, 1, ...] per output row, [1, size, 1, ...] per
    input column (LyCORIS modules/locon.py:116-135 stores it so; the shape is how readers tell the axis)."""
    return (size, *[1] * (dims - 1)) if axis == "out" else (1, size, *[1] * (dims - 2))


def axis_norms(weight: torch.Tensor, axis: str) -> torch.Tensor:
    """The L2 norm of each output row or input column of a weight, in axis_shape: DoRA's ||W|| (Liu et al. 2024)."""
    flat = weight.flatten(1) if axis == "out" else weight.transpose(0, 1).flatten(1)
    return flat.norm(dim=1).reshape(axis_shape(flat.shape[0], weight.dim(), axis))


def is_plain(layer) -> bool:
    """Plain LoRA: scale * up @ down is its whole change, which every kohya-LoRA reader (diffusers included) takes
    and whose ranks stack exactly into one LoRA; a Tucker core, a DoRA magnitude, LoHa or LoKr are not."""
    return layer.kind == "lora" and layer.mid is None and layer.dora_scale is None


def applied(layer, weight: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """The adapted weight: W + strength * delta, or with DoRA (Liu et al. 2024) W' = m (W + delta) / ||W + delta||
    with the norm along the magnitude's axis, at a strength s as ComfyUI applies it (comfy/lora.py
    weight_decompose: W + s (W' - W), so s = 0 is the base model; LyCORIS's own merge rescales W + delta instead,
    which agrees at s = 1)."""
    w = weight.float()
    merged = w + layer.delta().reshape(w.shape)
    if layer.dora_scale is None:
        return w + strength * (merged - w)
    m = layer.dora_scale.float()
    norm = axis_norms(merged, dora_axis(m)).reshape(m.shape)
    return w + strength * (merged * (m / norm) - w)


@dataclass
class Adapter:
    """A whole adapter: layers keyed by kohya module name, plus string metadata (ss_*, modelspec.*)."""
    layers: dict[str, LoraLayer | LohaLayer | LokrLayer] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.layers)

    def num_parameters(self) -> int:
        return sum(t.numel() for layer in self.layers.values() for t in layer.tensors().values())
