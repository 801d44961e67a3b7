"""FLUX.1 single files as people keep them: BFL's flux1-dev.safetensors / flux1-schnell.safetensors (the transformer
alone, in BFL's names, or under model.diffusion_model. as ComfyUI saves it) with ae.safetensors, clip_l and t5xxl
(fp16 or fp8) beside it (model.vae_path, clip_l_path, t5_path; single_files.py loads and checks those parts), or a
checkpoint that holds them under vae. / text_encoders.*. The transformer is built from the shipped (or given)
configs on the meta device and gets its weights through flux_layout's table and a strict load."""
from __future__ import annotations

from pathlib import Path

from .family import CONFIGS
from .loading import Fit, empty_models
from .single_files import Part, load_parts, part_problems

# (a checkpoint's prefixes as ComfyUI saves one: the bake writes the first)
PARTS = (Part("vae", "vae_path", "VAE", ("first_stage_model.", "vae."), "vae", "ae.safetensors"),
         Part("text_encoder", "clip_l_path", "CLIP-L", ("text_encoders.clip_l.transformer.",), "clip",
              "clip_l.safetensors"),
         Part("text_encoder_2", "t5_path", "T5-XXL", ("text_encoders.t5xxl.transformer.",), "t5",
              "t5xxl_fp16.safetensors"))
NOT_TRANSFORMER = ("text_encoders.", "vae.", "first_stage_model.")
GUIDANCE_KEY = "guidance_in.in_layer.weight"  # dev's guidance embedding; schnell has none


def shipped_configs(keys) -> Path:
    """dev's configs for a transformer with a guidance embedding, schnell's for one without."""
    dev = any(k.removeprefix("model.diffusion_model.") == GUIDANCE_KEY for k in keys)
    return CONFIGS / ("flux1-dev" if dev else "flux1-schnell")


def load_models(state_dict: dict, *, source: Path, config_dir: Path | None, dtype, options: dict, label: str):
    """transformer, vae, text_encoder (CLIP-L) and text_encoder_2 (T5), with weights."""
    configs = config_dir or shipped_configs(state_dict)
    fit = Fit(source, configs, default_configs=config_dir is None, family_label=label)
    # everything under the parts' roots is theirs, whether a part reads it or not (ComfyUI's checkpoints keep a
    # CLIP logit_scale at text_encoders.clip_l.logit_scale, beside the .transformer. the CLIP-L part reads)
    own = {k: v for k, v in state_dict.items() if not k.startswith(NOT_TRANSFORMER)}
    models = {"transformer": _transformer(own, fit, configs, dtype)}
    models.update(load_parts(PARTS, state_dict, source=source, fit=fit, dtype=dtype, options=options))
    return models, configs


def file_problems(source: Path, options: dict, configs: Path | None) -> list[str]:
    """What loading `source` with these options would refuse, from the files' headers only."""
    from .detect import safetensors_shapes
    shapes = safetensors_shapes(source)
    return part_problems(PARTS, source, shapes, options, configs or shipped_configs(shapes))


def _transformer(original: dict, fit: Fit, configs: Path, dtype):
    from diffusers import FluxTransformer2DModel
    from .flux_layout import original_to_transformer
    config = fit.config(lambda: FluxTransformer2DModel.load_config(configs, subfolder="transformer"), "transformer")
    model = empty_models({"t": lambda: FluxTransformer2DModel.from_config(config)})["t"]
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    weights = fit.convert(lambda: original_to_transformer(original, shapes, config["num_layers"],
                                                          config["num_single_layers"]))
    fit.load(model, "transformer", weights, dtype)
    return model
