"""Baking adapters into the base model: the original single-file layout read back by two independent readers (the
engine's single-file loader and diffusers' from_single_file), SD1.5's key names, and the diffusers folder."""
from __future__ import annotations

import pytest
import torch

from test_adapters import K, Q, TE_Q, V, random_adapter
from trainer.formats import module_index, save_adapter
from trainer.models import load_base_model
from trainer.adapters.bake import bake, save_diffusers
from trainer.adapters.original_layout import original_checkpoint


def _baked_and_base(tiny_model_dir):
    base = load_base_model(str(tiny_model_dir))
    index = module_index(base.denoiser, base.text_encoders)
    adapter = random_adapter(index, [Q, K, V, TE_Q], rank=4, seed=7)
    return base, index, adapter


def _component(model, name: str):
    """A BaseModel's denoiser is a diffusers pipeline's unet."""
    return model.denoiser if name == "unet" and hasattr(model, "denoiser") else getattr(model, name)


def _same_weights(a, b) -> None:
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = _component(a, name).state_dict(), _component(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        bad = [k for k in sa if not torch.equal(sa[k].float(), sb[k].float())]
        assert not bad, f"{name}: {bad[:3]}"


def test_single_file_round_trip_through_both_readers(tiny_model_dir, tmp_path):
    base, index, adapter = _baked_and_base(tiny_model_dir)
    out = tmp_path / "baked.safetensors"
    assert bake(str(tiny_model_dir), [(adapter, 0.8)], out, dtype="fp32") == out
    expected = load_base_model(str(tiny_model_dir))
    from trainer.adapters.bake import fuse_into
    fuse_into(expected, [(adapter, 0.8)])
    # the baked weights are W0 + 0.8 * delta ...
    w0 = base.denoiser.get_submodule(index[Q][1]).weight
    baked_q = expected.denoiser.get_submodule(index[Q][1]).weight
    assert torch.allclose(baked_q - w0, 0.8 * adapter.layers[Q].delta(), atol=1e-6)
    # ... and the engine's single-file loader reads exactly them back
    engine = load_base_model(str(out), config_dir=tiny_model_dir)
    _same_weights(engine, expected)
    # diffusers' own reader agrees (an independent check of the layout)
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_single_file(str(out), config=str(tiny_model_dir), local_files_only=True,
                                                    safety_checker=None)
    _same_weights(pipe, expected)


def test_single_file_defaults_to_fp16_with_metadata(tiny_model_dir, tmp_path):
    _, _, adapter = _baked_and_base(tiny_model_dir)
    save_adapter(adapter, tmp_path / "a.safetensors", dtype="fp32")
    from trainer.adapters.cli import main
    out = tmp_path / "baked.safetensors"
    assert main(["bake", "--model", str(tiny_model_dir), f"{tmp_path / 'a.safetensors'}:0.8", "--out", str(out)]) == 0
    from safetensors import safe_open
    with safe_open(str(out), "pt") as f:
        assert f.get_slice("model.diffusion_model.out.2.weight").get_dtype() == "F16"
        assert "a.safetensors" in f.metadata()["loradesk.baked_adapters"]


def test_sd15_names_match_the_original_layout():
    """Build SD1.5-size models on the meta device (no memory), convert, and let diffusers convert back."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint)
    from transformers import CLIPTextConfig, CLIPTextModel
    from trainer.models.sd1 import DEFAULT_CONFIG_DIR as sd15
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(sd15, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(sd15, subfolder="vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(sd15, subfolder="text_encoder"))
    ckpt = original_checkpoint(unet, vae, text_encoder)
    for key, shape in {
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (320, 320),
        "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "model.diffusion_model.middle_block.1.proj_in.weight": (1280, 1280, 1, 1),
        "model.diffusion_model.middle_block.2.in_layers.2.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "model.diffusion_model.time_embed.2.weight": (1280, 1280),
        "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
        "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "first_stage_model.decoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "first_stage_model.encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
        "first_stage_model.encoder.norm_out.weight": (512,),
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,),
    }.items():
        assert tuple(ckpt[key].shape) == shape, key
    back = convert_ldm_unet_checkpoint(ckpt, dict(unet.config))
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    back = convert_ldm_vae_checkpoint(ckpt, dict(vae.config))
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    back = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(ckpt).items()}
    assert back.keys() == text_encoder.state_dict().keys()


def test_diffusers_folder_bake_and_safe_overwrite(tiny_model_dir, tmp_path):
    _, _, adapter = _baked_and_base(tiny_model_dir)
    out = tmp_path / "baked"
    bake(str(tiny_model_dir), [(adapter, -0.5)], out)
    expected = load_base_model(str(tiny_model_dir))
    from trainer.adapters.bake import fuse_into
    fuse_into(expected, [(adapter, -0.5)])
    _same_weights(load_base_model(str(out)), expected)
    bake(str(tiny_model_dir), [(adapter, 0.0)], out)  # replaces the earlier model folder
    _same_weights(load_base_model(str(out)), load_base_model(str(tiny_model_dir)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["baked"]  # no temporary folders left behind
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "me.jpg").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="not a diffusers model folder"):
        save_diffusers(expected, tmp_path / "photos")


def test_cli_bake_rejects_an_adapter_for_another_model(tiny_model_dir, tmp_path, capsys):
    from trainer.lora_state import Adapter, LoraLayer
    foreign = Adapter({"lora_unet_input_blocks_4_1_proj_in": LoraLayer(torch.ones(2, 8), torch.ones(8, 2), 2.0)})
    save_adapter(foreign, tmp_path / "sdxl.safetensors", dtype="fp32")
    from trainer.adapters.cli import main
    assert main(["bake", "--model", str(tiny_model_dir), str(tmp_path / "sdxl.safetensors"),
                 "--out", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "made for SDXL" in err and "Stable Diffusion 1.x" in err and "'sdxl.safetensors'" in err  # by its file
    assert not (tmp_path / "x.safetensors").exists()
    assert main(["bake", "--model", str(tmp_path / "no-model"), str(tmp_path / "sdxl.safetensors"),
                 "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "no-model" in capsys.readouterr().err


def test_commands_are_registered_in_the_main_cli():
    from trainer.__main__ import build_parser
    parser = build_parser()
    for argv, name in ((["blend", "a.safetensors:0.5", "--out", "c.safetensors"], "cmd_blend"),
                       (["resize", "a.safetensors", "--keep", "0.9", "--out", "b.safetensors"], "cmd_resize"),
                       (["bake", "a.safetensors", "--out", "m.safetensors"], "cmd_bake"),
                       (["analyze", "a.safetensors", "--out", "d"], "cmd_analyze"),
                       (["generate", "--prompt", "x", "--out", "i.png"], "cmd_generate")):
        assert parser.parse_args(argv).func.__name__ == name


def test_adapters_are_named_by_file_in_errors(tmp_path):
    from trainer.adapters.bake import adapter_labels
    from trainer.lora_state import Adapter
    memory = Adapter({})
    assert adapter_labels([tmp_path / "a.safetensors", memory, str(tmp_path / "b.safetensors")]) == \
        ["a.safetensors", "in-memory adapter 2", "b.safetensors"]
    assert adapter_labels(["x/a.safetensors", "y/a.safetensors"]) == ["a.safetensors (#1)", "a.safetensors (#2)"]
