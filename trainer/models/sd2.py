"""Stable Diffusion 2.x: SD 1.x's UNet layout with an OpenCLIP ViT-H text encoder (1024 wide, 23 of its 24 layers:
SD 2 conditions on the penultimate one), 512-base predicting epsilon and 768-v predicting v."""
from __future__ import annotations

from pathlib import Path

from typing import TYPE_CHECKING

from .family import CONFIGS
from .loading import Fit, clip_keys
from .sd1 import SD1, UNET_KEY, empty_clip

if TYPE_CHECKING:
    import torch

OPEN_CLIP_KEY = "cond_stage_model.model."
BASE_GLOBAL_STEP = 875000  # the step count SD 2 base checkpoints carry (diffusers' rule for telling base from v)


class SD2(SD1):
    name = "sd2"
    label = "Stable Diffusion 2.x"
    sd_scripts_versions = ("sd_v2",)
    pad_token = "!"  # the OpenCLIP tokenizer pads with "!" (id 0)
    text_width = 1024

    def claims_folder(self, index: dict, unet_config: dict) -> bool:
        return "XL" not in str(index.get("_class_name", "")) and unet_config.get("cross_attention_dim") == 1024

    def claims_checkpoint(self, keys: set[str]) -> bool:
        return any(k.startswith(UNET_KEY) for k in keys) and any(k.startswith(OPEN_CLIP_KEY) for k in keys)

    def shipped_configs(self, state_dict: dict, prediction: str | None) -> Path:
        """768-v unless told otherwise: a '<stem>.yaml' beside the file decides; without one, diffusers' single-file
        rule (the 512 base checkpoints carry global_step 875000; every other SD 2 single file predicts v at 768 px).
        loss.prediction can still force either in training."""
        import torch
        if prediction is None:
            step = state_dict.get("global_step")
            is_base = step is not None and int(step.item() if torch.is_tensor(step) else step) == BASE_GLOBAL_STEP
            prediction = "epsilon" if is_base else "v_prediction"
        return CONFIGS / ("sd2-768-v" if prediction == "v_prediction" else "sd2-512")

    def load_text_encoders(self, state_dict: dict, fit: Fit, configs: Path, dtype) -> dict:
        """OpenCLIP ViT-H under cond_stage_model.model. (fused q/k/v), converted by diffusers to CLIP's layout."""
        from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
        from transformers import CLIPTextModel
        te = empty_clip(fit, configs, "text_encoder", CLIPTextModel)
        weights = clip_keys(fit.convert(lambda: convert_open_clip_checkpoint(te, state_dict, OPEN_CLIP_KEY)), te)
        fit.load(te, "text encoder", weights, dtype)
        return {"text_encoder": te}

    def metadata(self, base) -> dict[str, str]:
        v = base.prediction_type() == "v_prediction"
        return {"ss_base_model_version": "sd_v2_v" if v else "sd_v2", "ss_v2": "True",
                "modelspec.architecture": f"stable-diffusion-v2-{'768-v' if v else '512'}/lora",
                "modelspec.implementation": "diffusers"}

    def original_checkpoint(self, base) -> dict[str, torch.Tensor]:
        from trainer.adapters.original_layout import open_clip_to_original, unet_vae_to_original
        out = unet_vae_to_original(base.denoiser, base.vae)
        out.update({OPEN_CLIP_KEY + k: v for k, v in open_clip_to_original(base.text_encoder).items()})
        return out

    def meta_config_dir(self, adapter_names: set[str] | None = None, metadata: dict | None = None) -> Path:
        return CONFIGS / "sd2-768-v"


SD2_FAMILY = SD2()
