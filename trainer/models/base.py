"""The loaded base model and the one error type of `trainer.models`.

`BaseModel` holds the frozen components; what differs between families (how captions become the UNet's
conditioning, which pipeline samples from it) is delegated to the family module named by `family`, so SDXL/SD2
only add a module beside `sd1.py`.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType

import torch

from .errors import ModelLoadError

# family name -> module implementing it (see sd1.py for the functions a family module provides)
FAMILY_MODULES = {"sd1": "trainer.models.sd1"}


def family_module(family: str) -> ModuleType:
    if family not in FAMILY_MODULES:
        raise ModelLoadError(f"unknown model family {family!r}; supported: {', '.join(FAMILY_MODULES)} "
                             f"(or 'auto' to read it from the model)")
    return importlib.import_module(FAMILY_MODULES[family])


@dataclass
class BaseModel:
    family: str
    unet: torch.nn.Module  # diffusers UNet2DConditionModel
    vae: torch.nn.Module  # diffusers AutoencoderKL
    text_encoder: torch.nn.Module  # transformers CLIPTextModel
    tokenizer: object  # transformers CLIPTokenizer
    noise_scheduler: object  # diffusers DDPMScheduler, built from the model's scheduler config
    source: str  # the resolved path or hub id
    text_encoders: dict[str, torch.nn.Module] = field(default_factory=dict)  # kohya prefix -> module

    def _family(self) -> ModuleType:
        return family_module(self.family)

    def tokenize(self, captions: list[str]) -> torch.LongTensor:
        """Token ids padded to the tokenizer's model_max_length and truncated to it."""
        return self._family().tokenize(self, captions)

    def encode_text(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """The UNet's encoder_hidden_states for these ids (gradients flow when the text encoder trains)."""
        return self._family().encode_text(self, input_ids)

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, conditioning) -> torch.Tensor:
        """The UNet's prediction for noisy latents under `conditioning` (what encode_text returned).
        SDXL will add its pooled embeddings and size/crop ids here, so the training loop stays family-free."""
        return self._family().predict(self, noisy_latents, timesteps, conditioning)

    def pipeline(self, scheduler=None):
        """An inference pipeline sharing these very modules (no copy), no safety checker, progress bar off.

        `scheduler`: None (DPM-Solver++ from the model's scheduler config), a name ("dpmsolver", "ddim",
        "euler", "euler_a") or a diffusers scheduler instance.
        """
        return self._family().pipeline(self, scheduler)

    @property
    def native_resolution(self) -> int:
        """The image side the model was trained at (512 for SD 1.5, the tiny model's own)."""
        from .info import native_size
        return native_size(self.unet.config, self.vae.config)

    def prediction_type(self) -> str:
        """"epsilon" or "v_prediction", as the model's scheduler config says."""
        return self.noise_scheduler.config.prediction_type

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype
