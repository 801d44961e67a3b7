"""LoRA injection through peft: which modules, what rank and alpha, how A starts, which parameters train at which lr.

h = W0 x + (alpha / r) B A x with W0 frozen, A random and B zero, so step 0 is exactly the base model (Hu et al.
2021, section 4.1). peft owns the layers; this module only decides where they go: the base model's family names
its text encoders (kohya prefix -> module) and its target groups.

network.type picks the peft tuner (issue 26): LoraConfig for lora and locon (with use_dora for DoRA), LoHaConfig
for loha, LoKrConfig for lokr; each starts as the base model too (B, hada_w2_b, lokr_w2 zero). k x k convolutions
get network.conv_rank / conv_alpha through peft's per-module rank_pattern / alpha_pattern. DoRA is peft's on LoRA
per output row, and _own_dora's (a magnitude and a hook per layer) on LoHa/LoKr and on the input axis.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from . import config as C
from .dropout import per_image_dropout
from .errors import UserError
from .lora_state import axis_norms

ADAPTER_NAME = "default"


@dataclass
class LoraParams:
    """The trainable parameters, by component, in a fixed order (names matter for checkpoints, not positions)."""
    unet: dict[str, nn.Parameter]
    text_encoders: dict[str, dict[str, nn.Parameter]] = field(default_factory=dict)  # component -> name -> param
    lrs: dict[str, float] = field(default_factory=dict)  # component -> learning rate

    def named(self) -> dict[str, nn.Parameter]:
        """Every trainable parameter keyed by '<component>.<parameter name>' (unet, text_encoder, text_encoder_2:
        diffusers' component names, the same for every family)."""
        out = {f"unet.{k}": v for k, v in self.unet.items()}
        for component, params in self.text_encoders.items():
            out.update({f"{component}.{k}": v for k, v in params.items()})
        return out

    def param_groups(self) -> list[dict]:
        """One group per component with its own learning rate (kohya's and OneTrainer's per-encoder rates)."""
        groups = [{"params": list(self.unet.values()), "lr": self.lrs.get("unet", 0.0), "name": "unet"}]
        groups += [{"params": list(p.values()), "lr": self.lrs[c], "name": c} for c, p in self.text_encoders.items()]
        return [g for g in groups if g["params"]]


class TargetError(UserError, ValueError):
    """A target module name that matches nothing in the model."""


# every peft parameter of an adapter, by its name in named_parameters ('<module>.<kind>.<adapter>[.weight]'): LoRA's
# A and B and DoRA's magnitude (peft/tuners/lora/layer.py adapter_layer_names), LoHa's and LoKr's factors
# (peft/tuners/loha/layer.py and lokr/layer.py adapter_layer_names)
_TRAINABLE = re.compile(r"\.(?:lora_A|lora_B|lora_magnitude_vector|hada_w[12]_[ab]|hada_t[12]|lokr_w[12](?:_[ab])?"
                        rf"|lokr_t2|dora_magnitude)\.{ADAPTER_NAME}(?:\.|$)")
DORA_MAGNITUDE = "dora_magnitude"  # the DoRA magnitude _own_dora adds beside peft's parameters


def _peft_config(cfg: C.TrainConfig, targets: list[str], model: nn.Module):
    """The peft config of network.type for `targets` of `model`."""
    net = cfg.network
    ranks, alphas = _conv_patterns(model, targets, net)
    common = {"r": net.rank, "target_modules": targets, "rank_pattern": ranks, "alpha_pattern": alphas}
    if net.type == "loha":  # use_effective_conv2d is LyCORIS's use_tucker (peft/tuners/loha/layer.py update_layer)
        from peft import LoHaConfig
        return LoHaConfig(alpha=net.alpha, use_effective_conv2d=net.tucker, **common)
    if net.type == "lokr":
        from peft import LoKrConfig
        # "lycoris": w2 (or w2_b) starts at zero and w1 random, as LyCORIS's own LoKr (peft's True zeroes w1)
        return LoKrConfig(alpha=net.alpha, use_effective_conv2d=net.tucker, decompose_both=net.decompose_both,
                          decompose_factor=net.factor, init_weights="lycoris", **common)
    from peft import LoraConfig
    init = "gaussian" if net.init == "gaussian" else True  # peft's True: kaiming-uniform A, zero B
    return LoraConfig(lora_alpha=net.alpha, lora_dropout=net.dropout, init_lora_weights=init, bias="none",
                      use_dora=_peft_dora(net), **common)


def _peft_dora(net) -> bool:
    """DoRA by peft's own LoRA layers: per output row only (peft/tuners/lora/dora.py get_weight_norm); other DoRA
    is _own_dora's."""
    return net.dora and net.type in ("lora", "locon") and net.dora_axis == "out"


def _conv_patterns(model: nn.Module, targets: list[str], net) -> tuple[dict[str, int], dict[str, float]]:
    """peft rank_pattern / alpha_pattern giving each targeted k x k convolution conv_rank / conv_alpha (1x1 ones
    keep the linear rank, as LyCORIS kohya.py lines 428-436 and kohya's networks/lora.py do). peft matches a key as
    a regular expression against the module path's end (peft/utils/other.py get_pattern_key), so paths are escaped."""
    rank, alpha = net.conv_rank or net.rank, net.conv_alpha or net.alpha
    if (rank, alpha) == (net.rank, net.alpha):
        return {}, {}
    convs = [re.escape(name) for name, m in model.named_modules()
             if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1) and any(_takes(name, t) for t in targets)]
    return {k: rank for k in convs}, {k: alpha for k in convs}


def _own_dora(model: nn.Module, axis: str) -> None:
    """DoRA where peft has none: over LoHa and LoKr (peft 0.21), and on the input axis for every type (peft's LoRA
    DoRA normalises per output row only). Each adapted layer gets a magnitude m, kept in the shape of LyCORIS's
    dora_scale ([out, 1, ...] or [1, in, ...], lycoris/modules/locon.py lines 117-135) and starting at ||W0|| along
    that axis, so step 0 is the base model; the norm ||W0 + dW|| is detached, as peft's DoRA does (DoRA paper,
    section 4.3). W' = (W0 + dW) m / ||W0 + dW|| scales rows (axis out) or columns (axis in); both commute with the
    layer, so a hook rescales the output less its bias, or the input, instead of the weight."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lycoris_utils import LycorisLayer
    hook = _rescale_output if axis == "out" else _rescale_input
    for module in model.modules():
        if isinstance(module, (LoraLayer, LycorisLayer)) and ADAPTER_NAME in module.r:
            magnitude = nn.Parameter(_norms(module.get_base_layer().weight.detach().float(), axis))
            setattr(module, DORA_MAGNITUDE, nn.ParameterDict({ADAPTER_NAME: magnitude}))
            if axis == "out":
                module.register_forward_hook(hook)
            else:
                module.register_forward_pre_hook(hook)


def _norms(weight: torch.Tensor, axis: str) -> torch.Tensor:
    """The L2 norm of each output row ([out, 1, ...]) or input column ([1, in, ...]) of a weight: the rule the
    layers' applied() uses too (lora_state.axis_norms), so training and every reader normalise alike."""
    return axis_norms(weight, axis)


def _dora_scale(module: nn.Module, axis: str) -> torch.Tensor | None:
    """m / ||W0 + dW|| as a vector over the axis, or None while the adapter is off (lora_off, merged)."""
    if module.disable_adapters or module.merged or ADAPTER_NAME not in module.active_adapters:
        return None
    with torch.no_grad():
        merged = module.get_base_layer().weight.float() + module.get_delta_weight(ADAPTER_NAME).float()
        norm = _norms(merged, axis)
    return (getattr(module, DORA_MAGNITUDE)[ADAPTER_NAME] / norm).flatten()


def _per_channel(scale: torch.Tensor, x: torch.Tensor, conv: bool) -> torch.Tensor:
    """scale - 1 shaped to multiply x's channels ([C, 1, 1] for a convolution's [N, C, H, W], [C] for a Linear's),
    in x's dtype. The 1 comes off in fp32: a magnitude's change is often below half precision's spacing near 1
    (bf16: 2^-8 below, 2^-7 above), and scale itself cast to bf16 lost a 0.1% change entirely (frozen weights
    bf16, test_own_dora_hook_in_bf16_keeps_a_small_magnitude_change); peft's DoRA adds (m/||W|| - 1) * base for
    the same reason (peft/tuners/lora/dora.py:165)."""
    change = scale - 1
    return (change.reshape(-1, *[1] * (x.dim() - 2)) if conv else change).to(x.dtype)


def _rescale_output(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    """(output - bias) * scale + bias, written as output + (output - bias) * (scale - 1) (_per_channel)."""
    scale = _dora_scale(module, "out")
    if scale is None:
        return output
    base = module.get_base_layer()
    change = _per_channel(scale, output, isinstance(base, nn.Conv2d))
    if base.bias is None:
        return output + output * change
    return output + (output - base.bias.reshape(change.shape).to(output.dtype)) * change


def _rescale_input(module: nn.Module, args):
    """x * scale, written as x + x * (scale - 1) (_per_channel)."""
    scale = _dora_scale(module, "in")
    if scale is None:
        return None
    x, *rest = args
    return (x + x * _per_channel(scale, x, isinstance(module.get_base_layer(), nn.Conv2d)), *rest)


def unet_target_names(cfg: C.TrainConfig, family) -> list[str]:
    """network.unet_targets, plus the 'conv' group for LoCon where the family's denoiser has one (UNets). Refuses,
    at setup before the first step, what the family's files cannot hold."""
    if cfg.network.type == "locon" and "conv" not in family.unet_groups:
        raise TargetError(f"network.type = locon adapts the UNet's convolutions, and {family.label}'s "
                          f"{family.denoiser_label} has none to adapt; use network.type = lora")
    _refuse_lycoris_layers(cfg.network, family)
    return C.requested_unet_targets(cfg.network)


def _refuse_lycoris_layers(net, family) -> None:
    """LoHa, LoKr and DoRA layers on a family whose files fuse modules (SD3's q/k/v, FLUX's; has_file_layout) or
    whose checkpoints are written in the diffusers layout (SD3: family.layout('auto')): no file could hold them
    (formats/write.py _lycoris_file), and the first checkpoint would fail after its steps were trained."""
    from .formats.write import has_file_layout
    if not C.makes_lycoris_layers(net) or not (has_file_layout(family) or family.layout("auto") != "kohya"):
        return
    field, fix = ("network.dora", "network.dora = false") if net.type in ("lora", "locon") else \
        (f"network.type = {net.type}", "network.type = lora")
    raise TargetError(f"{field} makes LyCORIS layers, and {family.label}'s adapter files fuse modules, which "
                      f"they cannot be; use {fix}")


def _takes(name: str, target: str) -> bool:
    """peft's rule for a target in a list: the module path itself, or its last dotted parts."""
    return name == target or name.endswith("." + target)


def _check_targets(model: nn.Module, targets: list[str], what: str, key: str) -> None:
    names = [n for n, _ in model.named_modules()]
    missing = [t for t in targets if not any(_takes(n, t) for n in names)]
    if missing:
        raise TargetError(f"{what} has no module named {', '.join(missing)}; check network.{key}")


def _inject(model: nn.Module, cfg: C.TrainConfig, targets: list[str], what: str, key: str,
            excluded: tuple[str, ...] = ()) -> dict[str, nn.Parameter]:
    """`excluded`: patterns (regular expressions, matched against the whole module path) of modules a suffix
    target must not take (FLUX's final proj_out beside its single blocks'): then peft is given the matching paths
    themselves."""
    from peft import inject_adapter_in_model
    _check_targets(model, targets, what, key)
    if excluded:
        skip = re.compile("|".join(f"(?:{p})" for p in excluded))
        targets = [n for n, _ in model.named_modules()
                   if not skip.fullmatch(n) and any(_takes(n, t) for t in targets)]
    model.requires_grad_(False)
    inject_adapter_in_model(_peft_config(cfg, targets, model), model, adapter_name=ADAPTER_NAME)
    if cfg.network.dora and not _peft_dora(cfg.network):
        _own_dora(model, cfg.network.dora_axis)
    params = {}
    for name, p in model.named_parameters():
        trainable = bool(_TRAINABLE.search(name))
        p.requires_grad_(trainable)
        if trainable:
            params[name] = p
    return params


def trained_text_encoders(base, cfg: C.TrainConfig) -> dict[str, float]:
    """kohya prefix -> learning rate of each text encoder of the base model that gets a LoRA (a rate of 0 keeps
    one frozen). network.text_encoders names them: 'all', or te / te1 / te2."""
    names = cfg.network.text_encoders
    if not cfg.network.text_encoder_targets:
        return {}
    out = {}
    for spec in base.family.text_encoder_specs:
        short = spec.prefix.removeprefix("lora_")
        named = short in names or ("all" in names and spec.trains_by_default)  # SD3's T5 only when named
        if named and C.text_encoder_lr(cfg, short) > 0:
            out[spec.prefix] = C.text_encoder_lr(cfg, short)
    return out


def text_encoder_problems(family, cfg: C.TrainConfig) -> list[str]:
    """Text encoders named in the config that the base model's family does not have."""
    have = [spec.prefix.removeprefix("lora_") for spec in family.text_encoder_specs]
    named = [n for n in cfg.network.text_encoders if n != "all"]
    named += list(C.parse_text_encoder_lrs(cfg.optimizer.text_encoder_lrs)[0])
    wrong = sorted({n for n in named if n not in have})
    if not wrong:
        return []
    return [f"network.text_encoders / optimizer.text_encoder_lrs name {', '.join(wrong)}, but the base model is "
            f"{family.label}, whose text encoder{'s are' if len(have) > 1 else ' is'} {' and '.join(have)}"]


def inject_lora(base, cfg: C.TrainConfig) -> LoraParams:
    """Add a LoRA adapter named 'default' to base.denoiser and to each text encoder that trains."""
    family = base.family
    unet_targets = C.expand_targets(unet_target_names(cfg, family), family.unet_groups)
    unet = _inject(base.denoiser, cfg, unet_targets, family.denoiser_label, "unet_targets",
                   family.excluded_targets) if unet_targets else {}
    per_image_dropout(base.denoiser, ADAPTER_NAME, "unet")  # each image's mask from its own seed, whichever process
    params = LoraParams(unet=unet, lrs={"unet": cfg.optimizer.unet_lr})
    specs = {spec.prefix: spec for spec in family.text_encoder_specs}
    for prefix, lr in trained_text_encoders(base, cfg).items():
        spec = specs[prefix]
        te_targets = C.expand_targets(cfg.network.text_encoder_targets, spec.groups)  # CLIP's or T5's names
        params.text_encoders[spec.component] = _inject(base.text_encoders[prefix], cfg, te_targets,
                                                       f"text encoder {spec.label}", "text_encoder_targets")
        per_image_dropout(base.text_encoders[prefix], ADAPTER_NAME, spec.component)
        params.lrs[spec.component] = lr
    return params


def lora_state_dict(params: LoraParams) -> dict[str, torch.Tensor]:
    """fp32 CPU copies of the trainable tensors, keyed by name (for checkpoints)."""
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in params.named().items()}


def load_lora_state_dict(params: LoraParams, state: dict[str, torch.Tensor]) -> None:
    """Restore trainable tensors by name; a missing or extra name is an error, never a silent skip."""
    named = params.named()
    missing, extra = sorted(set(named) - set(state)), sorted(set(state) - set(named))
    if missing or extra:
        raise ValueError(f"checkpoint does not match the network: missing {missing[:5]}, unexpected {extra[:5]} "
                         f"(was the config's network section changed since the checkpoint was written?)")
    with torch.no_grad():
        for k, p in named.items():
            p.copy_(state[k].to(p.device, p.dtype))


@contextmanager
def lora_off(*models: nn.Module):
    """Inside, every injected LoRA layer of `models` computes its base layer only (peft's switch); after, they are
    back on with each parameter's requires_grad as it was (peft's switch would set it on every adapter parameter)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    layers = [m for model in models for m in model.modules() if isinstance(m, BaseTunerLayer)]
    grads = {p: p.requires_grad for layer in layers for p in layer.parameters()}
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for p, wanted in grads.items():
            p.requires_grad_(wanted)
