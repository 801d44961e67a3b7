"""Fused kohya layouts (SD3's qkv in the SAI/sd-scripts files), the transformer component of the diffusers layout,
and foreign SD3 files (SimpleTuner's diffusers keys, OneTrainer's default keys). Synthetic adapters and layouts: the
formats side works with any list of FusedName, whatever family supplies it."""
from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from trainer.formats import read as read_module
from trainer.formats.fused import fuse, split
from trainer.formats.names import module_index
from trainer.formats.read import detect_format, load_adapter
from trainer.formats.write import kohya_tensors, save_adapter
from trainer.lora_state import Adapter, LoraLayer
from trainer.models.family import FusedName, TextEncoderSpec

torch.set_num_threads(1)

Q, K, V = "lora_unet_blocks_0_attn_to_q", "lora_unet_blocks_0_attn_to_k", "lora_unet_blocks_0_attn_to_v"
ADA, PROJ, OTHER = "lora_unet_blocks_0_norm1_linear", "lora_unet_blocks_0_attn_to_out_0", "lora_unet_blocks_0_ff"
QKV = FusedName("lora_unet_joint_0_attn_qkv", (Q, K, V), (8, 8, 8))
LAYOUT = [QKV,
          FusedName("lora_unet_joint_0_ada", (ADA,), (), swap_halves=True),
          FusedName("lora_unet_joint_0_attn_proj", (PROJ,), ())]


def _layer(gen, out, inp, rank, alpha):
    return LoraLayer(down=torch.randn(rank, inp, generator=gen), up=torch.randn(out, rank, generator=gen), alpha=alpha)


def _adapter(ranks=(3, 3, 3), alphas=(6.0, 6.0, 6.0), parts=(Q, K, V)) -> Adapter:
    gen = torch.Generator().manual_seed(0)
    layers = {name: _layer(gen, 8, 16, r, a) for name, r, a in zip((Q, K, V), ranks, alphas) if name in parts}
    layers[ADA] = _layer(gen, 12, 16, 2, 1.0)
    layers[PROJ] = _layer(gen, 16, 8, 4, 2.0)
    layers[OTHER] = _layer(gen, 4, 16, 2, 3.0)
    return Adapter(layers=layers)


class _Parts:
    """A stand-in family for reading: the file's fused names and their parts (Family.kohya_file_parts)."""
    kohya_file_parts = staticmethod(lambda names, metadata: LAYOUT)
    original_unet_names = False


def _write_and_read(tmp_path, monkeypatch, adapter, layout=LAYOUT, family=_Parts()):
    path = tmp_path / "fused.safetensors"
    safetensors.torch.save_file(kohya_tensors(adapter, torch.float32, layout), str(path))
    monkeypatch.setattr(read_module, "_family", lambda layers, meta: family)
    return load_adapter(path), safetensors.torch.load_file(str(path))


def test_fused_delta_is_the_stacked_split_deltas_bit_for_bit():
    adapter = _adapter()
    fused = fuse(adapter.layers, QKV)
    assert fused.rank == 9 and fused.alpha == 18.0  # alpha/R = 18/9 = 6/3: the parts' scale, not sd-scripts' 6/9
    stacked = torch.cat([adapter.layers[n].delta() for n in (Q, K, V)])
    assert torch.equal(fused.delta(), stacked)


def test_kohya_layout_round_trip_recovers_the_layers(tmp_path, monkeypatch):
    adapter = _adapter()
    back, tensors = _write_and_read(tmp_path, monkeypatch, adapter)
    assert {k.split(".")[0] for k in tensors} == {"lora_unet_joint_0_attn_qkv", "lora_unet_joint_0_ada",
                                                 "lora_unet_joint_0_attn_proj", OTHER}
    # each module its own alpha (no shared one); the swapped single's up rows in the file's order
    assert float(tensors["lora_unet_joint_0_attn_proj.alpha"]) == 2.0
    assert float(tensors[f"{OTHER}.alpha"]) == 3.0
    assert torch.equal(tensors["lora_unet_joint_0_ada.lora_up.weight"][:6], adapter.layers[ADA].up[6:])
    assert set(back.layers) == set(adapter.layers)
    for name, layer in adapter.layers.items():
        assert back.layers[name].rank == layer.rank, name
        assert back.layers[name].alpha == layer.alpha, name
        assert torch.equal(back.layers[name].delta(), layer.delta()), name


def test_missing_part_is_zero_rows_and_reads_back_without_it(tmp_path, monkeypatch):
    adapter = _adapter(parts=(Q, V))
    back, tensors = _write_and_read(tmp_path, monkeypatch, adapter)
    up = tensors["lora_unet_joint_0_attn_qkv.lora_up.weight"]
    assert up.shape == (24, 6) and not up[8:16].any()
    assert K not in back.layers and back.layers[Q].rank == 3 and back.layers[V].rank == 3
    for name in (Q, V):
        assert torch.equal(back.layers[name].delta(), adapter.layers[name].delta())


def test_unequal_ranks_and_scales_keep_the_delta(tmp_path, monkeypatch):
    adapter = _adapter(ranks=(2, 3, 4), alphas=(4.0, 3.0, 1.0))
    fused = fuse(adapter.layers, QKV)
    assert fused.rank == 9 and fused.alpha / fused.rank == pytest.approx(2.0)  # the first part's scale
    stacked = torch.cat([adapter.layers[n].delta() for n in (Q, K, V)])
    torch.testing.assert_close(fused.delta(), stacked)
    back, _ = _write_and_read(tmp_path, monkeypatch, adapter)
    for name in (Q, K, V):  # not equal-rank blocks: each part keeps the whole down, the same delta
        assert back.layers[name].rank == 9
        torch.testing.assert_close(back.layers[name].delta(), adapter.layers[name].delta())


def test_non_block_diagonal_module_reads_back_to_the_exact_delta():
    gen = torch.Generator().manual_seed(1)
    other_tool = LoraLayer(down=torch.randn(6, 16, generator=gen), up=torch.randn(24, 6, generator=gen), alpha=3.0)
    parts = split(other_tool, FusedName("qkv", (Q, K, V), ()))  # rows=(): an equal split
    assert all(p.rank == 6 and p.alpha == 3.0 for p in parts.values())
    assert torch.equal(torch.cat([parts[n].delta() for n in (Q, K, V)]), other_tool.delta())


def test_sd_scripts_alpha_reads_at_the_scale_its_file_gives():
    # sd-scripts keeps the parts' alpha on the fused module (networks/lora_sd3.py:566): the file's scale is alpha/3r
    gen = torch.Generator().manual_seed(2)
    up = torch.block_diag(*[torch.randn(8, 2, generator=gen) for _ in range(3)])
    layer = LoraLayer(down=torch.randn(6, 16, generator=gen), up=up, alpha=2.0)
    parts = split(layer, QKV)
    assert [p.rank for p in parts.values()] == [2, 2, 2]
    assert all(p.scale == layer.scale for p in parts.values())
    assert torch.equal(torch.cat([parts[n].delta() for n in (Q, K, V)]), layer.delta())


# ---------------------------------------------------------------------------------------------------------------
# the diffusers layout of a transformer family

def _tiny_sd3_index() -> dict:
    from diffusers import SD3Transformer2DModel
    from transformers import T5Config, T5EncoderModel
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                        caption_projection_dim=16, pooled_projection_dim=8, out_channels=4)
    t5 = T5EncoderModel(T5Config(vocab_size=32, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2))
    return module_index(transformer, {"lora_te3": t5})


class _TransformerFamily:
    denoiser_component = "transformer"
    diffusers_alpha_folded = True
    text_encoder_specs = (TextEncoderSpec("lora_te1", "text_encoder", "CLIP-L"),
                          TextEncoderSpec("lora_te2", "text_encoder_2", "CLIP-G"),
                          TextEncoderSpec("lora_te3", "text_encoder_3", "T5"))


def test_diffusers_layout_of_a_transformer_family(tmp_path, monkeypatch):
    index = _tiny_sd3_index()
    te3 = "lora_te3_encoder_block_0_layer_0_SelfAttention_q"  # T5 paths keep their plain names (no text_model_)
    names = ["lora_unet_transformer_blocks_0_attn_to_q", "lora_unet_transformer_blocks_0_attn_add_k_proj", te3]
    assert all(n in index for n in names)
    gen = torch.Generator().manual_seed(3)
    # scales 2, 1 and 0.5: powers of two, so folding alpha/rank into up is exact
    layers = {n: LoraLayer(down=torch.randn(r, index[n][2].in_features, generator=gen),
                           up=torch.randn(index[n][2].out_features, r, generator=gen), alpha=a)
              for n, r, a in zip(names, (2, 4, 4), (4.0, 4.0, 2.0))}
    path = save_adapter(Adapter(layers=layers), tmp_path / "d.safetensors", format="diffusers", dtype="fp32",
                        index=index, family=_TransformerFamily())
    tensors = safetensors.torch.load_file(str(path))
    assert "transformer.transformer_blocks.0.attn.to_q.lora_B.weight" in tensors
    assert "text_encoder_3.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight" in tensors
    assert not any(k.startswith("unet.") for k in tensors)
    assert torch.equal(tensors["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"],
                       layers[names[0]].up * 2)
    with safetensors.safe_open(str(path), "pt") as f:
        config = json.loads(f.metadata()["lora_adapter_metadata"])
    assert config["transformer.lora_alpha"] == config["transformer.r"] == 4  # alpha = rank: scale 1, folded
    assert detect_format(path) == "diffusers"
    monkeypatch.setattr(read_module, "_family", lambda layers, meta: None)
    back = load_adapter(path)
    assert set(back.layers) == set(names)
    for name, layer in layers.items():
        assert torch.equal(back.layers[name].delta(), layer.delta()), name


def test_simpletuner_keys_read(tmp_path, monkeypatch):
    gen = torch.Generator().manual_seed(4)
    state = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(2, 16, generator=gen),
             "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(16, 2, generator=gen),
             "text_encoder_3.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight": torch.randn(2, 16, generator=gen),
             "text_encoder_3.encoder.block.0.layer.0.SelfAttention.q.lora_B.weight": torch.randn(16, 2, generator=gen)}
    path = tmp_path / "st.safetensors"
    safetensors.torch.save_file(state, str(path))
    monkeypatch.setattr(read_module, "_family", lambda layers, meta: None)
    assert set(load_adapter(path).layers) == {"lora_unet_transformer_blocks_0_attn_to_q",
                                              "lora_te3_encoder_block_0_layer_0_SelfAttention_q"}


def test_onetrainer_default_keys_read(tmp_path, monkeypatch):
    """OneTrainer's default SD3 output (its "mixture" layout, convert_lora_util.py:85-103): lora_transformer_ +
    the diffusers path, split q/k/v, lora_te1/2/3 text encoders, kohya suffixes with alpha."""
    gen = torch.Generator().manual_seed(5)
    modules = {"lora_transformer_transformer_blocks_0_attn_to_q": "lora_unet_transformer_blocks_0_attn_to_q",
               "lora_transformer_transformer_blocks_0_attn_add_k_proj":
                   "lora_unet_transformer_blocks_0_attn_add_k_proj",
               "lora_te1_text_model_encoder_layers_0_self_attn_q_proj":
                   "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
               "lora_te3_encoder_block_0_layer_0_SelfAttention_q": "lora_te3_encoder_block_0_layer_0_SelfAttention_q"}
    state = {}
    for name in modules:
        state[f"{name}.lora_down.weight"] = torch.randn(4, 16, generator=gen)
        state[f"{name}.lora_up.weight"] = torch.randn(16, 4, generator=gen)
        state[f"{name}.alpha"] = torch.tensor(2.0)
    path = tmp_path / "ot.safetensors"
    safetensors.torch.save_file(state, str(path))
    assert detect_format(path) == "kohya"
    monkeypatch.setattr(read_module, "_family", lambda layers, meta: None)
    back = load_adapter(path)
    assert set(back.layers) == set(modules.values())
    for file_name, name in modules.items():
        assert back.layers[name].alpha == 2.0
        assert torch.equal(back.layers[name].up, state[f"{file_name}.lora_up.weight"])
