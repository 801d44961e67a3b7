"""trainer.formats: kohya names, every layout we read, what we write, and the SD1.5 key set (issue 2, issue 4)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch
from peft import LoraConfig, inject_adapter_in_model
from safetensors import safe_open

from tiny import tiny_components
from trainer.config import TrainConfig
from trainer.formats import (AdapterFormatError, adapter_from_model, align_to_model, build_metadata,
                             check_against_model, detect_format, export_adapter, kohya_name, load_adapter,
                             module_index, resolve_paths, save_adapter)
from trainer.lora_state import Adapter, LoraLayer

Q = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
TE_Q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"


def random_adapter(seed: int = 0) -> Adapter:
    """A linear layer with alpha, a text-encoder layer without alpha, and a 3x3 conv (LoCon) layer."""
    g = torch.Generator().manual_seed(seed)
    return Adapter(layers={
        Q: LoraLayer(torch.randn(4, 64, generator=g), torch.randn(64, 4, generator=g), alpha=8.0),
        TE_Q: LoraLayer(torch.randn(2, 32, generator=g), torch.randn(32, 2, generator=g), alpha=None),
        CONV: LoraLayer(torch.randn(4, 32, 3, 3, generator=g), torch.randn(32, 4, 1, 1, generator=g), alpha=2.0),
    })


def assert_same_deltas(got: Adapter, expected: Adapter, atol: float = 1e-6):
    assert set(got.layers) == set(expected.layers)
    for name, layer in expected.layers.items():
        torch.testing.assert_close(got.layers[name].delta(), layer.delta(), atol=atol, rtol=1e-5, msg=name)


def write(path: Path, tensors: dict, metadata: dict | None = None) -> Path:
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


# ---------------------------------------------------------------------------------------------------------------
# names

def test_kohya_names_of_unet_and_text_encoder_paths():
    assert kohya_name("lora_unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0") == \
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0"
    # transformers 5.x (flattened) and 4.x paths give the one literal form ComfyUI maps
    assert kohya_name("lora_te", "encoder.layers.0.self_attn.q_proj") == TE_Q
    assert kohya_name("lora_te", "text_model.encoder.layers.0.self_attn.q_proj") == TE_Q
    assert kohya_name("lora_te2", "text_projection") == "lora_te2_text_projection"
    parts = tiny_components()  # back from a name to the module: through a model's index, never by word lists
    index = module_index(parts["unet"], {"lora_te": parts["text_encoder"]})
    found, unknown = resolve_paths([TE_Q, Q, "lora_unet_down_blocks_1_attentions_7_proj_in"], index)
    assert found[Q] == ("lora_unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
    assert found["lora_unet_down_blocks_1_attentions_7_proj_in"][1] == "down_blocks.1.attentions.7.proj_in"
    assert found[TE_Q] == index[TE_Q][:2] and not unknown
    with pytest.raises(ValueError, match="lora_vae"):
        kohya_name("lora_vae", "x")


def test_module_index_maps_peft_wrapped_layers_to_their_base_path():
    parts = tiny_components()
    plain = module_index(parts["unet"], {"lora_te": parts["text_encoder"]})
    parts["unet"].add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "proj_in"]))
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj"]), parts["text_encoder"])
    wrapped = module_index(parts["unet"], {"lora_te": parts["text_encoder"]})
    assert wrapped.keys() == plain.keys()
    prefix, path, module = wrapped[Q]
    assert (prefix, path, type(module)) == ("lora_unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
                                            torch.nn.Linear)
    assert wrapped[TE_Q][1] == "encoder.layers.0.self_attn.q_proj"
    assert not any("lora_A" in name or "base_layer" in name for name in wrapped)


def test_adapter_from_model_reads_peft_tensors_and_alpha():
    parts = tiny_components()
    parts["unet"].add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "proj_in"],
                                         init_lora_weights="gaussian"))
    adapter = adapter_from_model(parts["unet"], {})
    wrapped = parts["unet"].get_submodule("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
    layer = adapter.layers[Q]
    assert torch.equal(layer.down, wrapped.lora_A["default"].weight)
    assert layer.down.data_ptr() != wrapped.lora_A["default"].weight.data_ptr() and not layer.down.requires_grad
    assert layer.alpha == 8.0 and layer.scale == wrapped.scaling["default"]
    assert len(adapter) == 6 * 2 + 6  # 12 attn1/attn2 to_q, 6 proj_in
    # the tiny UNet's proj_in is a Linear; both shapes of a 1x1 conv are checked on the SD1.5 UNet below


# ---------------------------------------------------------------------------------------------------------------
# round trips through every layout

@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_our_files_round_trip(tmp_path, layout):
    adapter = random_adapter()
    path = save_adapter(adapter, tmp_path / "a.safetensors", format=layout, dtype="fp32")
    assert detect_format(path) == layout
    loaded = load_adapter(path)
    assert_same_deltas(loaded, adapter)
    assert loaded.layers[CONV].down.shape == (4, 32, 3, 3) and loaded.layers[CONV].up.shape == (32, 4, 1, 1)
    assert all(t.dtype == torch.float32 for layer in loaded.layers.values() for t in (layer.down, layer.up))


def test_kohya_files_as_sd_scripts_writes_them(tmp_path):
    """With and without alpha, LoCon conv keys with 4-d shapes, fp16."""
    adapter = random_adapter()
    tensors = {}
    for name, layer in adapter.layers.items():
        tensors[f"{name}.lora_down.weight"] = layer.down.half()
        tensors[f"{name}.lora_up.weight"] = layer.up.half()
        if layer.alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(layer.alpha).half()
    loaded = load_adapter(write(tmp_path / "kohya.safetensors", tensors, {"ss_network_dim": "4"}))
    assert loaded.layers[TE_Q].alpha is None and loaded.layers[Q].alpha == 8.0
    assert loaded.metadata["ss_network_dim"] == "4"
    assert_same_deltas(loaded, adapter, atol=2e-2)


def test_kohya_files_from_diffusers_converter_get_text_model_back(tmp_path):
    """diffusers' convert_state_dict_to_kohya under transformers 5.x writes lora_te1_encoder_... (no text_model)."""
    from diffusers.utils import convert_state_dict_to_kohya
    layer = random_adapter().layers[TE_Q]
    peft_dict = {"text_encoder.encoder.layers.0.self_attn.q_proj.lora_A.weight": layer.down,
                 "text_encoder.encoder.layers.0.self_attn.q_proj.lora_B.weight": layer.up}
    converted = convert_state_dict_to_kohya(peft_dict)
    assert "lora_te1_encoder_layers_0_self_attn_q_proj.lora_down.weight" in converted
    loaded = load_adapter(write(tmp_path / "converted.safetensors", converted))
    assert list(loaded.layers) == ["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"]
    parts = tiny_components()
    aligned = align_to_model(loaded, module_index(parts["unet"], {"lora_te": parts["text_encoder"]}))
    assert list(aligned.layers) == [TE_Q]


def test_diffusers_files_as_save_lora_weights_writes_them(tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict
    parts = tiny_components()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_out.0"], init_lora_weights="gaussian")
    parts["unet"].add_adapter(config)
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=1, target_modules=["k_proj"]), parts["text_encoder"])
    _randomise_lora_b(parts["unet"], parts["text_encoder"])
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=get_peft_model_state_dict(parts["unet"]),
        text_encoder_lora_layers=get_peft_model_state_dict(parts["text_encoder"]),
        unet_lora_adapter_metadata=parts["unet"].peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=parts["text_encoder"].peft_config["default"].to_dict())
    path = tmp_path / "pytorch_lora_weights.safetensors"
    assert detect_format(path) == "diffusers"
    expected = adapter_from_model(parts["unet"], {"lora_te": parts["text_encoder"]})
    loaded = load_adapter(path)
    assert loaded.layers[TE_Q.replace("q_proj", "k_proj")].alpha == 1.0 and loaded.layers[Q].alpha == 8.0
    assert_same_deltas(loaded, expected)


def test_old_diffusers_layouts(tmp_path):
    """`unet.<path>.lora.down.weight`, `text_encoder.<path>.lora_linear_layer.*` and attention-processor keys."""
    adapter = random_adapter()
    parts = tiny_components()
    q_path = resolve_paths([Q], module_index(parts["unet"], {}))[0][Q][1]
    q, te_q, conv = adapter.layers[Q], adapter.layers[TE_Q], adapter.layers[CONV]
    tensors = {
        f"unet.{q_path}.lora.down.weight": q.down, f"unet.{q_path}.lora.up.weight": q.up,
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight": te_q.down,
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight": te_q.up,
        "unet.down_blocks.0.resnets.0.conv1.lora.down.weight": conv.down,
        "unet.down_blocks.0.resnets.0.conv1.lora.up.weight": conv.up,
    }
    expected = Adapter(layers={n: LoraLayer(l.down, l.up, None) for n, l in adapter.layers.items()})
    assert_same_deltas(load_adapter(write(tmp_path / "old.safetensors", tensors)), expected)

    processor = {q_path.replace("attn1.to_q", "attn1.processor.to_q_lora.down.weight"): q.down,
                 q_path.replace("attn1.to_q", "attn1.processor.to_q_lora.up.weight"): q.up}
    loaded = load_adapter(write(tmp_path / "processor.safetensors", processor))
    assert list(loaded.layers) == [Q]


def test_peft_files_as_save_pretrained_writes_them(tmp_path):
    from peft import get_peft_model
    parts = tiny_components()
    peft_model = get_peft_model(parts["text_encoder"], LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                                  use_rslora=True, init_lora_weights="gaussian"))
    _randomise_lora_b(peft_model)
    peft_model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    assert detect_format(path) == "peft"
    loaded = load_adapter(path)
    assert TE_Q in loaded.layers and len(loaded) == 2
    assert loaded.layers[TE_Q].scale == pytest.approx(8 / 4 ** 0.5)  # rsLoRA: alpha/sqrt(r)
    assert_same_deltas(loaded, adapter_from_model(None, {"lora_te": parts["text_encoder"]}))


def test_export_adapter_converts_between_layouts(tmp_path):
    adapter = random_adapter()
    kohya = save_adapter(adapter, tmp_path / "a.safetensors", dtype="fp32", metadata={"ss_seed": "7"})
    diffusers = export_adapter(kohya, tmp_path / "b.safetensors", format="diffusers", dtype="fp32")
    back = export_adapter(diffusers, tmp_path / "c.safetensors", format="kohya", dtype="fp32")
    assert_same_deltas(load_adapter(back), adapter)
    assert load_adapter(back).metadata["ss_seed"] == "7"
    # diffusers refuses a kohya file (network alphas) that also carries its peft config ("cannot be specified both")
    assert "lora_adapter_metadata" in load_adapter(diffusers).metadata
    assert "lora_adapter_metadata" not in load_adapter(back).metadata


def test_kohya_writer_gives_every_layer_one_alpha_and_keeps_deltas(tmp_path):
    """diffusers applies one alpha to a kohya file; differing alphas are folded into up."""
    adapter = random_adapter()
    path = save_adapter(adapter, tmp_path / "a.safetensors", dtype="fp32")
    with safe_open(str(path), framework="pt") as f:
        alphas = {f.get_tensor(k).item() for k in f.keys() if k.endswith(".alpha")}
    assert len(alphas) == 1
    assert_same_deltas(load_adapter(path), adapter)
    adapter.layers[Q].alpha = 0.0  # a zero delta must not become everyone's alpha
    assert_same_deltas(load_adapter(save_adapter(adapter, path, dtype="fp32")), adapter)


# ---------------------------------------------------------------------------------------------------------------
# refusals

@pytest.mark.parametrize("name", ["lora.ckpt", "lora.safetensors"])
def test_pickles_are_refused(tmp_path, name):
    path = tmp_path / name
    torch.save({f"{Q}.lora_down.weight": torch.zeros(4, 64)}, path)
    with pytest.raises(AdapterFormatError, match="pickle") as info:
        load_adapter(path)
    assert str(path) in str(info.value)


def test_missing_and_damaged_files_are_named(tmp_path):
    with pytest.raises(AdapterFormatError, match="does not exist"):
        load_adapter(tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(AdapterFormatError, match="junk.safetensors"):
        load_adapter(tmp_path / "junk.safetensors")


def test_unknown_keys_are_listed(tmp_path):
    # LyCORIS's OFT keys: a LyCORIS algorithm loradesk does not read (LoHa/LoKr it reads: test_lycoris_files.py)
    tensors = {f"lora_unet_block_{i}.oft_blocks": torch.zeros(2, 2) for i in range(12)}
    tensors.update({f"lora_unet_block_{i}.oft_diag": torch.zeros(2, 2) for i in range(12)})
    tensors[f"{Q}.lora_down.weight"], tensors[f"{Q}.lora_up.weight"] = torch.zeros(4, 64), torch.zeros(64, 4)
    path = write(tmp_path / "loha.safetensors", tensors)
    with pytest.raises(AdapterFormatError) as info:
        load_adapter(path)
    message = str(info.value)
    assert str(path) in message and "24 key(s)" in message and "and 14 more" in message
    assert message.count(".oft_") == 10 and "OFT" in message


def test_malformed_layers_are_named(tmp_path):
    tensors = {f"{Q}.lora_down.weight": torch.zeros(4, 64), f"{Q}.lora_up.weight": torch.zeros(64, 8),
               f"{TE_Q}.lora_down.weight": torch.zeros(4, 32)}
    with pytest.raises(AdapterFormatError) as info:
        load_adapter(write(tmp_path / "bad.safetensors", tensors))
    assert f"{Q}: up (64, 8) does not match down (4, 64)" in str(info.value)
    assert f"{TE_Q}: has lora_down but no lora_up" in str(info.value)


def test_check_against_model_names_missing_layers_and_both_shapes():
    parts = tiny_components()
    index = module_index(parts["unet"], {"lora_te": parts["text_encoder"]})
    check_against_model(random_adapter(), index)  # fits: no error
    layers = {f"lora_unet_not_a_module_{i}": LoraLayer(torch.zeros(1, 2), torch.zeros(2, 1)) for i in range(25)}
    layers[Q] = LoraLayer(torch.zeros(4, 320), torch.zeros(320, 4))
    with pytest.raises(AdapterFormatError) as info:
        check_against_model(Adapter(layers=layers), index)
    message = str(info.value)
    assert "25 layer(s) have no module" in message and "and 5 more" in message
    assert f"{Q}: adapter delta shape (320, 320) vs model weight shape (64, 64)" in message


# ---------------------------------------------------------------------------------------------------------------
# writing

def test_atomic_write_leaves_no_temp_file_and_never_clobbers(tmp_path, monkeypatch):
    path = save_adapter(random_adapter(), tmp_path / "a.safetensors")
    assert os.listdir(tmp_path) == ["a.safetensors"]
    before = path.read_bytes()

    def half_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.torch, "save_file", half_write)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(random_adapter(seed=1), path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["a.safetensors"]


@pytest.mark.parametrize("dtype, torch_dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16),
                                                ("fp32", torch.float32)])
@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_dtype_options(tmp_path, dtype, torch_dtype, layout):
    path = save_adapter(random_adapter(), tmp_path / "a.safetensors", format=layout, dtype=dtype)
    with safe_open(str(path), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch_dtype}  # alpha too, as sd-scripts casts it
    assert_same_deltas(load_adapter(path), random_adapter(), atol=0.5 if dtype == "bf16" else 5e-2)


def test_bad_format_dtype_and_metadata_are_refused(tmp_path):
    with pytest.raises(ValueError, match="fp16"):
        save_adapter(random_adapter(), tmp_path / "a.safetensors", dtype="fp8")
    with pytest.raises(ValueError, match="kohya"):
        save_adapter(random_adapter(), tmp_path / "a.safetensors", format="lycoris")
    with pytest.raises(AdapterFormatError, match="ss_seed"):
        save_adapter(random_adapter(), tmp_path / "a.safetensors", metadata={"ss_seed": 7})
    with pytest.raises(ValueError, match="safetensors"):
        save_adapter(random_adapter(), tmp_path / "a.ckpt")
    with pytest.raises(AdapterFormatError, match="no layers"):
        save_adapter(Adapter(), tmp_path / "a.safetensors")
    assert not list(tmp_path.iterdir())


def test_build_metadata_is_all_strings_with_the_kohya_and_modelspec_keys(tmp_path):
    cfg = TrainConfig()
    from trainer.models import get_family
    sd1 = get_family("sd1").metadata(None)
    meta = build_metadata(cfg=cfg, num_train_images=12, tag_frequency={"data": {"red square": 3}},
                          started_at=1_700_000_000.5, finished_at=1_700_000_600.25, family=sd1)
    required = ["ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_base_model_version",
                "ss_v2", "ss_resolution", "ss_num_train_images", "ss_learning_rate", "ss_unet_lr",
                "ss_text_encoder_lr", "ss_optimizer", "ss_lr_scheduler", "ss_max_train_steps", "ss_num_epochs",
                "ss_seed", "ss_mixed_precision", "ss_noise_offset", "ss_min_snr_gamma", "ss_tag_frequency",
                "ss_output_name", "ss_training_started_at", "ss_training_finished_at", "modelspec.sai_model_spec",
                "modelspec.architecture", "modelspec.implementation", "modelspec.title", "modelspec.date",
                "modelspec.resolution", "loradesk_version"]
    assert not [k for k in required if k not in meta]
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == str(cfg.network.rank)
    assert meta["ss_resolution"] == "(512, 512)" and meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["ss_v2"] == "False" and meta["ss_training_started_at"] == "1700000000.5"
    assert json.loads(meta["ss_tag_frequency"]) == {"data": {"red square": 3}}
    assert json.loads(meta["ss_network_args"])["unet_targets"] == ["attention"]
    assert meta["modelspec.date"].startswith("2023-11-1")
    assert meta["ss_base_model_version"] == "sd_v1" and meta["modelspec.implementation"] == "diffusers"
    path = save_adapter(random_adapter(), tmp_path / "a.safetensors", metadata=meta)
    assert load_adapter(path).metadata["ss_tag_frequency"] == meta["ss_tag_frequency"]


# ---------------------------------------------------------------------------------------------------------------
# the SD1.5 key set (issue 2 acceptance), on the real configs with meta-device weights: nothing downloaded

UNET_DEFAULT = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"]
TE_DEFAULT = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
SD15_CONFIGS = Path(__file__).parents[1] / "trainer" / "models" / "configs" / "sd15"


def sd15_on_meta():
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    if (SD15_CONFIGS / "unet" / "config.json").is_file():
        unet_config = json.loads((SD15_CONFIGS / "unet" / "config.json").read_text())
        te_config = CLIPTextConfig.from_json_file(SD15_CONFIGS / "text_encoder" / "config.json")
    else:  # the same values, until the shipped configs land
        unet_config = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                           attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                           up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, sample_size=64)
        te_config = CLIPTextConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                   intermediate_size=3072, vocab_size=49408, max_position_embeddings=77)
    with init_empty_weights():
        return UNet2DConditionModel.from_config(unet_config), CLIPTextModel(te_config)


def materialise_lora(*models):
    """peft puts LoRA weights beside their (meta) base weights; give only those real random values."""
    g = torch.Generator().manual_seed(0)
    for model in models:
        for name, module in model.named_modules():
            if name.endswith((".lora_A", ".lora_B")):
                module.to_empty(device="cpu")
                for p in module.parameters():
                    p.data = torch.randn(p.shape, generator=g)


@pytest.mark.parametrize("unet_targets, te_targets, n_unet, n_te", [
    (UNET_DEFAULT[:4], TE_DEFAULT[:4], 128, 48),
    (UNET_DEFAULT, TE_DEFAULT, 192, 72),
])
def test_sd15_key_set(tmp_path, unet_targets, te_targets, n_unet, n_te):
    unet, te = sd15_on_meta()
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964  # the real SD1.5 UNet
    index = module_index(unet, {"lora_te": te})
    # the name -> path inversion holds for every adaptable module of SD1.5, by the shapes of another model's names
    tiny = tiny_components()
    found, unknown = resolve_paths(index, module_index(tiny["unet"], {"lora_te": tiny["text_encoder"]}))
    assert all(found[name][1] == path for name, (prefix, path, _) in index.items() if name in found)
    assert len(found) > 300 and all(n.startswith("lora_unet_") for n in unknown)  # blocks the tiny UNet lacks
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=unet_targets, init_lora_weights="gaussian"))
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=te_targets), te)
    materialise_lora(unet, te)
    adapter = adapter_from_model(unet, {"lora_te": te})
    check_against_model(adapter, index)
    path = save_adapter(adapter, tmp_path / "sd15.safetensors")
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    names = {k.split(".")[0] for k in keys}
    assert len([n for n in names if n.startswith("lora_unet_")]) == n_unet
    assert len([n for n in names if n.startswith("lora_te_text_model_encoder_layers_")]) == n_te
    assert sorted(keys) == sorted(f"{n}.{s}" for n in names for s in ("lora_down.weight", "lora_up.weight", "alpha"))
    if n_unet == 128:
        unet_params = sum(l.down.numel() + l.up.numel() for n, l in adapter.layers.items() if n.startswith("lora_unet"))
        assert unet_params == 797_184 == 199_296 * 4
    else:  # proj_in/proj_out are 1x1 convs in SD1.5
        proj_in = adapter.layers["lora_unet_mid_block_attentions_0_proj_in"]
        assert proj_in.down.shape == (4, 1280, 1, 1) and proj_in.up.shape == (1280, 4, 1, 1)


def _randomise_lora_b(*models):
    g = torch.Generator().manual_seed(5)
    for model in models:
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data = torch.randn(p.shape, generator=g)


def test_a_safetensors_header_length_starting_with_0x80_is_not_taken_for_a_pickle(tmp_path):
    import struct
    import torch
    from safetensors.torch import save_file
    from trainer.formats import load_adapter
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    for pad in range(0, 400):  # find metadata whose header length has 0x80 as its low byte
        path = tmp_path / "a.safetensors"
        save_file({f"{name}.lora_down.weight": torch.ones(2, 4), f"{name}.lora_up.weight": torch.ones(4, 2),
                   f"{name}.alpha": torch.tensor(2.0)}, str(path), metadata={"pad": "x" * pad})
        if struct.unpack("<Q", path.read_bytes()[:8])[0] & 0xFF == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    assert len(load_adapter(path)) == 1
