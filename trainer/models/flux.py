"""FLUX.1 (dev, schnell): a rectified-flow transformer of double-stream and single-stream blocks (Black Forest Labs
2024). As diffusers' FluxPipeline builds its inputs: CLIP-L's pooled output (no projection) and T5-XXL's last hidden
states condition it; 16-channel latents, scaled and shifted by the VAE's config, enter packed as 2x2 patches
(64 features per token) with image and text position ids; dev takes the guidance value through an embedding
instead of classifier-free guidance, and its timestep is sigma (0..1), not sigma x 1000.
"""
from __future__ import annotations

from pathlib import Path

from typing import TYPE_CHECKING

from .family import CONFIGS, Family, FusedName, TextEncoderSpec, size_problems, text_encoder_modules
from .loading import load_component, vae_dtype
from .single_files import FromSingleFiles
from .sd3 import (CLIP_LENGTH, T5_GROUPS, flow_scheduler, inference_scheduler, t5_length, t5_tokenizer,
                  with_t5_length)

if TYPE_CHECKING:
    import torch

CONFIG_DIR = CONFIGS / "flux1-dev"
# diffusers' FluxTransformer2DModel names; a group's names are module-path suffixes, so attention takes the
# single blocks' q/k/v as well (their output is proj_out, shared with the MLP: the single_blocks group)
TRANSFORMER_GROUPS = {
    "attention": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"],
    "feed_forward": ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"],
    "single_blocks": ["proj_mlp", "proj_out"],
    "adaln": ["norm1.linear", "norm1_context.linear", "norm.linear"],
}
BFL_TRANSFORMER_KEYS = ("double_blocks.", "model.diffusion_model.double_blocks.")
TRAIN_GUIDANCE = 1.0  # sd-scripts trains dev LoRAs at guidance 1.0 (--guidance_scale, field notes)


class Flux(FromSingleFiles, Family):
    name = "flux"
    label = "FLUX.1"
    text_encoder_specs = (TextEncoderSpec("lora_te1", "text_encoder", "CLIP-L"),
                          TextEncoderSpec("lora_te3", "text_encoder_2", "T5-XXL", groups=T5_GROUPS,
                                          trains_by_default=False, kind="t5"))
    unet_groups = TRANSFORMER_GROUPS
    excluded_targets = ("proj_out",)  # the final layer's, which single_blocks' proj_out would also take
    block_lists = ("transformer_blocks", "single_transformer_blocks")  # double-stream, then single
    denoiser_component = "transformer"
    denoiser_label = "transformer"
    diffusers_alpha_folded = True
    # kohya's layout loads in ComfyUI, Forge and diffusers (its kohya converter): the default (field notes)
    layouts = {"kohya": "ComfyUI, Forge and diffusers", "diffusers": "diffusers and ComfyUI"}
    sample_defaults = {"sampling.steps": 28, "sampling.guidance": 3.5}  # FluxPipeline's for dev
    # schnell is distilled to 4 steps without guidance (diffusers' pipeline_flux.py example, l. 62-67)
    schnell_sample_defaults = {"sampling.steps": 4, "sampling.guidance": 0.0}

    # ---- telling it apart ----------------------------------------------------------------------------------------
    def claims_folder(self, index: dict, unet_config: dict) -> bool:
        return str(index.get("_class_name", "")) == "FluxPipeline"

    def claims_checkpoint(self, keys: set[str]) -> bool:
        return any(k.startswith(BFL_TRANSFORMER_KEYS) for k in keys)

    def claims_metadata(self, metadata: dict) -> bool:
        return metadata.get("modelspec.architecture", "").startswith("flux-1") or \
            metadata.get("ss_base_model_version", "").startswith("flux")

    def claims_adapter(self, names: set[str]) -> bool:
        """FLUX's single-stream blocks in BFL's, diffusers' or OneTrainer's names."""
        return any(n.startswith(("lora_unet_single_blocks_", "lora_unet_double_blocks_",
                                 "lora_unet_single_transformer_blocks_",
                                 "lora_transformer_single_transformer_blocks_")) for n in names)

    def model_problems(self, cfg, source: Path) -> list[str]:
        problems = size_problems(cfg, 16, "the VAE's factor 8 times the 2x2 packing", self.label)
        if cfg.model.t5_length == 0:
            problems.append("model.t5_length is 0, but FLUX conditions on T5 and cannot leave it out; set it to "
                            "256 (schnell) or 512 (dev)")
        if source.is_file() and source.suffix.lower() == ".safetensors":
            from trainer.config import model_options
            from .flux_files import file_problems
            from .info import sidecar_config_dir
            problems += file_problems(source, model_options(cfg), sidecar_config_dir(source))
        return problems

    def sample_defaults_of(self, config_folder: Path | None) -> dict:
        """dev's or schnell's, from the transformer config's guidance embedding (torch-free: info.py asks)."""
        import json
        try:
            config = json.loads((config_folder / "transformer" / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError, TypeError):
            return dict(self.sample_defaults)
        return dict(self.sample_defaults if config.get("guidance_embeds", True) else self.schnell_sample_defaults)

    # ---- loading -------------------------------------------------------------------------------------------------
    def load_folder(self, folder: Path, *, dtype: torch.dtype, trust_pickle: bool,
                    options: dict | None = None) -> dict:
        from diffusers import AutoencoderKL, FluxTransformer2DModel
        from transformers import CLIPTextModel, T5EncoderModel
        load = dict(dtype=dtype, trust_pickle=trust_pickle, family_label=self.label)
        models = {"transformer": load_component(folder, "transformer", FluxTransformer2DModel, **load),
                  "vae": load_component(folder, "vae", AutoencoderKL, **dict(load, dtype=vae_dtype(options, dtype))),
                  "text_encoder": load_component(folder, "text_encoder", CLIPTextModel, **load),
                  "text_encoder_2": load_component(folder, "text_encoder_2", T5EncoderModel, **load)}
        return self.components(models, folder)

    def _files(self):
        """The module that reads this family's single files (FromSingleFiles)."""
        from . import flux_files
        return flux_files

    def components(self, models: dict, config_dir: Path) -> dict:
        from .loading import tokenizer
        tokenizers = {"lora_te1": tokenizer(config_dir, "tokenizer", "<|endoftext|>"),
                      "lora_te3": t5_tokenizer(config_dir, "tokenizer_2")}
        return {"denoiser": models["transformer"], "vae": models["vae"], "text_encoder": models["text_encoder"],
                "tokenizer": tokenizers["lora_te1"], "tokenizers": tokenizers,
                "noise_scheduler": flow_scheduler(config_dir),
                "text_encoders": text_encoder_modules(models, self.text_encoder_specs)}

    # ---- conditioning --------------------------------------------------------------------------------------------
    def encode_text(self, base, captions: list[str]) -> dict[str, torch.Tensor]:
        clip, tok = base.text_encoders["lora_te1"], base.tokenizers["lora_te1"]
        ids = tok(captions, padding="max_length", max_length=CLIP_LENGTH, truncation=True,
                  return_tensors="pt").input_ids
        pooled = clip(ids.to(clip.device), output_hidden_states=False).pooler_output
        t5, tok5 = base.text_encoders["lora_te3"], base.tokenizers["lora_te3"]
        ids = tok5(captions, padding="max_length", max_length=t5_length(base), truncation=True,
                   return_tensors="pt").input_ids
        return {"encoder_hidden_states": t5(ids.to(t5.device), output_hidden_states=False)[0],
                "pooled_projections": pooled.to(t5.device)}

    def predict(self, base, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
        """Packed in, unpacked out: the loss is taken on latents of the VAE's shape, as for every family."""
        import torch
        dtype, (b, c, h, w) = base.dtype, noisy.shape
        packed = noisy.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)
        text = cond["encoder_hidden_states"].to(dtype)
        guidance = None
        if base.denoiser.config.guidance_embeds:  # dev: the value the guidance embedding trains at (loss field)
            guidance = torch.full((b,), float(base.options.get("train_guidance", TRAIN_GUIDANCE)), device=noisy.device)
        out = base.denoiser(hidden_states=packed.to(dtype), timestep=timesteps / 1000, guidance=guidance,
                            pooled_projections=cond["pooled_projections"].to(dtype), encoder_hidden_states=text,
                            txt_ids=torch.zeros(text.shape[1], 3, device=noisy.device, dtype=dtype),
                            img_ids=image_ids(h // 2, w // 2, noisy.device, dtype), return_dict=False)[0]
        return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)

    def noise_process(self, base, cfg):
        """Rectified flow; loss.resolution_shift shifts each image's noise levels by its token count as
        FluxPipeline's scheduler does (mu linear in the token count, shift = e^mu)."""
        from .noise import token_shift
        return token_shift(cfg.loss, base.noise_scheduler.config, patch=2)


    # ---- names, metadata, sampling -------------------------------------------------------------------------------
    def kohya_file_layout(self, index: dict) -> list[FusedName]:
        from .flux_layout import kohya_file_layout
        double, single = block_counts(path for _, path, _ in index.values())
        return kohya_file_layout(index, double, single)

    def kohya_file_parts(self, names, metadata: dict | None = None) -> list[FusedName]:
        from .flux_layout import file_parts
        return file_parts(names, None, None)

    def metadata(self, base) -> dict[str, str]:
        """As sd-scripts' flux_train_network writes (ss_base_model_version flux1, SAI's flux-1-dev architecture)."""
        variant = "dev" if base.denoiser.config.guidance_embeds else "schnell"
        return {"ss_base_model_version": "flux1", "ss_v2": "False",
                "modelspec.architecture": f"flux-1-{variant}/lora",
                "modelspec.implementation": "https://github.com/black-forest-labs/flux"}

    def pipeline(self, base, scheduler=None):
        from diffusers import FluxPipeline
        pipe = with_t5_length(FluxPipeline)(
            scheduler=inference_scheduler(scheduler, base.noise_scheduler.config), vae=base.vae,
            text_encoder=base.text_encoders["lora_te1"], tokenizer=base.tokenizers["lora_te1"],
            text_encoder_2=base.text_encoders["lora_te3"], tokenizer_2=base.tokenizers["lora_te3"],
            transformer=base.denoiser)
        pipe.t5_length = t5_length(base)  # FluxPipeline's own default is 512 whatever the model trains with
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def original_checkpoint(self, base) -> dict[str, torch.Tensor]:
        """A checkpoint as ComfyUI saves FLUX: the transformer in BFL's names under model.diffusion_model., the
        VAE and the text encoders (with a text-encoder LoRA baked in) beside it (flux_files.PARTS' prefixes)."""
        from .flux_files import PARTS
        from .flux_layout import ORIGINAL_PREFIX, transformer_to_original
        from .sd3_bake import parts_to_original
        out = transformer_to_original(base.denoiser.state_dict(), base.denoiser.config, prefix=ORIGINAL_PREFIX)
        out.update(parts_to_original(base, PARTS))
        return out

    def model_builders(self, config_dir: Path) -> dict:
        import functools
        from diffusers import FluxTransformer2DModel
        from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel
        config = FluxTransformer2DModel.load_config(config_dir, subfolder="transformer")
        return {"denoiser": lambda: FluxTransformer2DModel.from_config(config),
                "lora_te1": functools.partial(CLIPTextModel,
                                              CLIPTextConfig.from_pretrained(config_dir, subfolder="text_encoder")),
                "lora_te3": functools.partial(T5EncoderModel,
                                              T5Config.from_pretrained(config_dir, subfolder="text_encoder_2"))}

    def meta_config_dir(self, adapter_names: set[str] | None = None, metadata: dict | None = None) -> Path:
        schnell = (metadata or {}).get("modelspec.architecture", "").startswith("flux-1-schnell")
        return CONFIGS / ("flux1-schnell" if schnell else "flux1-dev")

    def pipeline_text_kwargs(self, text: dict, negative: dict | None, empty: dict | None = None) -> dict:
        """FluxPipeline's prompt_embeds (T5) and pooled_prompt_embeds (CLIP's pooler output). No negative: FLUX.1
        is guidance-distilled, and FluxPipeline uses a negative prompt only for true CFG, true_cfg_scale > 1
        (pipeline_flux.py:768-771), which samples never set; passing one would change nothing."""
        return {"prompt_embeds": text["encoder_hidden_states"], "pooled_prompt_embeds": text["pooled_projections"]}


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """(row, column) position ids of h x w packed tokens, as FluxPipeline._prepare_latent_image_ids."""
    import torch
    ids = torch.zeros(h, w, 3)
    ids[..., 1] += torch.arange(h)[:, None]
    ids[..., 2] += torch.arange(w)[None, :]
    return ids.reshape(h * w, 3).to(device=device, dtype=dtype)


def block_counts(paths) -> tuple[int, int]:
    """(double, single) block counts from a model's module paths."""
    double, single = {-1}, {-1}
    for path in paths:
        parts = path.split(".")
        if parts[0] == "transformer_blocks":
            double.add(int(parts[1]))
        elif parts[0] == "single_transformer_blocks":
            single.add(int(parts[1]))
    return max(double) + 1, max(single) + 1


FLUX_FAMILY = Flux()
