"""An SD3 / SD3.5 model's weights as SAI's single file holds them, for baking (trainer/adapters/bake.py writes it).

The keys are the ones sd3_files.py reads and diffusers' `StableDiffusion3Pipeline.from_single_file` reads (diffusers
0.42.1 loaders/single_file_utils.py): the transformer under `model.diffusion_model.` in SAI's MMDiT layout
(sd3_layout.transformer_to_original), the VAE under `first_stage_model.` in the LDM layout (the same converter as
SD 1.x/SDXL: SD3's VAE is an AutoencoderKL without quant_conv/post_quant_conv, which the layout simply lacks), and
the text encoders under `text_encoders.{clip_l,clip_g,t5xxl}.transformer.` in transformers' own names, CLIP's with
the `text_model.` level (`convert_ldm_clip_checkpoint` only strips the prefix, l. 1614-1629, and the model-type
check looks for `...clip_l.transformer.text_model.embeddings.position_embedding.weight`, l. 80).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .sd3_files import PARTS
from .sd3_layout import transformer_to_original

if TYPE_CHECKING:
    import torch

# the roots of a CLIP text model's own weights: they sit under `text_model.` in the single file, the projection
# beside it (transformers >= 5 may flatten the wrapper away, so a state dict can come either way)
_CLIP_ROOTS = ("embeddings.", "encoder.", "final_layer_norm.")
# T5's input embedding is one tensor under two names (T5EncoderModel ties encoder.embed_tokens to shared). The file
# holds both: diffusers' is_t5_in_single_file looks for `shared.weight` (single_file_utils.py l. 2212-2216) and its
# load_model_dict_into_meta assigns each name on its own without re-tying, so a missing `encoder.embed_tokens.weight`
# stays on the meta device (tried: 'Tensor on device meta' at the first forward). sd3_files reads either.
_T5_TIED = "encoder.embed_tokens.weight"


def original_checkpoint(base) -> dict[str, torch.Tensor]:
    """transformer + VAE + CLIP-L + CLIP-G (+ T5 when the base has it) under SAI's single-file names."""
    out = transformer_to_original(base.denoiser.state_dict(), base.denoiser.config)
    out.update(parts_to_original(base, PARTS))
    return out


def parts_to_original(base, parts) -> dict[str, torch.Tensor]:
    """The VAE (LDM layout) and each text encoder of `base` under its single-file prefix (single_files.Part's
    first): what a transformer family's checkpoint holds beside its transformer (SD3's, and FLUX's as ComfyUI
    saves one)."""
    from trainer.adapters.original_layout import vae_to_original
    prefix_of = {part.sub: part.prefixes[0] for part in parts}
    out = {prefix_of["vae"] + k: v for k, v in vae_to_original(base.vae.state_dict()).items()}
    components = {spec.prefix: spec for spec in base.family.text_encoder_specs}
    for prefix, encoder in base.text_encoders.items():
        spec, state = components[prefix], encoder.state_dict()
        weights = t5_to_original(state) if spec.kind == "t5" else clip_to_original(state)
        out.update({prefix_of[spec.component] + k: v for k, v in weights.items()})
    return out


def clip_to_original(state: dict) -> dict:
    """A CLIPTextModelWithProjection's weights with the `text_model.` level, the projection at the top."""
    out = {}
    for key, value in state.items():
        if key.endswith("position_ids"):  # a buffer transformers rebuilds; loaders drop it
            continue
        out["text_model." + key if key.startswith(_CLIP_ROOTS) else key] = value
    return out


def t5_to_original(state: dict) -> dict:
    """T5EncoderModel's weights, the tied input embedding under both of its names (bake's writer copies a tensor
    that shares storage, which safetensors refuses)."""
    out = dict(state)
    embedding = out.get("shared.weight", out.get(_T5_TIED))
    if embedding is not None:
        out.setdefault("shared.weight", embedding)
        out.setdefault(_T5_TIED, embedding)
    return out
