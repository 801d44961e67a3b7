"""The training losses: the noise-prediction loss and its weightings. Pure functions of tensors and a scheduler,
so the tiny model's build script (tools/) and the loop share one copy of each.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import config as C


def loss_weights(items, prior_loss_weight: float) -> torch.Tensor:
    """Per-image loss weights: prior_loss_weight for regularization images (DreamBooth's prior-preservation term,
    Ruiz et al. 2023, eq. 2), 1 for training images."""
    return torch.tensor([prior_loss_weight if item.regularization else 1.0 for item in items])


def diffusion_loss(base, latents: torch.Tensor, cond: dict, gens: list[torch.Generator], cfg: C.TrainConfig,
                   prediction: str) -> torch.Tensor:
    """Per-image noise-prediction loss [B] (epsilon or v), with noise offset and min-SNR-gamma or high-noise
    weighting. Image i's noise, offset and timestep come from gens[i] alone, so an image trains the same way
    whichever batch, or process, it shares (the loop weights and reduces)."""
    sched = base.noise_scheduler
    noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in gens])
    if cfg.loss.noise_offset:  # per-channel shift lets the model learn overall brightness (Guttenberg 2023)
        offsets = torch.stack([torch.randn((latents.shape[1], 1, 1), generator=g) for g in gens])
        noise = noise + cfg.loss.noise_offset * offsets
    timesteps = torch.cat([torch.randint(0, sched.config.num_train_timesteps, (1,), generator=g) for g in gens])
    noise, timesteps = noise.to(latents.device), timesteps.to(latents.device)
    noisy = sched.add_noise(latents, noise, timesteps)
    target = noise if prediction == "epsilon" else sched.get_velocity(latents, noise, timesteps)
    pred = base.predict(noisy, timesteps, cond)
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if cfg.loss.min_snr_gamma:
        loss = loss * min_snr_weights(sched, timesteps, cfg.loss.min_snr_gamma, prediction)
    if cfg.loss.high_noise_weight_cap:
        loss = loss * high_noise_weights(sched, timesteps, cfg.loss.high_noise_weight_cap, prediction)
    return loss


def fixed_noise_loss(base, latents: torch.Tensor, cond: dict, noise: torch.Tensor, timestep: int,
                     prediction: str) -> float:
    """The plain noise-prediction MSE at one given timestep with given noise (no weighting, no offset): one term of
    the validation loss, comparable across runs whatever their loss settings."""
    sched = base.noise_scheduler
    t = torch.full((latents.shape[0],), int(timestep), dtype=torch.long, device=latents.device)
    noisy = sched.add_noise(latents, noise, t)
    target = noise if prediction == "epsilon" else sched.get_velocity(latents, noise, t)
    return F.mse_loss(base.predict(noisy, t, cond).float(), target.float()).item()


def min_snr_weights(sched, timesteps: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """Min-SNR-gamma (Hang et al. 2023, eq. 9): weight min(SNR, gamma)/SNR; for v-prediction divide by SNR + 1."""
    alphas = sched.alphas_cumprod.to(timesteps.device)[timesteps]
    snr = alphas / (1 - alphas)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if prediction == "v_prediction" else clipped / snr


def high_noise_weights(sched, timesteps: torch.Tensor, cap: float, prediction: str) -> torch.Tensor:
    """Epsilon-loss weight min(1/alpha_bar, cap): the v-prediction loss equals the epsilon loss / alpha_bar.

    The plain epsilon loss is nearly blind to the high-noise steps (predicting noise from almost pure noise is
    easy), yet those decide a new shape; on the tiny model a LoRA trained without this barely changed the shape.
    A v-prediction loss already carries 1/alpha_bar, so there only the cap applies: min(1, cap * alpha_bar).
    """
    alphas = sched.alphas_cumprod.to(timesteps.device)[timesteps]
    weight = torch.clamp(1.0 / alphas, max=cap)
    return weight * alphas if prediction == "v_prediction" else weight
