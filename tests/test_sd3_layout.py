"""SD3's transformer in the SAI (original) layout: the weights round-trip bit-exactly through diffusers' own
converter, every Linear/Conv2d has a place in the table, and kohya names fuse q/k/v as sd-scripts' files do."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from diffusers import SD3Transformer2DModel
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
from trainer.formats.names import kohya_name, module_index
from trainer.models.sd3_layout import (file_parts, kohya_file_layout, original_module,
                                       transformer_to_original)

TINY = dict(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=3, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
            pos_embed_max_size=16)
VARIANTS = {
    "sd35_medium": dict(TINY, dual_attention_layers=(0,), qk_norm="rms_norm"),  # dual attention + qk norm
    "sd3_medium": dict(TINY),                                                   # neither
}


def tiny_transformer(variant: str) -> SD3Transformer2DModel:
    """A tiny transformer with every weight random: diffusers zero-initialises some (adaLN), and a round trip of
    zeros could not tell a swap or a wrong part order."""
    torch.manual_seed(0)
    model = SD3Transformer2DModel(**VARIANTS[variant])
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param))
    return model


def layers(model: nn.Module) -> list[str]:
    return [p for p, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def model(request):
    torch.set_num_threads(1)
    return tiny_transformer(request.param)


def test_round_trip_through_diffusers_converter_is_bit_exact(model):
    sd = model.state_dict()
    original = transformer_to_original(sd, model.config)
    assert all(k.startswith("model.diffusion_model.") for k in original)
    back = convert_sd3_transformer_checkpoint_to_diffusers(dict(original))
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd), [k for k in sd if not torch.equal(back[k], sd[k])]


def test_original_keys_are_the_sai_layout(model):
    original = transformer_to_original(model.state_dict(), model.config)
    dim = model.config.num_attention_heads * model.config.attention_head_dim
    qkv = original["model.diffusion_model.joint_blocks.1.x_block.attn.qkv.weight"]
    assert qkv.shape == (3 * dim, dim)
    assert torch.equal(qkv[dim:2 * dim], model.transformer_blocks[1].attn.to_k.weight)  # q, k, v order
    last = model.config.num_layers - 1
    assert f"model.diffusion_model.joint_blocks.{last}.context_block.attn.proj.weight" not in original
    assert f"model.diffusion_model.joint_blocks.{last - 1}.context_block.attn.proj.weight" in original
    # the last context adaLN and the final layer store (shift, scale): diffusers' second half comes first
    ada = original[f"model.diffusion_model.joint_blocks.{last}.context_block.adaLN_modulation.1.weight"]
    ours = model.transformer_blocks[last].norm1_context.linear.weight
    assert torch.equal(ada[: ada.shape[0] // 2], ours[ours.shape[0] // 2:])
    assert "model.diffusion_model.pos_embed" in original
    has_norm = model.config.qk_norm is not None
    assert ("model.diffusion_model.joint_blocks.0.context_block.attn.ln_k.weight" in original) == has_norm
    assert ("model.diffusion_model.joint_blocks.0.x_block.attn2.qkv.bias" in original) == bool(
        model.config.dual_attention_layers)


def test_every_layer_has_an_original_module(model):
    n = model.config.num_layers
    seen = {}
    for path in layers(model):
        sai, part, parts, swap = original_module(path, n)
        assert 0 <= part < parts
        seen.setdefault(sai, set()).add(part)
    assert all(parts == set(range(len(parts))) for parts in seen.values())  # no part claimed twice, none missing
    assert original_module("transformer_blocks.2.attn.to_k", n) == ("joint_blocks.2.x_block.attn.qkv", 1, 3, False)
    assert original_module("transformer_blocks.2.norm1_context.linear", n)[3] is True
    assert original_module("transformer_blocks.1.norm1_context.linear", n)[3] is False
    assert original_module("norm_out.linear", n) == ("final_layer.adaLN_modulation.1", 0, 1, True)


@pytest.mark.parametrize("path", ["transformer_blocks.2.attn.to_add_out", "transformer_blocks.3.attn.to_q",
                                  "transformer_blocks.0.attn.to_x", "proj_in", "transformer_blocks.x.attn.to_q"])
def test_unknown_paths_are_key_errors_naming_the_path(path):
    with pytest.raises(KeyError, match=path.replace(".", r"\.")):
        original_module(path, 3)


def test_kohya_file_layout_fuses_exactly_the_qkv(model):
    index = module_index(model)
    layout = kohya_file_layout(index, model.config.num_layers)
    by_name = {f.name: f for f in layout}
    fused = {f.name for f in layout if len(f.parts) > 1}
    expected = {f"lora_unet_joint_blocks_{i}_{s}_attn_qkv" for i in range(3) for s in ("x_block", "context_block")}
    expected |= {f"lora_unet_joint_blocks_{i}_x_block_attn2_qkv" for i in model.config.dual_attention_layers}
    assert fused == expected
    assert all(len(by_name[n].parts) == 3 and by_name[n].rows == (16, 16, 16) for n in fused)
    qkv = by_name["lora_unet_joint_blocks_0_context_block_attn_qkv"]
    assert qkv.parts == tuple(kohya_name("lora_unet", f"transformer_blocks.0.attn.add_{c}_proj") for c in "qkv")
    assert sorted(p for f in layout for p in f.parts) == sorted(index)  # each module once, every one
    swapped = {f.name for f in layout if f.swap_halves}
    assert swapped == {"lora_unet_joint_blocks_2_context_block_adaLN_modulation_1",
                       "lora_unet_final_layer_adaLN_modulation_1"}
    assert by_name["lora_unet_x_embedder_proj"].parts == ("lora_unet_pos_embed_proj",)
    assert by_name["lora_unet_joint_blocks_1_x_block_mlp_fc1"].rows == (64,)


def test_kohya_file_layout_leaves_text_encoders_and_completes_partial_groups(model):
    index = module_index(model)
    only_k = {n: e for n, e in index.items() if e[1] == "transformer_blocks.1.attn.to_k"}
    only_k["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"] = ("lora_te1", "x", nn.Linear(2, 2))
    (fused,) = kohya_file_layout(only_k, model.config.num_layers)
    assert fused.name == "lora_unet_joint_blocks_1_x_block_attn_qkv"
    assert fused.parts[1] == "lora_unet_transformer_blocks_1_attn_to_k" and len(fused.parts) == 3
    assert fused.rows == (16, 16, 16)


def test_file_parts_reads_back_what_the_layout_writes(model):
    n = model.config.num_layers
    written = kohya_file_layout(module_index(model), n)
    other = ["lora_unet_transformer_blocks_0_attn_to_q", "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"]
    read = file_parts([f.name for f in written] + other, None)
    assert [(f.name, f.parts, f.swap_halves) for f in read] == [(f.name, f.parts, f.swap_halves) for f in written]
    assert all(f.rows == () for f in read)
    assert file_parts([f.name for f in written], n) == read


def test_file_parts_guesses_the_last_block():
    ada = "lora_unet_joint_blocks_4_context_block_adaLN_modulation_1"
    (alone,) = file_parts([ada])
    assert alone.swap_halves  # block 4 taken for the last: a guess
    (with_mlp, _) = file_parts([ada, "lora_unet_joint_blocks_4_context_block_mlp_fc1"])
    assert not with_mlp.swap_halves  # block 4 has a context mlp, so it is not the last
    assert file_parts(["lora_unet_joint_blocks_4_context_block_attn_proj"], 5) == []  # the last has none
    assert file_parts(["lora_unet_joint_blocks_12_x_block_attn_qkv"], None)[0].parts[2] == \
        "lora_unet_transformer_blocks_12_attn_to_v"
