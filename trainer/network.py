"""LoRA injection through peft: which modules, what rank and alpha, how A starts, which parameters train at which lr.

h = W0 x + (alpha / r) B A x with W0 frozen, A random and B zero, so step 0 is exactly the base model (Hu et al.
2021, section 4.1). peft owns the layers; this module only decides where they go: the base model's family names
its text encoders (kohya prefix -> module) and its target groups.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from . import config as C
from .dropout import per_image_dropout
from .errors import UserError

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


def _lora_config(cfg: C.TrainConfig, targets: list[str]):
    from peft import LoraConfig
    init = "gaussian" if cfg.network.init == "gaussian" else True  # peft's True: kaiming-uniform A, zero B
    return LoraConfig(r=cfg.network.rank, lora_alpha=cfg.network.alpha, target_modules=targets,
                      lora_dropout=cfg.network.dropout, init_lora_weights=init, bias="none")


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
    import re
    from peft import inject_adapter_in_model
    _check_targets(model, targets, what, key)
    if excluded:
        skip = re.compile("|".join(f"(?:{p})" for p in excluded))
        targets = [n for n, _ in model.named_modules()
                   if not skip.fullmatch(n) and any(_takes(n, t) for t in targets)]
    model.requires_grad_(False)
    inject_adapter_in_model(_lora_config(cfg, targets), model, adapter_name=ADAPTER_NAME)
    params = {}
    for name, p in model.named_parameters():
        trainable = ".lora_A." in name or ".lora_B." in name
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
    unet_targets = C.expand_targets(cfg.network.unet_targets, family.unet_groups)
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
