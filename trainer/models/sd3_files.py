"""SD3 single files as people keep them: SAI's sd3.5_medium.safetensors / sd3.5_large.safetensors (the transformer
under model.diffusion_model., with or without the VAE under first_stage_model. and the text encoders under
text_encoders.clip_l / clip_g / t5xxl .transformer.), plus separate clip_l, clip_g, t5xxl and VAE files as ComfyUI
keeps them (model.clip_l_path and the others). diffusers' converters rename the keys; each model is built from the
shipped (or given) configs on the meta device and gets the weights through a strict load (loading.Fit), so a key
that does not fit is named with the file."""
from __future__ import annotations

from pathlib import Path

from .errors import ModelLoadError
from .family import CONFIGS
from .loading import Fit, clip_keys, empty_models

TRANSFORMER_KEY = "model.diffusion_model."
VAE_KEY = "first_stage_model."
TEXT_KEYS = {"text_encoder": "text_encoders.clip_l.transformer.", "text_encoder_2": "text_encoders.clip_g.transformer.",
             "text_encoder_3": "text_encoders.t5xxl.transformer."}
OPTION_OF = {"text_encoder": "clip_l_path", "text_encoder_2": "clip_g_path", "text_encoder_3": "t5_path",
             "vae": "vae_path"}
DEFAULT_T5_LENGTH = 256  # sd-scripts' default for SD3 (diffusers' pipeline defaults to 256 too; its script to 77)
LABELS = {"text_encoder": "CLIP-L", "text_encoder_2": "CLIP-G", "text_encoder_3": "T5-XXL", "vae": "VAE"}


def uses_t5(options: dict | None) -> bool:
    """Whether T5 is loaded at all: model.t5_length 0 leaves it on disk (9.5 GB in bf16 that never load)."""
    return int((options or {}).get("t5_length", DEFAULT_T5_LENGTH)) != 0


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
    models = {"transformer": _transformer(state_dict, fit, configs, dtype),
              "vae": _vae(state_dict, fit, configs, dtype, options.get("vae_path"), label)}
    for sub in ("text_encoder", "text_encoder_2", "text_encoder_3")[:3 if uses_t5(options) else 2]:
        weights, where = _text_weights(state_dict, sub, source, options)
        if weights is None and sub == "text_encoder_3":
            continue  # SD3 runs without T5 (its part of the conditioning is zeros)
        if weights is None:
            raise ModelLoadError(f"{source} holds no {LABELS[sub]} text encoder; give its file as "
                                 f"model.{OPTION_OF[sub]} ({'clip_l' if sub == 'text_encoder' else 'clip_g'}"
                                 f".safetensors, as ComfyUI keeps it)")
        models[sub] = _text_encoder(sub, weights, Fit(where, configs, config_dir is None, label), configs, dtype)
    return models, configs


def _transformer(state_dict: dict, fit: Fit, configs: Path, dtype):
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
    config = fit.config(lambda: SD3Transformer2DModel.load_config(configs, subfolder="transformer"), "transformer")
    model = empty_models({"t": lambda: SD3Transformer2DModel.from_config(config)})["t"]
    own = {k: v for k, v in state_dict.items() if k.startswith(TRANSFORMER_KEY)}  # the converter pops its input
    fit.load(model, "transformer", fit.convert(lambda: convert_sd3_transformer_checkpoint_to_diffusers(own)), dtype)
    return model


def _vae(state_dict: dict, fit: Fit, configs: Path, dtype, vae_path: str | None, label: str):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    config = fit.config(lambda: AutoencoderKL.load_config(configs, subfolder="vae"), "vae")
    model = empty_models({"vae": lambda: AutoencoderKL.from_config(config)})["vae"]
    source, weights, vae_fit = fit.source, {k: v for k, v in state_dict.items() if k.startswith(VAE_KEY)}, fit
    if vae_path:
        source = Path(vae_path)
        weights, vae_fit = _read(source), Fit(source, configs, fit.default_configs, label)
    if not weights:
        raise ModelLoadError(f"{fit.source} holds no VAE; give the SD3 VAE file as model.vae_path")
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in weights):
        converted = dict(weights)  # already in diffusers' layout (diffusion_pytorch_model.safetensors)
    else:
        converted = fit.convert(lambda: convert_ldm_vae_checkpoint(weights, config))
    vae_fit.load(model, "VAE", converted, dtype)
    return model


def _text_weights(state_dict: dict, sub: str, source: Path, options: dict) -> tuple[dict | None, Path]:
    """The text encoder's weights in transformers' names (from its own file when the option names one), and the
    file they came from."""
    if options.get(OPTION_OF[sub]):
        path = Path(options[OPTION_OF[sub]])
        return _read(path), path
    prefix = TEXT_KEYS[sub]
    weights = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return (weights or None), source


def _text_encoder(sub: str, weights: dict, fit: Fit, configs: Path, dtype):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel
    if sub == "text_encoder_3":
        config = fit.config(lambda: T5Config.from_pretrained(configs, subfolder=sub), sub)
        model = empty_models({sub: lambda: T5EncoderModel(config)})[sub]
        weights = dict(weights)
        if "shared.weight" in weights:  # T5's input embedding is tied: files keep one name or the other
            weights.setdefault("encoder.embed_tokens.weight", weights["shared.weight"])
        elif "encoder.embed_tokens.weight" in weights:
            weights["shared.weight"] = weights["encoder.embed_tokens.weight"]
    else:
        config = fit.config(lambda: CLIPTextConfig.from_pretrained(configs, subfolder=sub), sub)
        model = empty_models({sub: lambda: CLIPTextModelWithProjection(config)})[sub]
        weights = {k: v for k, v in clip_keys(dict(weights), model).items() if k != "logit_scale"}
        if "text_projection.weight" not in weights:  # SAI's CLIP-L has none: identity, as diffusers loads it
            weights["text_projection.weight"] = torch.eye(config.projection_dim, config.hidden_size)
    fit.load(model, f"{LABELS[sub]} text encoder", weights, dtype)
    return model


def _read(path: Path) -> dict:
    from .checkpoint import read_state_dict
    return read_state_dict(path, trust_pickle=False)
