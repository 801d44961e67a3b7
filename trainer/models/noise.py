"""The noise process of a family: how a training point is drawn, how latents are noised, what the denoiser is asked
to predict, how each image's loss is weighted and which fixed points the validation loss is measured at.

`Family.noise_process(base, cfg)` picks one: `DdpmNoise` (SD 1.x/2.x/SDXL: discrete timesteps, epsilon or v) or
`FlowNoise` (rectified flow, SD3/FLUX). The loop, the validation loss and the losses module ask the process and
never branch on which one it is. Every draw of image i comes from gens[i] alone, so an image trains the same way
whichever batch, or process, it shares.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Draw:
    """One batch's training point: the noisy latents, the target, what the denoiser takes as its timestep and
    the per-image loss weights (factors applied one after the other, as the loss always applied them)."""
    noisy: torch.Tensor
    target: torch.Tensor
    timesteps: torch.Tensor
    weights: tuple[torch.Tensor, ...] = ()

    def weigh(self, loss: torch.Tensor) -> torch.Tensor:
        for weight in self.weights:  # in order: a product of the factors first would change the last bits
            loss = loss * weight
        return loss


class NoiseProcess:
    """The interface; `prediction` names what the denoiser predicts (recorded with the run)."""

    prediction = ""

    def draw(self, latents: torch.Tensor, gens: list[torch.Generator]) -> Draw:
        raise NotImplementedError

    def validation_points(self, count: int) -> list[tuple[int, float]]:
        """`count` fixed points inside the process, as (key, point): the key names the point in the validation
        events and seeds its fixed noise; the point is what fixed_noise_loss takes."""
        raise NotImplementedError

    def noised(self, latents: torch.Tensor, noise: torch.Tensor, point) -> Draw:
        """Latents noised at one fixed point for every image (no weighting, no offset)."""
        raise NotImplementedError

    def training_loss(self, base, latents: torch.Tensor, cond: dict, gens: list[torch.Generator]) -> torch.Tensor:
        """Per-image weighted loss [B] (the loop weights regularization images and reduces)."""
        draw = self.draw(latents, gens)
        pred = base.predict(draw.noisy, draw.timesteps, cond)
        loss = F.mse_loss(pred.float(), draw.target.float(), reduction="none").mean(dim=tuple(range(1, pred.ndim)))
        return draw.weigh(loss)

    def fixed_noise_loss(self, base, latents: torch.Tensor, cond: dict, noise: torch.Tensor, point) -> float:
        """The plain MSE at one fixed point with given noise: one term of the validation loss, comparable across
        runs whatever their loss settings."""
        draw = self.noised(latents, noise, point)
        return F.mse_loss(base.predict(draw.noisy, draw.timesteps, cond).float(), draw.target.float()).item()


# ---- DDPM (SD 1.x, 2.x, SDXL) ----------------------------------------------------------------------------------
def fixed_timesteps(num_train_timesteps: int, count: int) -> list[int]:
    """`count` evenly spaced timesteps inside (0, T): 4 of 1000 -> 200, 400, 600, 800."""
    return [round(num_train_timesteps * (k + 1) / (count + 1)) for k in range(count)]


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


class DdpmNoise(NoiseProcess):
    """Discrete-time diffusion through the model's DDPMScheduler (zero-terminal SNR included, as its config says):
    epsilon or v-prediction, noise offset, min-SNR-gamma or the high-noise cap. Per generator the draws are, in
    order: the noise, the offset (if any), the timestep."""

    def __init__(self, sched, prediction: str, loss_cfg):
        self.sched, self.prediction = sched, prediction
        self.noise_offset = loss_cfg.noise_offset
        self.min_snr_gamma, self.high_noise_cap = loss_cfg.min_snr_gamma, loss_cfg.high_noise_weight_cap

    def _target(self, latents, noise, timesteps):
        return noise if self.prediction == "epsilon" else self.sched.get_velocity(latents, noise, timesteps)

    def draw(self, latents: torch.Tensor, gens: list[torch.Generator]) -> Draw:
        noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in gens])
        if self.noise_offset:  # per-channel shift lets the model learn overall brightness (Guttenberg 2023)
            offsets = torch.stack([torch.randn((latents.shape[1], 1, 1), generator=g) for g in gens])
            noise = noise + self.noise_offset * offsets
        count = self.sched.config.num_train_timesteps
        timesteps = torch.cat([torch.randint(0, count, (1,), generator=g) for g in gens])
        noise, timesteps = noise.to(latents.device), timesteps.to(latents.device)
        weights = []
        if self.min_snr_gamma:
            weights.append(min_snr_weights(self.sched, timesteps, self.min_snr_gamma, self.prediction))
        if self.high_noise_cap:
            weights.append(high_noise_weights(self.sched, timesteps, self.high_noise_cap, self.prediction))
        return Draw(self.sched.add_noise(latents, noise, timesteps), self._target(latents, noise, timesteps),
                    timesteps, tuple(weights))

    def validation_points(self, count: int) -> list[tuple[int, float]]:
        return [(t, t) for t in fixed_timesteps(self.sched.config.num_train_timesteps, count)]

    def noised(self, latents: torch.Tensor, noise: torch.Tensor, point) -> Draw:
        t = torch.full((latents.shape[0],), int(point), dtype=torch.long, device=latents.device)
        return Draw(self.sched.add_noise(latents, noise, t), self._target(latents, noise, t), t)


# ---- rectified flow (SD3, FLUX) ----------------------------------------------------------------------------------
# Sigma sampling and weighting as the SD3 paper (Esser et al. 2024, sections 3.1 and 5.1) and diffusers'
# training_utils.compute_density_for_timestep_sampling / compute_loss_weighting_for_sd3 define them, drawn here
# from each image's own generator instead of one batch generator.
FLOW_TIMESTEPS = 1000  # FlowMatchEulerDiscreteScheduler: timesteps = sigmas * num_train_timesteps (1000)
MIN_SIGMA = 1 / FLOW_TIMESTEPS  # the scheduler's smallest level: a drawn 0 (torch.rand can give one) would weigh
# sigma_sqrt's 1/sigma^2 infinitely, and mode sampling near u = 1 gives levels below any the model ever sees


def sample_sigma(gen: torch.Generator, scheme: str, logit_mean: float = 0.0, logit_std: float = 1.0,
                 mode_scale: float = 1.29) -> torch.Tensor:
    """One sigma in (0, 1) [1] from `gen`: logit_normal (sigmoid of N(mean, std)), mode (the paper's eq. 20, a
    heavier middle for mode_scale > 0) or uniform."""
    if scheme == "logit_normal":
        return torch.sigmoid(torch.normal(logit_mean, logit_std, (1,), generator=gen))
    u = torch.rand((1,), generator=gen)
    if scheme == "mode":
        return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """The timestep shift (SD3 paper eq. 23; FlowMatchEulerDiscreteScheduler's): shift s / (1 + (shift - 1) s);
    above 1 moves the training points towards noise."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flow_weights(sigmas: torch.Tensor, scheme: str) -> torch.Tensor:
    """Per-image loss weights: none (1), sigma_sqrt (sigma^-2) or cosmap (2 / (pi (1 - 2s + 2s^2)))."""
    if scheme == "sigma_sqrt":
        return (sigmas ** -2.0).float()
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas ** 2))
    return torch.ones_like(sigmas)


def token_shift(loss_cfg, scheduler_config, patch: int) -> FlowNoise:
    """FlowNoise for FLUX's families: loss.flow_shift, or with loss.resolution_shift the shift of each image's token
    count (latent pixels / patch^2) from the scheduler config's base/max sequence lengths and shifts, as
    FluxPipeline's calculate_shift takes them (FLUX's defaults where the config has none)."""
    c = scheduler_config
    dynamic = (c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5),
               c.get("max_shift", 1.15))
    return FlowNoise(loss_cfg, resolution_shift=dynamic if loss_cfg.resolution_shift else None, patch=patch)


class FlowNoise(NoiseProcess):
    """Rectified flow: x_t = (1 - s) x_0 + s e, the target is the velocity e - x_0, and the denoiser's timestep is
    s x 1000. Per generator the draws are, in order: the noise, then the sigma."""

    prediction = "flow"

    def __init__(self, loss_cfg, resolution_shift: tuple | None = None, patch: int = 1):
        """`resolution_shift`: (base_seq_len, max_seq_len, base_shift, max_shift) of the model's scheduler, to shift
        each image by its token count (latent pixels / patch^2) instead of by loss.flow_shift (FLUX)."""
        self.cfg, self.resolution_shift, self.patch = loss_cfg, resolution_shift, patch

    def _shift(self, latents: torch.Tensor) -> float:
        if self.resolution_shift is None:
            return self.cfg.flow_shift
        base_len, max_len, base_shift, max_shift = self.resolution_shift
        tokens = latents.shape[-2] * latents.shape[-1] // self.patch ** 2
        mu = base_shift + (max_shift - base_shift) * (tokens - base_len) / (max_len - base_len)  # diffusers'
        return math.exp(mu)  # calculate_shift, as FluxPipeline's scheduler takes it (time_shift with sigma 1)

    @staticmethod
    def _expand(sigmas: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        return sigmas.to(latents.device, latents.dtype).view(-1, *[1] * (latents.ndim - 1))

    def _at(self, latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> Draw:
        s = self._expand(sigmas, latents)
        return Draw((1 - s) * latents + s * noise, noise - latents, (sigmas * FLOW_TIMESTEPS).to(latents.device))

    def draw(self, latents: torch.Tensor, gens: list[torch.Generator]) -> Draw:
        c = self.cfg
        noise, sigmas = [], []
        for g in gens:
            noise.append(torch.randn(latents.shape[1:], generator=g))
            sigmas.append(sample_sigma(g, c.timestep_sampling, c.logit_mean, c.logit_std, c.mode_scale))
        sigmas = shift_sigmas(torch.cat(sigmas), self._shift(latents)).clamp(MIN_SIGMA, 1.0)
        draw = self._at(latents, torch.stack(noise).to(latents.device), sigmas)
        if c.flow_weighting != "none":
            draw.weights = (flow_weights(sigmas, c.flow_weighting).to(latents.device),)
        return draw

    def validation_points(self, count: int) -> list[tuple[int, float]]:
        sigmas = [(k + 1) / (count + 1) for k in range(count)]
        return [(round(s * FLOW_TIMESTEPS), s) for s in sigmas]

    def noised(self, latents: torch.Tensor, noise: torch.Tensor, point) -> Draw:
        return self._at(latents, noise, torch.full((latents.shape[0],), float(point)))
