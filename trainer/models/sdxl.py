"""SDXL: two text encoders (CLIP ViT-L as lora_te1, OpenCLIP bigG as lora_te2), size and crop micro-conditioning,
1024 px, kohya names in the original (SGM) UNet layout. Podell et al. 2023, "SDXL", sections 2.1-2.2.

Conditioning: the penultimate hidden states of both encoders joined on the feature axis (768 + 1280 = 2048) for
cross-attention; the second encoder's pooled, projected output and the six size/crop numbers (original height and
width, crop top and left, target height and width) for the added time embedding.
"""
from __future__ import annotations

from pathlib import Path

from typing import TYPE_CHECKING

from .errors import ModelLoadError
from .family import CONFIGS, SizeInfo, TextEncoderSpec
from .loading import Fit, clip_keys, load_component, refuse_inpainting, vae_dtype
from .schedulers import inference_scheduler
from .sd1 import SD1, empty_clip, unet_in_channels

if TYPE_CHECKING:
    import torch

CLIP_KEY = "conditioner.embedders.0.transformer."
OPEN_CLIP_KEY = "conditioner.embedders.1.model."
REFINER_KEY = "conditioner.embedders.0.model."  # the refiner has only an OpenCLIP encoder, as embedders.0
CONFIG_DIR = CONFIGS / "sdxl"


class SDXL(SD1):
    name = "sdxl"
    label = "SDXL"
    text_encoder_specs = (TextEncoderSpec("lora_te1", "text_encoder", "CLIP ViT-L"),
                          TextEncoderSpec("lora_te2", "text_encoder_2", "OpenCLIP bigG"))
    original_unet_names = True
    sd_scripts_versions = ("sdxl",)

    # ---- telling it apart ----------------------------------------------------------------------------------------
    def claims_folder(self, index: dict, unet_config: dict) -> bool:
        return "XL" in str(index.get("_class_name", ""))

    def claims_checkpoint(self, keys: set[str]) -> bool:
        return any(k.startswith(("conditioner.embedders.", "conditioner.")) for k in keys)

    def claims_adapter(self, names: set[str]) -> bool:
        """Two CLIP encoders (lora_te1, lora_te2), or kohya's SGM UNet names."""
        return any(n.startswith(("lora_te1_", "lora_te2_", "lora_unet_input_blocks", "lora_unet_middle_block",
                                 "lora_unet_output_blocks")) for n in names)

    # ---- loading -------------------------------------------------------------------------------------------------
    def refuse_folder(self, folder: Path) -> None:
        _refuse_refiner_folder(folder)

    def load_folder(self, folder: Path, *, dtype: torch.dtype, trust_pickle: bool,
                    options: dict | None = None) -> dict:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection
        _refuse_refiner_folder(folder)
        load = dict(dtype=dtype, trust_pickle=trust_pickle, family_label=self.label)
        unet = load_component(folder, "unet", UNet2DConditionModel, **load)
        refuse_inpainting(unet.config.in_channels, folder / "unet", self.label)
        vae = load_component(folder, "vae", AutoencoderKL, **dict(load, dtype=vae_dtype(options, dtype)))
        models = {"unet": unet, "vae": vae,
                  "text_encoder": load_component(folder, "text_encoder", CLIPTextModel, **load),
                  "text_encoder_2": load_component(folder, "text_encoder_2", CLIPTextModelWithProjection, **load)}
        return self.components(models, folder)

    def load_single_file(self, state_dict: dict, *, source: Path, config_dir: Path | None, dtype: torch.dtype,
                         prediction: str | None = None, options: dict | None = None) -> dict:
        if any(k.startswith(REFINER_KEY) for k in state_dict):
            raise ModelLoadError(f"{source} is an SDXL refiner (one OpenCLIP text encoder, no CLIP ViT-L); LoRAs "
                                 f"are trained on the SDXL base model or its derivatives: give one of those")
        refuse_inpainting(unet_in_channels(state_dict), source, self.label)
        return super().load_single_file(state_dict, source=source, config_dir=config_dir, dtype=dtype,
                                        prediction=prediction, options=options)

    def shipped_configs(self, state_dict: dict, prediction: str | None) -> Path:
        return CONFIG_DIR

    def scheduler_overrides(self, state_dict: dict) -> dict:
        """v-prediction releases (NoobAI's) carry a `v_pred` key, and `ztsnr` when trained with zero terminal SNR
        (Lin et al. 2023): the keys ComfyUI reads too."""
        overrides = {}
        if "v_pred" in state_dict:
            overrides["prediction_type"] = "v_prediction"
        if "ztsnr" in state_dict:
            overrides.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
        return overrides

    def load_text_encoders(self, state_dict: dict, fit: Fit, configs: Path, dtype) -> dict:
        from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
        from transformers import CLIPTextModel, CLIPTextModelWithProjection
        te1 = empty_clip(fit, configs, "text_encoder", CLIPTextModel)
        te2 = empty_clip(fit, configs, "text_encoder_2", CLIPTextModelWithProjection)
        first = {k: v for k, v in state_dict.items() if k.startswith(CLIP_KEY)}
        fit.load(te1, "first text encoder (CLIP ViT-L)",
                 clip_keys(fit.convert(lambda: convert_ldm_clip_checkpoint(first, CLIP_KEY)), te1), dtype)
        fit.load(te2, "second text encoder (OpenCLIP bigG)",
                 clip_keys(fit.convert(lambda: convert_open_clip_checkpoint(te2, state_dict, OPEN_CLIP_KEY)), te2),
                 dtype)
        return {"text_encoder": te1, "text_encoder_2": te2}

    def pad_token_of(self, spec: TextEncoderSpec) -> str:
        return "<|endoftext|>" if spec.prefix == "lora_te1" else "!"

    # ---- conditioning --------------------------------------------------------------------------------------------
    def encode_text(self, base, captions: list[str]) -> dict[str, torch.Tensor]:
        import torch
        hidden, pooled = [], None
        for spec in self.text_encoder_specs:
            encoder, tok = base.text_encoders[spec.prefix], base.tokenizers[spec.prefix]
            out = encoder(self.tokenize(tok, captions).to(encoder.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # the penultimate layer, as SDXL was trained
            pooled = out.text_embeds if hasattr(out, "text_embeds") else pooled
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled}

    def conditioning(self, base, text: dict[str, torch.Tensor], sizes: list[SizeInfo]) -> dict[str, torch.Tensor]:
        return {**text, "time_ids": time_ids(sizes).to(text["text_embeds"].device)}

    def predict(self, base, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
        dtype = base.dtype  # read once (BaseModel.frozen_dtype)
        added = {"text_embeds": cond["text_embeds"].to(dtype), "time_ids": cond["time_ids"].to(dtype)}
        return base.denoiser(noisy.to(dtype), timesteps, cond["encoder_hidden_states"].to(dtype),
                         added_cond_kwargs=added).sample

    # ---- names, metadata, sampling, baking -------------------------------------------------------------------------
    def kohya_unet_path(self, path: str, unet_config) -> str:
        """kohya's SDXL trainer names UNet modules in the original (SGM) layout; the same map writes single files."""
        from trainer.adapters.original_layout import unet_original_path
        return unet_original_path(path, unet_config)

    def metadata(self, base) -> dict[str, str]:
        return {"ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False",
                "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
                "modelspec.implementation": "https://github.com/Stability-AI/generative-models"}

    def pipeline(self, base, scheduler=None):
        from diffusers import StableDiffusionXLPipeline
        pipe = StableDiffusionXLPipeline(
            vae=base.vae, text_encoder=base.text_encoders["lora_te1"], text_encoder_2=base.text_encoders["lora_te2"],
            tokenizer=base.tokenizers["lora_te1"], tokenizer_2=base.tokenizers["lora_te2"], unet=base.denoiser,
            scheduler=inference_scheduler(scheduler, base.noise_scheduler.config), force_zeros_for_empty_prompt=True,
            add_watermarker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def original_checkpoint(self, base) -> dict[str, torch.Tensor]:
        import torch
        from trainer.adapters.original_layout import open_clip_to_original, text_encoder_to_original, \
            unet_vae_to_original
        out = unet_vae_to_original(base.denoiser, base.vae)
        te1, te2 = base.text_encoders["lora_te1"], base.text_encoders["lora_te2"]
        out.update({CLIP_KEY + k: v for k, v in text_encoder_to_original(te1.state_dict()).items()
                    if not k.endswith("position_ids")})
        out.update({OPEN_CLIP_KEY + k: v for k, v in open_clip_to_original(te2).items()})
        if base.prediction_type() == "v_prediction":  # the markers ComfyUI and this loader read back
            out["v_pred"] = torch.tensor([])
        if base.noise_scheduler.config.get("rescale_betas_zero_snr"):
            out["ztsnr"] = torch.tensor([])
        return out

    def meta_config_dir(self, adapter_names: set[str] | None = None, metadata: dict | None = None) -> Path:
        return CONFIG_DIR

    def pipeline_text_kwargs(self, text: dict, negative: dict | None, empty: dict | None = None) -> dict:
        """StableDiffusionXLPipeline's prompt_embeds and pooled_prompt_embeds (encode_text's text_embeds: CLIP-G's
        projection, as the pipeline pools, pipeline_stable_diffusion_xl.py:411). Without a negative prompt `empty`
        is not used: pipeline() sets force_zeros_for_empty_prompt, so the pipeline's negative is zeros (:424)."""
        out = {"prompt_embeds": text["encoder_hidden_states"], "pooled_prompt_embeds": text["text_embeds"]}
        if negative is not None:
            out.update(negative_prompt_embeds=negative["encoder_hidden_states"],
                       negative_pooled_prompt_embeds=negative["text_embeds"])
        return out


def time_ids(sizes: list[SizeInfo]) -> torch.Tensor:
    """[original h, w, crop top, left, target h, w] per image, as SDXL's added time embedding takes them."""
    import torch
    return torch.tensor([[*s.original_hw, *s.crop_top_left, *s.target_hw] for s in sizes], dtype=torch.float32)


def _refuse_refiner_folder(folder: Path) -> None:
    from .detect import read_json
    index = read_json(folder / "model_index.json")
    if "Img2Img" in str(index.get("_class_name", "")) or index.get("text_encoder", [None])[0] is None:
        raise ModelLoadError(f"{folder} is an SDXL refiner (or img2img) pipeline; LoRAs are trained on the SDXL "
                             f"base model or its derivatives: give one of those")


SDXL_FAMILY = SDXL()
