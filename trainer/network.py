"""LoRA injection through peft: which modules, what rank and alpha, how A starts, which parameters train at which lr.

h = W0 x + (alpha / r) B A x with W0 frozen, A random and B zero, so step 0 is exactly the base model (Hu et al.
2021, section 4.1). peft owns the layers; this module only decides where they go.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import config as C
from .errors import UserError

ADAPTER_NAME = "default"


@dataclass
class LoraParams:
    """The trainable parameters, by component, in a fixed order (names matter for checkpoints, not positions)."""
    unet: dict[str, nn.Parameter]
    text_encoder: dict[str, nn.Parameter]

    def named(self) -> dict[str, nn.Parameter]:
        """Every trainable parameter keyed by '<component>.<parameter name>'."""
        out = {f"unet.{k}": v for k, v in self.unet.items()}
        out.update({f"text_encoder.{k}": v for k, v in self.text_encoder.items()})
        return out

    def param_groups(self, cfg: C.TrainConfig) -> list[dict]:
        """Separate learning rates for the UNet and the text encoder (as kohya and OneTrainer offer)."""
        groups = [{"params": list(self.unet.values()), "lr": cfg.optimizer.unet_lr, "name": "unet"}]
        if self.text_encoder:
            groups.append({"params": list(self.text_encoder.values()), "lr": cfg.optimizer.text_encoder_lr,
                           "name": "text_encoder"})
        return [g for g in groups if g["params"]]


class TargetError(UserError, ValueError):
    """A target module name that matches nothing in the model."""


def _lora_config(cfg: C.TrainConfig, targets: list[str]):
    from peft import LoraConfig
    init = "gaussian" if cfg.network.init == "gaussian" else True  # peft's True: kaiming-uniform A, zero B
    return LoraConfig(r=cfg.network.rank, lora_alpha=cfg.network.alpha, target_modules=targets,
                      lora_dropout=cfg.network.dropout, init_lora_weights=init, bias="none")


def _check_targets(model: nn.Module, targets: list[str], what: str) -> None:
    names = [n for n, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise TargetError(f"{what} has no module named {', '.join(missing)}; check network."
                          f"{'unet' if what == 'UNet' else 'text_encoder'}_targets")


def _inject(model: nn.Module, cfg: C.TrainConfig, targets: list[str], what: str) -> dict[str, nn.Parameter]:
    from peft import inject_adapter_in_model
    _check_targets(model, targets, what)
    model.requires_grad_(False)
    inject_adapter_in_model(_lora_config(cfg, targets), model, adapter_name=ADAPTER_NAME)
    params = {}
    for name, p in model.named_parameters():
        trainable = ".lora_A." in name or ".lora_B." in name
        p.requires_grad_(trainable)
        if trainable:
            params[name] = p
    return params


def inject_lora(base, cfg: C.TrainConfig) -> LoraParams:
    """Add a LoRA adapter named 'default' to base.unet (and base.text_encoder when it is trained)."""
    unet = _inject(base.unet, cfg, C.unet_target_modules(cfg), "UNet") if C.unet_target_modules(cfg) else {}
    te_targets = C.text_encoder_target_modules(cfg)
    te = _inject(base.text_encoder, cfg, te_targets, "text encoder") if te_targets else {}
    return LoraParams(unet=unet, text_encoder=te)


def trains_text_encoder(cfg: C.TrainConfig) -> bool:
    return bool(C.text_encoder_target_modules(cfg)) and cfg.optimizer.text_encoder_lr > 0


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
