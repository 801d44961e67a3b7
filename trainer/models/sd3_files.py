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
            raise ModelLoadError(missing_message(source, sub))
        if where != source:  # a separate file: the kind of file it is, before its weights are converted
            _refuse(component_problem(sub, {k: list(v.shape) for k, v in weights.items()}, configs,
                                      f"model.{OPTION_OF[sub]} {where}"))
        models[sub] = _text_encoder(sub, weights, Fit(where, configs, config_dir is None, label), configs, dtype)
    return models, configs


# one weight each component has, named as its own file holds it (a CLIP also with transformers' `text_model.`)
PROBES = {"text_encoder": "encoder.layers.0.self_attn.q_proj.weight",
          "text_encoder_2": "encoder.layers.0.self_attn.q_proj.weight",
          "text_encoder_3": "encoder.block.0.layer.0.SelfAttention.q.weight", "vae": "decoder.conv_in.weight"}
FILES = {"text_encoder": "clip_l.safetensors", "text_encoder_2": "clip_g.safetensors",
         "text_encoder_3": "t5xxl_fp16.safetensors", "vae": "the SD3 VAE (diffusion_pytorch_model.safetensors)"}


def component_problem(sub: str, shapes: dict, configs: Path, where) -> str | None:
    """Why weights of these shapes (names without the single file's prefix) are not SD3's `sub` as `configs`
    describe it, or None: a CLIP-G given as CLIP-L, an SDXL VAE, a file of another kind."""
    import json
    shape = shapes.get(PROBES[sub], shapes.get("text_model." + PROBES[sub]))
    give = f"give {FILES[sub]} as model.{OPTION_OF[sub]}"
    if shape is None or len(shape) < 2:
        kind = "file" if sub == "vae" else "text encoder"
        return f"{where} is not a {LABELS[sub]} {kind} (it has no {PROBES[sub]}); {give}"
    config = json.loads((configs / sub / "config.json").read_text(encoding="utf-8"))
    want = config.get("latent_channels") if sub == "vae" else config.get("hidden_size", config.get("d_model"))
    got = shape[1]
    if want is not None and got != want:
        what = "latent channels" if sub == "vae" else "wide"
        return (f"{where} is not SD3's {LABELS[sub]}: it has {got} {what} where SD3's has {want} (an SD 1.x/SDXL "
                f"VAE has 4 channels; CLIP-L is 768 wide, CLIP-G 1280, T5-XXL 4096); {give}")
    return None


def missing_message(source: Path, sub: str) -> str:
    return (f"{source} holds no {LABELS[sub]}; give its file as model.{OPTION_OF[sub]} ({FILES[sub]}, as ComfyUI "
            f"keeps it beside the checkpoint)")


def file_problems(source: Path, options: dict, configs: Path | None) -> list[str]:
    """What loading the single file `source` with these options would refuse, from the files' headers only (the
    app's Check and validate ask this, so neither passes what loading then refuses)."""
    from .detect import safetensors_shapes
    shapes = safetensors_shapes(source)
    configs = configs or shipped_configs(shapes)
    problems = []
    for sub, prefix in {"vae": VAE_KEY, **TEXT_KEYS}.items():
        if sub == "text_encoder_3" and not uses_t5(options):
            continue
        if options.get(OPTION_OF[sub]):
            path = Path(options[OPTION_OF[sub]])
            problem = component_problem(sub, safetensors_shapes(path), configs, f"model.{OPTION_OF[sub]} {path}")
        elif sub == "text_encoder_3" or any(k.startswith(prefix) for k in shapes):
            continue  # inside model.path (converted at load), or no T5: SD3 runs without it
        else:
            problem = missing_message(source, sub)
        problems += [problem] if problem else []
    return problems


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
        _refuse(component_problem("vae", {k: list(v.shape) for k, v in weights.items()}, configs,
                                  f"model.vae_path {source}"))
    if not weights:
        raise ModelLoadError(missing_message(fit.source, "vae"))
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
        if sub == "text_encoder":  # SD3 pools CLIP-L unprojected: ComfyUI's SD3 text model asks CLIP-L for its
            # unprojected pooled output and diffusers' single-file reader puts an identity here
            # (single_file_utils.py, 1762-1763), whatever projection a clip_l file brings
            weights["text_projection.weight"] = torch.eye(config.projection_dim, config.hidden_size)
    fit.load(model, f"{LABELS[sub]} text encoder", weights, dtype)
    return model


def _refuse(problem: str | None) -> None:
    if problem:
        raise ModelLoadError(problem)


def _read(path: Path) -> dict:
    from .checkpoint import read_state_dict
    return read_state_dict(path, trust_pickle=False)
