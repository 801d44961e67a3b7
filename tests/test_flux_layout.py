"""FLUX.1's transformer in BFL's (original) layout: the weights round-trip bit-exactly through diffusers' own
converter, every Linear has a place in the table, and kohya names fuse qkv and linear1 as sd-scripts' files do."""
from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from diffusers import FluxTransformer2DModel
from diffusers.loaders import single_file_utils
from trainer.formats.fused import fuse_layers, split_layers
from trainer.formats.names import kohya_name, module_index
from trainer.lora_state import LoraLayer
from trainer.models.flux_layout import (file_parts, kohya_file_layout, original_module,
                                        transformer_to_original)

# in_channels 16: 4 latent channels packed 2x2; attention_head_dim = sum(axes_dims_rope)
TINY = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24, axes_dims_rope=(2, 2, 4))
VARIANTS = {"dev": dict(TINY, guidance_embeds=True), "schnell": dict(TINY, guidance_embeds=False)}
H = 16  # the tiny model's width: 2 heads x 8


def tiny_transformer(variant: str) -> FluxTransformer2DModel:
    """A tiny transformer with every weight random: diffusers zero-initialises some (adaLN), and a round trip of
    zeros could not tell a swap or a wrong part order."""
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**VARIANTS[variant])
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param))
    return model


def diffusers_converter(inner_dim: int):
    """diffusers' own converter, its hard-coded FLUX.1 width (`inner_dim = 3072`, single_file_utils.py:2305: it
    splits linear1 by it) set to the tiny model's; the rest of its source runs unchanged."""
    source = inspect.getsource(single_file_utils.convert_flux_transformer_checkpoint_to_diffusers)
    assert source.count("inner_dim = 3072\n") == 1  # diffusers changed: this test must be looked at again
    namespace = dict(vars(single_file_utils))
    exec(compile(source.replace("inner_dim = 3072\n", f"inner_dim = {inner_dim}\n"), single_file_utils.__file__,
                 "exec"), namespace)
    return namespace["convert_flux_transformer_checkpoint_to_diffusers"]


def layers(model: nn.Module) -> list[str]:
    return [p for p, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def model(request):
    torch.set_num_threads(1)
    return tiny_transformer(request.param)


def counts(model) -> tuple[int, int]:
    return model.config.num_layers, model.config.num_single_layers


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_round_trip_through_diffusers_converter_is_bit_exact(model, prefix):
    sd = model.state_dict()
    original = transformer_to_original(sd, model.config, prefix)
    assert all(k.startswith(prefix) for k in original)
    back = diffusers_converter(H)(dict(original))
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd), [k for k in sd if not torch.equal(back[k], sd[k])]


def test_original_keys_are_the_bfl_layout(model):
    original = transformer_to_original(model.state_dict(), model.config)
    single = model.single_transformer_blocks[1]
    linear1 = original["single_blocks.1.linear1.weight"]
    assert linear1.shape == (7 * H, H)  # q, k, v, then the 4h MLP input
    assert torch.equal(linear1[H:2 * H], single.attn.to_k.weight)
    assert torch.equal(linear1[3 * H:], single.proj_mlp.weight)
    assert torch.equal(original["single_blocks.1.linear2.weight"], single.proj_out.weight)
    qkv = original["double_blocks.0.txt_attn.qkv.bias"]
    assert torch.equal(qkv[2 * H:], model.transformer_blocks[0].attn.add_v_proj.bias)
    # modulation copied as it is; only the final layer stores (shift, scale): diffusers' second half comes first
    block = model.transformer_blocks[1]
    assert torch.equal(original["double_blocks.1.txt_mod.lin.weight"], block.norm1_context.linear.weight)
    ada, ours = original["final_layer.adaLN_modulation.1.weight"], model.norm_out.linear.weight
    assert torch.equal(ada[:H], ours[H:]) and not torch.equal(ada, ours)
    assert torch.equal(original["double_blocks.1.img_attn.norm.key_norm.scale"], block.attn.norm_k.weight)
    assert ("guidance_in.in_layer.weight" in original) == model.config.guidance_embeds


def test_every_layer_has_an_original_module(model):
    seen = {}
    for path in layers(model):
        bfl, part, parts, swap = original_module(path, *counts(model))
        assert 0 <= part < parts
        seen.setdefault(bfl, set()).add(part)
    assert all(parts == set(range(len(parts))) for parts in seen.values())  # no part claimed twice, none missing
    assert original_module("single_transformer_blocks.1.proj_mlp", 2, 2) == ("single_blocks.1.linear1", 3, 4, False)
    assert original_module("single_transformer_blocks.1.proj_out", 2, 2) == ("single_blocks.1.linear2", 0, 1, False)
    assert original_module("transformer_blocks.1.attn.add_k_proj", 2, 2) == ("double_blocks.1.txt_attn.qkv", 1, 3,
                                                                               False)
    assert original_module("transformer_blocks.0.norm1.linear", 2, 2) == ("double_blocks.0.img_mod.lin", 0, 1, False)
    assert original_module("norm_out.linear", 2, 2) == ("final_layer.adaLN_modulation.1", 0, 1, True)
    assert original_module("proj_out", 2, 2) == ("final_layer.linear", 0, 1, False)


@pytest.mark.parametrize("path", ["transformer_blocks.2.attn.to_q", "single_transformer_blocks.2.proj_mlp",
                                  "single_transformer_blocks.0.attn.to_out.0", "transformer_blocks.0.proj_mlp",
                                  "pos_embed.proj", "transformer_blocks.x.attn.to_q"])
def test_unknown_paths_are_key_errors_naming_the_path(path):
    with pytest.raises(KeyError, match=path.replace(".", r"\.")):
        original_module(path, 2, 2)


def test_kohya_file_layout_fuses_qkv_and_linear1(model):
    index = module_index(model)
    layout = kohya_file_layout(index, *counts(model))
    by_name = {f.name: f for f in layout}
    fused = {f.name for f in layout if len(f.parts) > 1}
    expected = {f"lora_unet_double_blocks_{i}_{s}_attn_qkv" for i in range(2) for s in ("img", "txt")}
    expected |= {f"lora_unet_single_blocks_{i}_linear1" for i in range(2)}
    assert fused == expected
    linear1 = by_name["lora_unet_single_blocks_1_linear1"]
    assert linear1.rows == (H, H, H, 4 * H)  # unequal
    assert linear1.parts[3] == "lora_unet_single_transformer_blocks_1_proj_mlp"
    qkv = by_name["lora_unet_double_blocks_0_txt_attn_qkv"]
    assert qkv.parts == tuple(kohya_name("lora_unet", f"transformer_blocks.0.attn.add_{c}_proj") for c in "qkv")
    assert qkv.rows == (H, H, H)
    assert sorted(p for f in layout for p in f.parts) == sorted(index)  # each module once, every one
    assert {f.name for f in layout if f.swap_halves} == {"lora_unet_final_layer_adaLN_modulation_1"}
    # sd-scripts' names (networks/lora_flux.py:826-827 over flux_models.py's modules)
    for name in ("lora_unet_double_blocks_1_img_mod_lin", "lora_unet_double_blocks_1_txt_mlp_2",
                 "lora_unet_double_blocks_0_img_attn_proj", "lora_unet_single_blocks_0_modulation_lin",
                 "lora_unet_single_blocks_0_linear2", "lora_unet_img_in", "lora_unet_time_in_out_layer"):
        assert len(by_name[name].parts) == 1
    assert by_name["lora_unet_single_blocks_0_linear2"].rows == (H,)
    assert ("lora_unet_guidance_in_in_layer" in by_name) == model.config.guidance_embeds


def test_kohya_file_layout_completes_partial_groups_with_unequal_rows(model):
    index = module_index(model)
    only_v = {n: e for n, e in index.items() if e[1] == "single_transformer_blocks.0.attn.to_v"}
    only_v["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"] = ("lora_te1", "x", nn.Linear(2, 2))
    (fused,) = kohya_file_layout(only_v, *counts(model))
    assert fused.name == "lora_unet_single_blocks_0_linear1"
    assert fused.parts[2] == "lora_unet_single_transformer_blocks_0_attn_to_v" and len(fused.parts) == 4
    assert fused.rows == (H, H, H, 4 * H)  # the missing MLP part's rows from the width, not a sibling's


def test_fused_linear1_splits_back_by_its_unequal_rows(model):
    """Write the adapter's linear1 parts as one kohya module and read them back from the names and up rows only."""
    torch.manual_seed(1)
    layout = kohya_file_layout(module_index(model), *counts(model))
    linear1 = next(f for f in layout if f.name == "lora_unet_single_blocks_0_linear1")
    layers = {p: LoraLayer(down=torch.randn(2, H), up=torch.randn(r, 2), alpha=1.0)
              for p, r in zip(linear1.parts, linear1.rows)}
    written = fuse_layers(layers, [linear1])
    up_rows = written[linear1.name].up.shape[0]
    assert up_rows == 7 * H
    (read,) = file_parts([linear1.name], rows_of={linear1.name: up_rows})
    back = split_layers(written, [read])
    assert set(back) == set(layers)
    assert all(torch.equal(back[p].up, layers[p].up) and torch.equal(back[p].down, layers[p].down) for p in layers)


def test_file_parts_reads_back_what_the_layout_writes(model):
    written = kohya_file_layout(module_index(model), *counts(model))
    other = ["lora_unet_transformer_blocks_0_attn_to_q", "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
             "lora_te3_encoder_block_0_layer_0_SelfAttention_q"]
    rows_of = {f.name: sum(f.rows) for f in written}
    read = file_parts([f.name for f in written] + other, None, None, rows_of)
    assert [(f.name, f.parts, f.swap_halves) for f in read] == [(f.name, f.parts, f.swap_halves) for f in written]
    assert [f.rows for f in read if len(f.parts) > 1] == [f.rows for f in written if len(f.parts) > 1]
    assert file_parts([f.name for f in written], *counts(model), rows_of) == read


def test_file_parts_without_rows_takes_flux1_widths_and_bounds_blocks():
    (linear1, qkv) = file_parts(["lora_unet_single_blocks_37_linear1", "lora_unet_double_blocks_18_img_attn_qkv"])
    assert linear1.rows == (3072, 3072, 3072, 12288)  # diffusers' own split (single_file_utils.py:2453-2455)
    assert qkv.rows == (3072,) * 3
    assert qkv.parts[1] == "lora_unet_transformer_blocks_18_attn_to_k"
    assert file_parts(["lora_unet_single_blocks_37_linear1"], 19, 38)[0].name == "lora_unet_single_blocks_37_linear1"
    assert file_parts(["lora_unet_single_blocks_38_linear1", "lora_unet_double_blocks_19_img_mlp_0"], 19, 38) == []
    odd = "lora_unet_single_blocks_0_linear1"
    assert file_parts([odd], rows_of={odd: 30})[0].rows == ()  # 30 is no 7h: the reader reports it


def test_original_to_transformer_reads_back_what_transformer_to_original_wrote():
    """Loading a BFL single file at any width (diffusers' converter fixes FLUX.1's 3072): the exact inverse."""
    from trainer.models.flux_layout import ORIGINAL_PREFIX, original_to_transformer, transformer_to_original
    for variant in VARIANTS:
        model = tiny_transformer(variant)
        state = model.state_dict()
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        for prefix in ("", ORIGINAL_PREFIX):
            original = transformer_to_original(state, model.config, prefix=prefix)
            back = original_to_transformer(original, shapes, 2, 2)
            assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
