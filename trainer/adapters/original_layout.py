"""diffusers -> original (CompVis / SGM, "ldm") state-dict names for single-file checkpoints of every family.

Hand-written because diffusers ships only the other direction (`from_single_file`); its
scripts/convert_diffusers_to_original_stable_diffusion.py documents the mapping but hard-codes SD1.5's block counts.
This version derives the indices from `layers_per_block` and the blocks present, so the tiny models and SDXL's
three-block UNet (whose kohya names are this layout too: `unet_original_path`) convert alike.
A1111, ComfyUI and diffusers' `from_single_file` read the result: `model.diffusion_model.*` (UNet),
`first_stage_model.*` (VAE), and the text encoders under each family's prefix: CLIP in transformers' names
(`cond_stage_model.transformer.text_model.*`), OpenCLIP in its own (`...model.transformer.resblocks.*`, fused q/k/v).
"""
from __future__ import annotations

import re

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."

_UNET_FIXED = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
               "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
               "add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2."}
_UNET_RESNET = {"norm1.": "in_layers.0.", "conv1.": "in_layers.2.", "norm2.": "out_layers.0.",
                "conv2.": "out_layers.3.", "time_emb_proj.": "emb_layers.1.", "conv_shortcut.": "skip_connection."}
_VAE_FIXED = {"conv_norm_out.": "norm_out.", "conv_in.": "conv_in.", "conv_out.": "conv_out."}
_VAE_ATTENTION = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}


def original_checkpoint(unet: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module) -> dict:
    """An SD 1.x model's weights under original single-file names (tensors shared, not copied, where possible)."""
    out = unet_vae_to_original(unet, vae)
    out.update({TEXT_PREFIX + k: v for k, v in text_encoder_to_original(text_encoder.state_dict()).items()})
    return out


def unet_vae_to_original(unet: torch.nn.Module, vae: torch.nn.Module) -> dict:
    out = {UNET_PREFIX + k: v for k, v in unet_to_original(unet.state_dict(), unet.config).items()}
    out.update({VAE_PREFIX + k: v for k, v in vae_to_original(vae.state_dict()).items()})
    return out


def unet_original_path(path: str, unet_config) -> str:
    """A diffusers UNet module path (or weight key) in the original layout: `down_blocks.1.attentions.0.proj_in`
    -> `input_blocks.4.1.proj_in` for SDXL. kohya names SDXL's UNet modules this way."""
    key = _unet_key(path + ".weight", _layers_per_block(unet_config) + 1, _up_blocks_with_attention(unet_config))
    return key[: -len(".weight")]


def _up_blocks_with_attention(unet_config) -> set[int]:
    return {i for i, kind in enumerate(unet_config["up_block_types"]) if "CrossAttn" in kind}


def _layers_per_block(unet_config) -> int:
    value = unet_config["layers_per_block"]
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"the original single-file layout needs one layers_per_block for every block, "
                             f"this UNet has {list(value)}; save it as a diffusers folder instead")
        value = value[0]
    return int(value)


# ---- UNet ----------------------------------------------------------------------------------------------------

def unet_to_original(state: dict, unet_config) -> dict:
    per_block, up_with_attention = _layers_per_block(unet_config) + 1, _up_blocks_with_attention(unet_config)
    return {_unet_key(k, per_block, up_with_attention): v for k, v in state.items()}


def _unet_key(key: str, per_block: int, up_with_attention: set[int]) -> str:
    for new, old in _UNET_FIXED.items():
        if key.startswith(new):
            return old + key[len(new):]
    patterns = [
        (r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)",
         lambda b, j, rest: f"input_blocks.{per_block * b + j + 1}.0.{_resnet(rest)}"),
        (r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)",
         lambda b, j, rest: f"input_blocks.{per_block * b + j + 1}.1.{rest}"),
        (r"down_blocks\.(\d+)\.downsamplers\.(0)\.conv\.(.*)",
         lambda b, _, rest: f"input_blocks.{per_block * (b + 1)}.0.op.{rest}"),
        (r"mid_block\.resnets\.(\d+)\.()(.*)", lambda j, _, rest: f"middle_block.{2 * j}.{_resnet(rest)}"),
        (r"mid_block\.attentions\.(0)\.()(.*)", lambda _, __, rest: f"middle_block.1.{rest}"),
        (r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)",
         lambda b, j, rest: f"output_blocks.{per_block * b + j}.0.{_resnet(rest)}"),
        (r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)",
         lambda b, j, rest: f"output_blocks.{per_block * b + j}.1.{rest}"),
        (r"up_blocks\.(\d+)\.upsamplers\.(0)\.(.*)",
         lambda b, _, rest: f"output_blocks.{per_block * b + per_block - 1}.{2 if b in up_with_attention else 1}."
                            f"{rest}"),
    ]
    for pattern, build in patterns:
        m = re.fullmatch(pattern, key)
        if m:
            a, b, rest = m.groups()
            return build(int(a), int(b) if b else 0, rest)
    raise ValueError(f"UNet weight {key} has no place in the original single-file layout (an unusual UNet?)")


def _resnet(rest: str) -> str:
    for new, old in _UNET_RESNET.items():
        if rest.startswith(new):
            return old + rest[len(new):]
    raise ValueError(f"unexpected UNet resnet weight {rest}")


# ---- VAE -----------------------------------------------------------------------------------------------------

def vae_to_original(state: dict) -> dict:
    n_up = len({m.group(1) for k in state if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))})
    out = {}
    for key, value in state.items():
        new = _vae_key(key, n_up)
        # the original mid-block attention uses 1x1 convs where diffusers uses Linear layers
        if ".mid.attn_1." in new and new.endswith(".weight") and value.dim() == 2:
            value = value[:, :, None, None]
        out[new] = value
    return out


def _vae_key(key: str, n_up: int) -> str:
    if key.startswith(("quant_conv.", "post_quant_conv.")):
        return key
    side, rest = key.split(".", 1)
    for new, old in _VAE_FIXED.items():
        if rest.startswith(new):
            return f"{side}.{old}{rest[len(new):]}"
    patterns = [
        (r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", lambda i, j, r: f"down.{i}.block.{j}.{_shortcut(r)}"),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.()(.*)", lambda i, _, r: f"down.{i}.downsample.{r}"),
        (r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", lambda i, j, r: f"up.{n_up - 1 - i}.block.{j}.{_shortcut(r)}"),
        (r"up_blocks\.(\d+)\.upsamplers\.0\.()(.*)", lambda i, _, r: f"up.{n_up - 1 - i}.upsample.{r}"),
        (r"mid_block\.resnets\.(\d+)\.()(.*)", lambda j, _, r: f"mid.block_{j + 1}.{_shortcut(r)}"),
        (r"mid_block\.attentions\.(0)\.()(.*)", lambda _, __, r: f"mid.attn_1.{_vae_attention(r)}"),
    ]
    for pattern, build in patterns:
        m = re.fullmatch(pattern, rest)
        if m and side in ("encoder", "decoder"):
            a, b, tail = m.groups()
            return f"{side}.{build(int(a), int(b) if b else 0, tail)}"
    raise ValueError(f"VAE weight {key} has no place in the SD1.x single-file layout (not an AutoencoderKL?)")


def _shortcut(rest: str) -> str:
    return "nin_shortcut." + rest[len("conv_shortcut."):] if rest.startswith("conv_shortcut.") else rest


def _vae_attention(rest: str) -> str:
    for new, old in _VAE_ATTENTION.items():
        if rest.startswith(new):
            return old + rest[len(new):]
    raise ValueError(f"unexpected VAE attention weight {rest}")


# ---- text encoder ----------------------------------------------------------------------------------------------

def text_encoder_to_original(state: dict) -> dict:
    """CLIP keys under `text_model.` (transformers 5 dropped that level from the module tree; the layout keeps it)."""
    return {(k if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in state.items()}


OPEN_CLIP_BLOCK = {"layer_norm1.": "ln_1.", "layer_norm2.": "ln_2.", "mlp.fc1.": "mlp.c_fc.", "mlp.fc2.": "mlp.c_proj.",
                   "self_attn.out_proj.": "attn.out_proj."}


def open_clip_to_original(text_encoder: torch.nn.Module) -> dict:
    """A CLIP text model (SD 2.x's ViT-H, SDXL's bigG) in OpenCLIP's names: the inverse of diffusers'
    convert_open_clip_checkpoint (q/k/v fused into in_proj, the projection transposed)."""
    state = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()
             if not k.endswith("position_ids")}
    out = {"token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
           "positional_embedding": state.pop("embeddings.position_embedding.weight"),
           "ln_final.weight": state.pop("final_layer_norm.weight"), "ln_final.bias": state.pop("final_layer_norm.bias")}
    if "text_projection.weight" in state:
        out["text_projection"] = state.pop("text_projection.weight").T.contiguous()
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")})
    for i in layers:
        out.update(_open_clip_block(state, i))
    return out


def _open_clip_block(state: dict, i: int) -> dict:
    src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
    out = {}
    for kind in ("weight", "bias"):
        out[f"{dst}attn.in_proj_{kind}"] = torch.cat([state[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv"])
    for new, old in OPEN_CLIP_BLOCK.items():
        for kind in ("weight", "bias"):
            out[f"{dst}{old}{kind}"] = state[f"{src}{new}{kind}"]
    return out
