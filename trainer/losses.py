"""The training losses: the family's noise process (trainer/models/noise.py owns the draws, the noising, the
target and the per-image weighting) and prior preservation's weights. Pure functions of tensors, so the tiny
model's build script (tools/) and the loop share one copy of each.
"""
from __future__ import annotations

import torch

from .models.noise import NoiseProcess, high_noise_weights, min_snr_weights

__all__ = ["loss_weights", "diffusion_loss", "fixed_noise_loss", "min_snr_weights", "high_noise_weights"]


def loss_weights(items, prior_loss_weight: float) -> torch.Tensor:
    """Per-image loss weights: prior_loss_weight for regularization images (DreamBooth's prior-preservation term,
    Ruiz et al. 2023, eq. 2), 1 for training images."""
    return torch.tensor([prior_loss_weight if item.regularization else 1.0 for item in items])


def diffusion_loss(base, latents: torch.Tensor, cond: dict, gens: list[torch.Generator],
                   process: NoiseProcess) -> torch.Tensor:
    """Per-image weighted loss [B] of the family's noise process (`Family.noise_process`). Image i's draws come
    from gens[i] alone, so an image trains the same way whichever batch, or process, it shares (the loop weights
    and reduces)."""
    return process.training_loss(base, latents, cond, gens)


def fixed_noise_loss(base, latents: torch.Tensor, cond: dict, noise: torch.Tensor, point,
                     process: NoiseProcess) -> float:
    """The plain loss at one of the process's fixed validation points with given noise (no weighting, no offset):
    one term of the validation loss, comparable across runs whatever their loss settings."""
    return process.fixed_noise_loss(base, latents, cond, noise, point)
