"""Stable Diffusion 3 and 3.5 (Medium, Large, Large Turbo): an MMDiT transformer trained with rectified flow.
Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis".

Text: CLIP-L (lora_te1) and CLIP-G (lora_te2), both with projections, and T5-XXL (lora_te3). As diffusers'
StableDiffusion3Pipeline.encode_prompt builds it: the two CLIPs' penultimate hidden states (77 tokens) are joined on
the feature axis, zero-padded to T5's width and put in front of T5's states on the sequence axis; the pooled
conditioning is both CLIPs' projected outputs joined. Without T5 its part is zeros (SD3 was trained with T5 dropped
at times, section 5.3.3 of the paper). Latents have 16 channels, scaled and shifted by the VAE's config.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path

from typing import TYPE_CHECKING

from .family import CONFIGS, Family, FusedName, TextEncoderSpec, size_problems, text_encoder_modules
from .loading import guarded, load_component, vae_dtype
from .sd3_files import DEFAULT_T5_LENGTH, uses_t5
from .single_files import FromSingleFiles

if TYPE_CHECKING:
    import torch

CONFIG_DIR = CONFIGS / "sd35-medium"
# SD3's target groups (diffusers' SD3Transformer2DModel names; a group's names are module-path suffixes, so
# attention also takes SD 3.5 Medium's second attention (attn2) of its dual-attention blocks)
TRANSFORMER_GROUPS = {
    "attention": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"],
    "feed_forward": ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"],
    "adaln": ["norm1.linear", "norm1_context.linear"],
}
T5_GROUPS = {"attention": ["q", "k", "v", "o"], "mlp": ["wi_0", "wi_1", "wo"]}
CLIP_LENGTH = 77
SAI_TRANSFORMER_KEY = "model.diffusion_model."


class SD3(FromSingleFiles, Family):
    name = "sd3"
    label = "Stable Diffusion 3 / 3.5"
    text_encoder_specs = (TextEncoderSpec("lora_te1", "text_encoder", "CLIP-L"),
                          TextEncoderSpec("lora_te2", "text_encoder_2", "CLIP-G"),
                          TextEncoderSpec("lora_te3", "text_encoder_3", "T5-XXL", groups=T5_GROUPS,
                                          trains_by_default=False, kind="t5"))
    unet_groups = TRANSFORMER_GROUPS
    block_lists = ("transformer_blocks",)
    denoiser_component = "transformer"
    denoiser_label = "transformer"
    diffusers_alpha_folded = True  # ComfyUI and A1111 read this layout without diffusers' config: scale 1
    # no one layout loads everywhere (field notes: diffusers has no converter for sd-scripts' SD3 names, sd-scripts
    # #2103; Forge reads only those); diffusers' loads in the most programs, so it is the default
    layouts = {"diffusers": "diffusers, ComfyUI and A1111", "kohya": "ComfyUI and Forge"}
    writes_every_layout = True
    # SAI's recommended settings for SD 3.5 (its model cards: 28 to 40 steps, CFG 3.5 to 4.5); diffusers' pipeline
    # defaults to 28 steps at 7.0, which oversaturates 3.5
    sample_defaults = {"sampling.steps": 28, "sampling.guidance": 4.5}

    # ---- telling it apart ----------------------------------------------------------------------------------------
    def claims_folder(self, index: dict, unet_config: dict) -> bool:
        return str(index.get("_class_name", "")).startswith("StableDiffusion3")

    def claims_checkpoint(self, keys: set[str]) -> bool:
        return any(k.startswith(SAI_TRANSFORMER_KEY + "joint_blocks.") for k in keys)

    def claims_metadata(self, metadata: dict) -> bool:
        """sd-scripts writes the MMDiT's model type (medium, 5-medium, 5-large) and SAI's stable-diffusion-3-*."""
        return metadata.get("ss_base_model_version", "") in VARIANT_LAYERS or \
            metadata.get("modelspec.architecture", "").startswith("stable-diffusion-3")

    def claims_adapter(self, names: set[str]) -> bool:
        """T5 (lora_te3), or the MMDiT's blocks in SAI's, diffusers' or OneTrainer's names. (FLUX's transformer
        also has transformer_blocks: its family, checked first, claims its own single_transformer_blocks.)"""
        return any(n.startswith(("lora_te3_", "lora_unet_joint_blocks_", "lora_unet_transformer_blocks_",
                                 "lora_transformer_transformer_blocks_")) for n in names)

    def model_problems(self, cfg, source: Path) -> list[str]:
        """Besides sizes: T5 trained (te3) where it will not load, and a single file's missing or wrong component
        files, from headers (sd3_files.file_problems)."""
        from trainer.config import model_options, parse_text_encoder_lrs
        from .detect import safetensors_shapes
        from .info import sidecar_config_dir
        from .sd3_files import T5_KEY, file_problems
        options = model_options(cfg)
        problems = size_problems(cfg, 16, "the VAE's factor 8 times the transformer's patch of 2", self.label)
        lrs = parse_text_encoder_lrs(cfg.optimizer.text_encoder_lrs)[0]
        if "te3" in cfg.network.text_encoders or lrs.get("te3", 0) > 0:
            if not uses_t5(options):
                problems.append("network.text_encoders names te3 (T5) but model.t5_length is 0, which leaves T5 "
                                "out; set model.t5_length (256) or leave te3 out")
            elif source.is_file() and not options.get("t5_path") and not any(
                    k.startswith(T5_KEY) for k in safetensors_shapes(source)):
                problems.append(f"network.text_encoders names te3 (T5) but {source} holds no T5; give "
                                f"t5xxl_fp16.safetensors as model.t5_path or leave te3 out")
        if source.is_file() and source.suffix.lower() == ".safetensors":
            problems += file_problems(source, options, sidecar_config_dir(source))
        return problems

    # ---- loading -------------------------------------------------------------------------------------------------
    def load_folder(self, folder: Path, *, dtype: torch.dtype, trust_pickle: bool,
                    options: dict | None = None) -> dict:
        from diffusers import AutoencoderKL, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, T5EncoderModel
        load = dict(dtype=dtype, trust_pickle=trust_pickle, family_label=self.label)
        models = {"transformer": load_component(folder, "transformer", SD3Transformer2DModel, **load),
                  "vae": load_component(folder, "vae", AutoencoderKL, **dict(load, dtype=vae_dtype(options, dtype))),
                  "text_encoder": load_component(folder, "text_encoder", CLIPTextModelWithProjection, **load),
                  "text_encoder_2": load_component(folder, "text_encoder_2", CLIPTextModelWithProjection, **load)}
        if (folder / "text_encoder_3").is_dir() and uses_t5(options):  # optional: SD3 runs with its part zeroed
            models["text_encoder_3"] = load_component(folder, "text_encoder_3", T5EncoderModel, **load)
        return self.components(models, folder)

    def _files(self):
        """The module that reads this family's single files (FromSingleFiles)."""
        from . import sd3_files
        return sd3_files

    def components(self, models: dict, config_dir: Path) -> dict:
        """The BaseModel fields, with tokenizers and the flow scheduler read from `config_dir`."""
        from .loading import tokenizer
        tokenizers = {"lora_te1": tokenizer(config_dir, "tokenizer", "<|endoftext|>"),
                      "lora_te2": tokenizer(config_dir, "tokenizer_2", "!")}
        specs = self.text_encoder_specs
        if "text_encoder_3" in models:
            tokenizers["lora_te3"] = t5_tokenizer(config_dir)
        else:
            specs = specs[:2]
        return {"denoiser": models["transformer"], "vae": models["vae"], "text_encoder": models["text_encoder"],
                "tokenizer": tokenizers["lora_te1"], "tokenizers": tokenizers,
                "noise_scheduler": flow_scheduler(config_dir),
                "text_encoders": text_encoder_modules(models, specs)}

    # ---- conditioning --------------------------------------------------------------------------------------------
    def encode_text(self, base, captions: list[str]) -> dict[str, torch.Tensor]:
        import torch
        import torch.nn.functional as F
        hidden, pooled = [], []
        for prefix in ("lora_te1", "lora_te2"):
            encoder, tok = base.text_encoders[prefix], base.tokenizers[prefix]
            ids = tok(captions, padding="max_length", max_length=CLIP_LENGTH, truncation=True,
                      return_tensors="pt").input_ids
            out = encoder(ids.to(encoder.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # the penultimate layer, as SD3 was trained
            pooled.append(out.text_embeds)
        clip = torch.cat(hidden, dim=-1)
        t5 = self._t5_states(base, captions, clip)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"encoder_hidden_states": torch.cat([clip, t5], dim=-2),
                "pooled_projections": torch.cat(pooled, dim=-1)}

    def _t5_states(self, base, captions: list[str], clip: torch.Tensor) -> torch.Tensor:
        import torch
        width = base.denoiser.config.joint_attention_dim
        encoder = base.text_encoders.get("lora_te3")
        length = t5_length(base)
        if encoder is None or length == 0:  # diffusers' pipeline zeroes 77 positions when T5 is absent
            return torch.zeros(len(captions), CLIP_LENGTH, width, dtype=clip.dtype, device=clip.device)
        ids = base.tokenizers["lora_te3"](captions, padding="max_length", max_length=length, truncation=True,
                                          add_special_tokens=True, return_tensors="pt").input_ids
        return encoder(ids.to(encoder.device))[0].to(clip.dtype)

    def predict(self, base, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
        dtype = base.dtype  # read once (BaseModel.frozen_dtype)
        return base.denoiser(hidden_states=noisy.to(dtype), timestep=timesteps,
                             encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
                             pooled_projections=cond["pooled_projections"].to(dtype), return_dict=False)[0]

    def noise_process(self, base, cfg):
        """Rectified flow (section 2 of the paper): loss.timestep_sampling, flow_shift and flow_weighting."""
        from .noise import FlowNoise
        return FlowNoise(cfg.loss)


    # ---- names, metadata, sampling, baking -------------------------------------------------------------------------
    def kohya_file_layout(self, index: dict) -> list[FusedName]:
        """sd-scripts' lora_sd3 names modules in SAI's MMDiT layout, with q, k and v as one qkv module."""
        from .sd3_layout import kohya_file_layout
        return kohya_file_layout(index, _num_layers(index))

    def kohya_file_parts(self, names, metadata: dict | None = None) -> list[FusedName]:
        """The parts of the SAI-layout modules of a kohya file, from its names alone (file_parts)."""
        from .sd3_layout import file_parts
        return file_parts(names, _layers_of_variant((metadata or {}).get("modelspec.architecture", "")))

    def metadata(self, base) -> dict[str, str]:
        """As sd-scripts' sd3_train_network writes: ss_base_model_version is the MMDiT's model type and the
        architecture SAI's model spec of it (library/sd3_utils.py:53-60, sai_model_spec.py:74, 202-203, 238-239);
        a LoRA's implementation is "diffusers" there (sai_model_spec.py:92, 269)."""
        model_type = variant(base.denoiser.config)
        return {"ss_base_model_version": model_type, "ss_v2": "False",
                "modelspec.architecture": f"stable-diffusion-3-{model_type}/lora",
                "modelspec.implementation": "diffusers"}

    def pipeline(self, base, scheduler=None):
        pipe = sd3_pipeline(base, inference_scheduler(scheduler, base.noise_scheduler.config), t5_length(base))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def original_checkpoint(self, base) -> dict[str, torch.Tensor]:
        from .sd3_bake import original_checkpoint
        return original_checkpoint(base)

    def model_builders(self, config_dir: Path) -> dict:
        import functools
        from diffusers import SD3Transformer2DModel
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel
        config = SD3Transformer2DModel.load_config(config_dir, subfolder="transformer")
        builders = {"denoiser": lambda: SD3Transformer2DModel.from_config(config)}
        for spec in self.text_encoder_specs:
            if spec.prefix == "lora_te3":
                builders[spec.prefix] = functools.partial(
                    T5EncoderModel, T5Config.from_pretrained(config_dir, subfolder=spec.component))
            else:
                builders[spec.prefix] = functools.partial(
                    CLIPTextModelWithProjection, CLIPTextConfig.from_pretrained(config_dir, subfolder=spec.component))
        return builders

    def meta_config_dir(self, adapter_names: set[str] | None = None, metadata: dict | None = None) -> Path:
        """The shipped configs of the variant an adapter was made for: its metadata's model type (sd-scripts'),
        else its names (blocks past 23: 3.5 Large; attn2: 3.5 Medium), else 3.5 Medium."""
        from .sd3_layout import file_parts
        model_type = _model_type((metadata or {}).get("modelspec.architecture", "")) or \
            (metadata or {}).get("ss_base_model_version", "")
        if model_type not in VARIANT_CONFIGS and adapter_names:
            internal = set(adapter_names)
            internal |= {p for f in file_parts(adapter_names, None) for p in f.parts}  # SAI-named files too
            blocks = {int(m.group(1)) for n in internal if (m := _BLOCK.match(n))}
            model_type = "5-large" if max(blocks, default=0) >= 24 else \
                "medium" if not any("_attn2_" in n for n in internal) and len(blocks) == 24 else "5-medium"
        return CONFIGS / VARIANT_CONFIGS.get(model_type, "sd35-medium")

    def pipeline_text_kwargs(self, text: dict, negative: dict | None, empty: dict | None = None) -> dict:
        """StableDiffusion3Pipeline's prompt_embeds (CLIP-L and CLIP-G padded to T5's width, then T5) and
        pooled_prompt_embeds; without a negative prompt its CFG encodes "" (pipeline_stable_diffusion_3.py:467)."""
        out = {"prompt_embeds": text["encoder_hidden_states"], "pooled_prompt_embeds": text["pooled_projections"]}
        negative = negative if negative is not None else empty
        if negative is not None:
            out.update(negative_prompt_embeds=negative["encoder_hidden_states"],
                       negative_pooled_prompt_embeds=negative["pooled_projections"])
        return out


# sd-scripts' model types (library/sd3_utils.py:53-60) and their block counts
VARIANT_LAYERS = {"5-large": 38, "5-medium": 24, "medium": 24}


def variant(config) -> str:
    """sd-scripts' model type of a transformer config: 3.5 Large (38 blocks), 3.5 Medium (dual attention),
    else SD3 Medium."""
    if config.get("num_layers", 0) >= 38:
        return "5-large"
    if config.get("dual_attention_layers"):
        return "5-medium"
    return "medium"


VARIANT_CONFIGS = {"5-large": "sd35-large", "5-medium": "sd35-medium", "medium": "sd3-medium"}
_BLOCK = re.compile(r"^lora_unet_transformer_blocks_(\d+)_")


def _model_type(architecture: str) -> str:
    return architecture.removeprefix("stable-diffusion-3-").split("/")[0]


def _layers_of_variant(architecture: str) -> int | None:
    return VARIANT_LAYERS.get(_model_type(architecture))


def _num_layers(index: dict) -> int:
    """The transformer's block count, from a module index of the whole model (its last block is context_pre_only)."""
    blocks = {int(path.split(".")[1]) for _, (prefix, path, _) in index.items()
              if prefix == "lora_unet" and path.startswith("transformer_blocks.")}
    return max(blocks) + 1


def t5_length(base) -> int:
    """T5 tokens per caption: the model's option (model.t5_length), else 256; 0 leaves T5 out."""
    return int(getattr(base, "options", {}).get("t5_length", DEFAULT_T5_LENGTH))


T5_TOKENIZER = CONFIGS / "t5-tokenizer"  # T5 v1.1's vocabulary (Apache-2.0), shipped: see its SOURCE.md


def t5_tokenizer(config_dir: Path, sub: str = "tokenizer_3"):
    """The folder's T5 tokenizer (SD3's tokenizer_3, FLUX's tokenizer_2), else the shipped one (a single file's
    configs have none)."""
    from transformers import T5TokenizerFast
    folder, sub = (config_dir, sub) if (config_dir / sub).is_dir() else (T5_TOKENIZER, "")
    return guarded(folder / sub, lambda: T5TokenizerFast.from_pretrained(folder, subfolder=sub,
                                                                        local_files_only=True))


def flow_scheduler(config_dir: Path):
    """The model's FlowMatchEulerDiscreteScheduler (shift 3.0 for SD3): inference only; training draws its own
    noise levels (noise.FlowNoise)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    config = guarded(config_dir / "scheduler", lambda: FlowMatchEulerDiscreteScheduler.load_config(
        config_dir, subfolder="scheduler", local_files_only=True))
    return FlowMatchEulerDiscreteScheduler.from_config(config)


def inference_scheduler(choice, config):
    """Flow-match Euler, the one sampler of rectified-flow models; a scheduler instance is used as given. The
    DDPM samplers' names (dpmsolver, euler, ...) all mean it here."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    if choice is not None and not isinstance(choice, str):
        return choice
    return FlowMatchEulerDiscreteScheduler.from_config(config)


@functools.cache
def with_t5_length(cls):
    """`cls` (a diffusers pipeline with a T5 encoder: SD3's, FLUX's) whose max_sequence_length defaults to the
    T5 length the model trains with (its `t5_length`), so samples condition as training does."""
    class Pipeline(cls):
        t5_length = DEFAULT_T5_LENGTH

        def __call__(self, *args, max_sequence_length=None, **kwargs):
            return super().__call__(*args, max_sequence_length=max_sequence_length or self.t5_length, **kwargs)

    Pipeline.__name__ = Pipeline.__qualname__ = cls.__name__
    return Pipeline


def sd3_pipeline(base, scheduler, length: int):
    from diffusers import StableDiffusion3Pipeline
    te = base.text_encoders
    pipe = with_t5_length(StableDiffusion3Pipeline)(
        transformer=base.denoiser, scheduler=scheduler, vae=base.vae, text_encoder=te["lora_te1"],
        tokenizer=base.tokenizers["lora_te1"], text_encoder_2=te["lora_te2"], tokenizer_2=base.tokenizers["lora_te2"],
        text_encoder_3=te.get("lora_te3") if length else None,
        tokenizer_3=base.tokenizers.get("lora_te3") if length else None)
    pipe.t5_length = length or CLIP_LENGTH  # without T5, diffusers' pipeline zeroes 77 positions
    return pipe


SD3_FAMILY = SD3()
