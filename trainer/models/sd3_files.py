"""SD3 single files as people keep them: SAI's sd3.5_medium.safetensors / sd3.5_large.safetensors (the transformer
under model.diffusion_model., with or without the VAE under first_stage_model. and the text encoders under
text_encoders.clip_l / clip_g / t5xxl .transformer.), plus separate clip_l, clip_g, t5xxl and VAE files as ComfyUI
keeps them (model.clip_l_path and the others; single_files.py loads and checks those parts). diffusers' converter
renames the transformer's keys; it is built from the shipped (or given) configs on the meta device and gets the
weights through a strict load (loading.Fit), so a key that does not fit is named with the file."""
from __future__ import annotations

from pathlib import Path

from .family import CONFIGS
from .loading import Fit, empty_models
from .single_files import Part, load_parts, part_problems

TRANSFORMER_KEY = "model.diffusion_model."
T5_KEY = "text_encoders.t5xxl.transformer."
PARTS = (Part("vae", "vae_path", "VAE", ("first_stage_model.",), "vae",
              "the SD3 VAE (diffusion_pytorch_model.safetensors)"),
         Part("text_encoder", "clip_l_path", "CLIP-L", ("text_encoders.clip_l.transformer.",), "clip_unprojected",
              "clip_l.safetensors"),
         Part("text_encoder_2", "clip_g_path", "CLIP-G", ("text_encoders.clip_g.transformer.",), "clip_projected",
              "clip_g.safetensors"),
         Part("text_encoder_3", "t5_path", "T5-XXL", (T5_KEY,), "t5", "t5xxl_fp16.safetensors", optional=True))
DEFAULT_T5_LENGTH = 256  # sd-scripts' default for SD3 (diffusers' pipeline defaults to 256 too; its script to 77)


def uses_t5(options: dict | None) -> bool:
    """Whether T5 is loaded at all: model.t5_length 0 leaves it on disk (9.5 GB in bf16 that never load)."""
    return int((options or {}).get("t5_length", DEFAULT_T5_LENGTH)) != 0


def parts_of(options: dict) -> tuple[Part, ...]:
    return PARTS if uses_t5(options) else PARTS[:3]


def shipped_configs(state_dict: dict) -> Path:
    """The shipped configs of the variant whose transformer the keys show: 38 blocks = 3.5 Large, dual attention
    (attn2) = 3.5 Medium, else SD3 Medium."""
    blocks = {int(k.split(".")[2]) for k in state_dict if k.startswith(TRANSFORMER_KEY + "joint_blocks.")}
    if len(blocks) >= 38:
        return CONFIGS / "sd35-large"
    if any(".attn2." in k for k in state_dict if k.startswith(TRANSFORMER_KEY)):
        return CONFIGS / "sd35-medium"
    return CONFIGS / "sd3-medium"


def load_models(state_dict: dict, *, source: Path, config_dir: Path | None, dtype, options: dict, label: str):
    """transformer, vae, text_encoder, text_encoder_2 and (when there is one) text_encoder_3, with weights."""
    configs = config_dir or shipped_configs(state_dict)
    fit = Fit(source, configs, default_configs=config_dir is None, family_label=label)
    models = {"transformer": _transformer(state_dict, fit, configs, dtype)}
    models.update(load_parts(parts_of(options), state_dict, source=source, fit=fit, dtype=dtype, options=options))
    return models, configs


def file_problems(source: Path, options: dict, configs: Path | None) -> list[str]:
    """What loading the single file `source` with these options would refuse, from the files' headers only (the
    app's Check and validate ask this, so neither passes what loading then refuses)."""
    from .detect import safetensors_shapes
    shapes = safetensors_shapes(source)
    return part_problems(parts_of(options), source, shapes, options, configs or shipped_configs(shapes))


def _transformer(state_dict: dict, fit: Fit, configs: Path, dtype):
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
    config = fit.config(lambda: SD3Transformer2DModel.load_config(configs, subfolder="transformer"), "transformer")
    model = empty_models({"t": lambda: SD3Transformer2DModel.from_config(config)})["t"]
    own = {k: v for k, v in state_dict.items() if k.startswith(TRANSFORMER_KEY)}  # the converter pops its input
    fit.load(model, "transformer", fit.convert(lambda: convert_sd3_transformer_checkpoint_to_diffusers(own)), dtype)
    return model
