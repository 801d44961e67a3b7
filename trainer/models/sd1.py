"""Stable Diffusion 1.x: one CLIP ViT-L text encoder (kohya prefix lora_te), 512 px, epsilon prediction."""
from __future__ import annotations

from pathlib import Path

from typing import TYPE_CHECKING

from .family import Family, TextEncoderSpec, text_encoder_modules
from .info import SD15_CONFIG_DIR
from .loading import (Fit, clip_keys, empty_models, load_component, noise_scheduler, refuse_inpainting, tokenizer,
                      vae_dtype)
from .schedulers import inference_scheduler

if TYPE_CHECKING:
    import torch

DEFAULT_CONFIG_DIR = SD15_CONFIG_DIR
UNET_KEY = "model.diffusion_model."


class SD1(Family):
    name = "sd1"
    label = "Stable Diffusion 1.x"
    text_encoder_specs = (TextEncoderSpec("lora_te", "text_encoder", "CLIP ViT-L"),)
    sd_scripts_versions = ("sd_v1",)
    pad_token = "<|endoftext|>"
    text_width = 768  # CLIP ViT-L; SD 2.x's OpenCLIP ViT-H is 1024 wide

    # ---- telling it apart ----------------------------------------------------------------------------------------
    def claims_folder(self, index: dict, unet_config: dict) -> bool:
        return "XL" not in str(index.get("_class_name", "")) and unet_config.get("cross_attention_dim") != 1024

    def claims_checkpoint(self, keys: set[str]) -> bool:
        return any(k.startswith(UNET_KEY) for k in keys) and any(k.startswith("cond_stage_model.transformer.")
                                                                 for k in keys)

    # ---- loading -------------------------------------------------------------------------------------------------
    def load_folder(self, folder: Path, *, dtype: torch.dtype, trust_pickle: bool,
                    options: dict | None = None) -> dict:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel
        load = dict(dtype=dtype, trust_pickle=trust_pickle, family_label=self.label)
        unet = load_component(folder, "unet", UNet2DConditionModel, **load)
        refuse_inpainting(unet.config.in_channels, folder / "unet", self.label)
        vae = load_component(folder, "vae", AutoencoderKL, **dict(load, dtype=vae_dtype(options, dtype)))
        text_encoder = load_component(folder, "text_encoder", CLIPTextModel, **load)
        return self.components({"unet": unet, "vae": vae, "text_encoder": text_encoder}, folder)

    def load_single_file(self, state_dict: dict, *, source: Path, config_dir: Path | None, dtype: torch.dtype,
                         prediction: str | None = None, options: dict | None = None) -> dict:
        """`prediction`: what a sidecar '<stem>.yaml' says (None without one)."""
        configs = config_dir or self.shipped_configs(state_dict, prediction)
        fit = Fit(source, configs, default_configs=config_dir is None, family_label=self.label)
        refuse_inpainting(unet_in_channels(state_dict), source, self.label)
        models = self.empty_unet_vae(state_dict, fit, configs, dtype, vae_dtype(options, dtype))
        models.update(self.load_text_encoders(state_dict, fit, configs, dtype))
        overrides = self.scheduler_overrides(state_dict)
        if prediction:
            overrides["prediction_type"] = prediction
        return self.components(models, configs, overrides)

    def shipped_configs(self, state_dict: dict, prediction: str | None) -> Path:
        return DEFAULT_CONFIG_DIR

    def scheduler_overrides(self, state_dict: dict) -> dict:
        return {}

    def empty_unet_vae(self, state_dict: dict, fit: Fit, configs: Path, dtype, vae_dtype) -> dict:
        """The UNet (in dtype) and the VAE (in vae_dtype) built from configs, holding the file's converted weights."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
        unet_config = fit.config(lambda: UNet2DConditionModel.load_config(configs, subfolder="unet"), "unet")
        vae_config = fit.config(lambda: AutoencoderKL.load_config(configs, subfolder="vae"), "vae")
        models = empty_models({"unet": lambda: UNet2DConditionModel.from_config(unet_config),
                               "vae": lambda: AutoencoderKL.from_config(vae_config)})
        fit.load(models["unet"], "UNet", fit.convert(lambda: convert_ldm_unet_checkpoint(state_dict, unet_config)),
                 dtype)
        fit.load(models["vae"], "VAE", fit.convert(lambda: convert_ldm_vae_checkpoint(state_dict, vae_config)),
                 vae_dtype)
        return models

    def load_text_encoders(self, state_dict: dict, fit: Fit, configs: Path, dtype) -> dict:
        """SD 1.x's CLIP ViT-L, stored under cond_stage_model.transformer. in transformers' own names."""
        from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
        from transformers import CLIPTextModel
        te = empty_clip(fit, configs, "text_encoder", CLIPTextModel)
        fit.load(te, "text encoder", clip_keys(fit.convert(lambda: convert_ldm_clip_checkpoint(state_dict)), te),
                 dtype)
        return {"text_encoder": te}

    def components(self, models: dict, config_dir: Path, scheduler_overrides: dict | None = None) -> dict:
        """The BaseModel fields, with tokenizers and the training scheduler read from `config_dir`."""
        tokenizers = {spec.prefix: tokenizer(config_dir, spec.component.replace("text_encoder", "tokenizer"),
                                             self.pad_token_of(spec)) for spec in self.text_encoder_specs}
        first = self.text_encoder_specs[0]
        return {"denoiser": models["unet"], "vae": models["vae"], "text_encoder": models[first.component],
                "tokenizer": tokenizers[first.prefix], "tokenizers": tokenizers,
                "noise_scheduler": noise_scheduler(config_dir, scheduler_overrides),
                "text_encoders": text_encoder_modules(models, self.text_encoder_specs)}

    def pad_token_of(self, spec: TextEncoderSpec) -> str:
        return self.pad_token

    # ---- conditioning --------------------------------------------------------------------------------------------
    def tokenize(self, tok, captions: list[str]) -> torch.LongTensor:
        """Ids padded to model_max_length (77) and truncated to it: SD always conditions on 77 positions."""
        return tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids

    def encode_text(self, base, captions: list[str]) -> dict[str, torch.Tensor]:
        """CLIP's last hidden state, without an attention mask, as SD 1.x was trained."""
        encoder = base.text_encoder
        ids = self.tokenize(base.tokenizer, captions).to(encoder.device)
        return {"encoder_hidden_states": encoder(ids).last_hidden_state}

    # ---- names, metadata, sampling, baking -------------------------------------------------------------------------
    def metadata(self, base) -> dict[str, str]:
        return {"ss_base_model_version": "sd_v1", "ss_v2": "False",
                "modelspec.architecture": "stable-diffusion-v1/lora", "modelspec.implementation": "diffusers"}

    def pipeline(self, base, scheduler=None):
        from diffusers import StableDiffusionPipeline
        pipe = StableDiffusionPipeline(
            vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.denoiser,
            scheduler=inference_scheduler(scheduler, base.noise_scheduler.config), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def original_checkpoint(self, base) -> dict[str, torch.Tensor]:
        from trainer.adapters.original_layout import original_checkpoint
        return original_checkpoint(base.denoiser, base.vae, base.text_encoder)

    def model_builders(self, config_dir: Path) -> dict:
        import functools
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
        unet_config = UNet2DConditionModel.load_config(config_dir, subfolder="unet")
        builders = {"denoiser": lambda: UNet2DConditionModel.from_config(unet_config)}
        for spec in self.text_encoder_specs:
            cls = CLIPTextModelWithProjection if spec.component == "text_encoder_2" else CLIPTextModel
            config = CLIPTextConfig.from_pretrained(config_dir, subfolder=spec.component)
            builders[spec.prefix] = functools.partial(cls, config)
        return builders

    def meta_config_dir(self, adapter_names: set[str] | None = None, metadata: dict | None = None) -> Path:
        return DEFAULT_CONFIG_DIR

    def pipeline_text_kwargs(self, text: dict, negative: dict | None, empty: dict | None = None) -> dict:
        """StableDiffusionPipeline's prompt_embeds; without a negative prompt its CFG encodes "" itself
        (diffusers pipeline_stable_diffusion.py:457), so the empty prompt's encoding stands in for that."""
        out = {"prompt_embeds": text["encoder_hidden_states"]}
        negative = negative if negative is not None else empty
        if negative is not None:
            out["negative_prompt_embeds"] = negative["encoder_hidden_states"]
        return out


def empty_clip(fit: Fit, configs: Path, sub: str, cls):
    """A CLIP text model of `cls` built on the meta device from configs/<sub>."""
    from transformers import CLIPTextConfig
    config = fit.config(lambda: CLIPTextConfig.from_pretrained(configs, subfolder=sub), sub)
    return empty_models({sub: lambda: cls(config)})[sub]


def unet_in_channels(state_dict: dict) -> int | None:
    conv_in = state_dict.get(UNET_KEY + "input_blocks.0.0.weight")
    return conv_in.shape[1] if conv_in is not None and conv_in.dim() == 4 else None


SD1_FAMILY = SD1()
