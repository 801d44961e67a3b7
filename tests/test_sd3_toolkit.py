"""The adapter toolkit on SD 3.5: an SD3 run's adapter baked into SAI's single file (read back by diffusers and by
loradesk to the fused weights), blended exactly and by SVD, resized, analyzed, drawn with (flow-match Euler through
the family's pipeline) and compared, all through the CLI on the tiny SD3; an SDXL adapter on it refused by name."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from tiny import make_images
from trainer.formats import load_adapter
from trainer.lora_state import Adapter, LoraLayer
from trainer.models import load_base_model

COMPONENTS = {"transformer": "denoiser", "vae": "vae", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2",
              "text_encoder_3": "lora_te3"}
# SAI's single-file prefixes (sd3_files.py): every part of the model is in a baked file
FILE_PREFIXES = ("model.diffusion_model.joint_blocks.", "first_stage_model.decoder.",
                 "text_encoders.clip_l.transformer.text_model.", "text_encoders.clip_g.transformer.text_projection.",
                 "text_encoders.t5xxl.transformer.shared.")


@pytest.fixture(scope="module")
def sd3_run(tiny_sd3_dir, tmp_path_factory):
    """12 CLI steps on the tiny SD3: transformer attention and both CLIPs' LoRA (not T5), rank 4, fp32 files,
    a checkpoint at step 6."""
    from trainer.__main__ import main
    root = tmp_path_factory.mktemp("sd3-run")
    data = make_images(root / "data", n=4, size=48)
    sets = [f"model.path={tiny_sd3_dir}", f"dataset.path={data}", "dataset.resolution=32", "dataset.batch_size=2",
            "schedule.max_steps=12", "schedule.lr_scheduler=constant", "optimizer.unet_lr=3e-3",
            "network.text_encoders=['te1', 'te2']", "model.t5_length=16", "network.rank=4", "network.alpha=2",
            f"saving.runs_dir={root / 'runs'}", "run.name=sd3", "saving.dtype=fp32", "saving.every_n_steps=6"]
    assert main(["train", "--quiet", *[x for s in sets for x in ("--set", s)]]) == 0
    run_dir, = (root / "runs").iterdir()
    return run_dir


def component(base, name: str) -> torch.nn.Module:
    where = COMPONENTS[name]
    return getattr(base, where) if where in ("denoiser", "vae") else base.text_encoders[where]


def assert_same(reread: dict, expected: dict, what: str, atol: float = 1e-6) -> None:
    assert set(reread) == set(expected), f"{what}: {sorted(set(reread) ^ set(expected))[:5]}"
    for key, value in expected.items():
        assert torch.allclose(reread[key].float(), value.float(), atol=atol), f"{what}.{key}"


def fused_base(model_dir: Path, adapters: list[tuple[Adapter, float]]):
    from trainer.adapters.blend import FusedBlender
    base = load_base_model(str(model_dir))
    blender = FusedBlender.of(base)
    for i, (adapter, weight) in enumerate(adapters):
        blender.add(f"a{i}", adapter, weight)
    return base


# ---- baking ------------------------------------------------------------------------------------------------------

def test_a_baked_single_file_reads_back_to_the_fused_weights_in_diffusers_and_loradesk(sd3_run, tiny_sd3_dir,
                                                                                     tmp_path, no_network):
    from diffusers import StableDiffusion3Pipeline
    from trainer.__main__ import main
    adapter = sd3_run / "sd3.safetensors"
    out = tmp_path / "baked.safetensors"
    assert main(["bake", "--model", str(tiny_sd3_dir), str(adapter), "--out", str(out), "--dtype", "fp32"]) == 0
    with safe_open(str(out), "pt") as f:
        keys = set(f.keys())
    assert all(any(k.startswith(p) for k in keys) for p in FILE_PREFIXES)
    expected = fused_base(tiny_sd3_dir, [(load_adapter(adapter), 1.0)])
    plain = load_base_model(str(tiny_sd3_dir))
    for name in ("transformer", "text_encoder", "text_encoder_2"):  # the adapter changed each of these
        assert any(not torch.equal(a, b) for a, b in zip(component(plain, name).state_dict().values(),
                                                           component(expected, name).state_dict().values())), name
    ours = load_base_model(str(out), config_dir=str(tiny_sd3_dir))
    assert ours.family.name == "sd3"
    for name in COMPONENTS:
        assert_same(component(ours, name).state_dict(), component(expected, name).state_dict(), f"ours: {name}")
    # diffusers puts an identity in place of CLIP-L's projection (single_file_utils.py l. 1762-1763: SAI's CLIP-L
    # pools unprojected), which cannot take the tiny CLIP-L's 32 -> 24 one: it is given, and its weights are
    # checked through diffusers' own converter below
    theirs = StableDiffusion3Pipeline.from_single_file(str(out), config=str(tiny_sd3_dir), local_files_only=True,
                                                       text_encoder=ours.text_encoders["lora_te1"])
    for name in ("transformer", "vae", "text_encoder_2", "text_encoder_3"):
        assert_same(getattr(theirs, name).state_dict(), component(expected, name).state_dict(), f"diffusers: {name}")
    assert_same(diffusers_clip_l(out, tiny_sd3_dir), component(expected, "text_encoder").state_dict(),
                "diffusers: text_encoder")
    assert no_network == []


def diffusers_clip_l(file: Path, config_dir: Path) -> dict:
    """CLIP-L's weights as diffusers' single-file converter reads them, loaded strictly into a model of the config."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    weights = convert_ldm_clip_checkpoint(load_file(str(file)), "text_encoders.clip_l.transformer.")
    model = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(config_dir, subfolder="text_encoder"))
    if not hasattr(model, "text_model"):  # a flattened CLIP (transformers >= 5.6 for some classes)
        weights = {k.removeprefix("text_model."): v for k, v in weights.items()}
    model.load_state_dict(weights, strict=True)
    return model.state_dict()


def test_a_base_without_t5_bakes_without_it_and_tied_or_flat_names_are_kept(tiny_sd3_dir):
    from types import SimpleNamespace
    from trainer.models.sd3_bake import clip_to_original, original_checkpoint, t5_to_original
    base = load_base_model(str(tiny_sd3_dir))
    without = SimpleNamespace(denoiser=base.denoiser, vae=base.vae, family=base.family,
                              text_encoders={k: v for k, v in base.text_encoders.items() if k != "lora_te3"})
    keys = set(original_checkpoint(without))
    assert not any(k.startswith("text_encoders.t5xxl.") for k in keys)
    assert "text_encoders.clip_g.transformer.text_model.final_layer_norm.weight" in keys
    shared = torch.ones(3, 2)  # T5's tied embedding under its other name only: both names in the file
    assert set(t5_to_original({"encoder.embed_tokens.weight": shared, "encoder.x.weight": shared})) == {
        "shared.weight", "encoder.embed_tokens.weight", "encoder.x.weight"}
    flat = clip_to_original({"encoder.layers.0.q.weight": shared, "text_projection.weight": shared,
                             "embeddings.position_ids": shared})  # a flattened CLIP's state dict
    assert set(flat) == {"text_model.encoder.layers.0.q.weight", "text_projection.weight"}


# ---- the toolkit through the CLI ---------------------------------------------------------------------------------

def names_in(path: Path) -> set[str]:
    return set(load_adapter(path).layers)


def test_blend_resize_analyze_generate_and_compare_work_on_an_sd3_run(sd3_run, tiny_sd3_dir, tmp_path, capsys):
    from trainer.__main__ import main
    adapter, ckpt = str(sd3_run / "sd3.safetensors"), str(sd3_run / "checkpoints" / "step-000006")
    exact, svd, small = tmp_path / "exact.safetensors", tmp_path / "svd.safetensors", tmp_path / "r2.safetensors"
    assert main(["blend", f"{adapter}:0.7", f"{ckpt}:0.3", "--out", str(exact), "--dtype", "fp32"]) == 0
    assert main(["blend", f"{adapter}:0.7", f"{ckpt}:0.3", "--rank", "4", "--out", str(svd)]) == 0
    assert main(["resize", adapter, "--rank", "2", "--out", str(small)]) == 0
    with safe_open(adapter, "pt") as f:
        architecture = f.metadata()["modelspec.architecture"]  # the family's (sd3.variant_architecture)
    for out in (exact, svd, small):  # each in both of SD3's layouts, as the run wrote its adapter
        kohya = out.with_name(f"{out.stem}-kohya.safetensors")
        assert names_in(out) == names_in(kohya) == names_in(Path(adapter)), out.name
        with safe_open(str(kohya), "pt") as f:
            assert any(k.startswith("lora_unet_joint_blocks_0_x_block_attn_qkv.") for k in f.keys())
            assert f.metadata()["modelspec.architecture"] == architecture
    one, two = load_adapter(adapter), load_adapter(ckpt)
    for name in ("lora_unet_transformer_blocks_0_attn_to_q", "lora_unet_transformer_blocks_2_attn_add_v_proj",
                 "lora_te2_text_model_encoder_layers_1_self_attn_out_proj"):
        expected = 0.7 * one.layers[name].delta() + 0.3 * two.layers[name].delta()
        for path in (exact, exact.with_name("exact-kohya.safetensors")):
            assert torch.allclose(load_adapter(path).layers[name].delta(), expected, atol=1e-7), (path.name, name)
    assert {layer.rank for layer in load_adapter(small).layers.values()} == {2}
    assert main(["analyze", adapter, ckpt, "--out", str(tmp_path / "analysis")]) == 0
    assert (tmp_path / "analysis" / "analysis.json").is_file()
    images = {}
    for label, lora in (("with", ["--lora", f"{adapter}:1.0"]), ("without", [])):
        png = tmp_path / f"{label}.png"
        assert main(["generate", "--model", str(tiny_sd3_dir), *lora, "--prompt", "zqx", "--steps", "2",
                     "--width", "32", "--height", "32", "--out", str(png)]) == 0
        images[label] = np.asarray(Image.open(png), dtype=np.int16)
    assert images["with"].shape == (32, 32, 3)
    assert np.abs(images["with"] - images["without"]).max() > 0, "the adapter changed nothing"
    grid = tmp_path / "compare.png"
    assert main(["compare", str(sd3_run), "--steps", "1", "--size", "16", "--out", str(grid)]) == 0
    assert Image.open(grid).size[1] > 2 * 16  # a row per checkpoint (two)


def test_the_generate_tabs_blend_of_two_adapters_is_exact_and_diffusers_loads_its_export(sd3_run, tiny_sd3_dir,
                                                                                        tmp_path):
    from diffusers import StableDiffusion3Pipeline
    from trainer.adapters.generate import Generator
    adapter, ckpt = sd3_run / "sd3.safetensors", sd3_run / "checkpoints" / "step-000006"
    one, two = load_adapter(adapter), load_adapter(ckpt)
    generator = Generator(str(tiny_sd3_dir), device="cpu")
    generator.set_adapters([(str(adapter), 0.7), (str(ckpt), 0.3)])
    plain = load_base_model(str(tiny_sd3_dir))
    index, blended = plain.module_index(), generator.base.module_index()
    for name in one.layers:
        expected = index[name][2].weight + 0.7 * one.layers[name].delta() + 0.3 * two.layers[name].delta()
        assert torch.allclose(blended[name][2].weight, expected, atol=1e-6), name
    out = tmp_path / "blend.safetensors"
    generator.export_blend(out, dtype="fp32")
    assert out.with_name("blend-kohya.safetensors").is_file()
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_sd3_dir), local_files_only=True)
    pipe.load_lora_weights(str(out))
    pipe.fuse_lora(components=["transformer", "text_encoder", "text_encoder_2"])
    ours = generator.base
    for name in ("transformer", "text_encoder", "text_encoder_2"):
        theirs = {k.replace("base_layer.", ""): v for k, v in getattr(pipe, name).state_dict().items()
                  if "lora_" not in k}
        assert_same(theirs, component(ours, name).state_dict(), f"diffusers fused {name}", atol=1e-5)


def test_an_sdxl_adapter_on_an_sd3_base_is_refused_naming_both(sd3_run, tiny_sd3_dir, tmp_path, capsys):
    from trainer.__main__ import main
    from trainer.adapters.blend import FusedBlender
    from trainer.formats import AdapterFormatError, save_adapter
    sdxl = Adapter({"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q":
                    LoraLayer(torch.ones(2, 640), torch.ones(640, 2), 2.0),
                    "lora_te2_text_model_encoder_layers_0_self_attn_q_proj":
                    LoraLayer(torch.ones(2, 1280), torch.ones(1280, 2), 2.0)})
    message = r"made for SDXL \(sdxl\); the base model is Stable Diffusion 3 / 3.5 \(sd3\)"
    with pytest.raises(AdapterFormatError, match=message):
        FusedBlender.of(load_base_model(str(tiny_sd3_dir))).add("xl", sdxl)
    path = save_adapter(sdxl, tmp_path / "xl.safetensors", dtype="fp32")
    capsys.readouterr()
    assert main(["generate", "--model", str(tiny_sd3_dir), "--lora", str(path), "--prompt", "zqx", "--steps", "1",
                 "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "SDXL (sdxl)" in err and "Stable Diffusion 3 / 3.5 (sd3)" in err
    # and the other way round: blending an SD3 adapter with an SDXL one is refused before anything is written
    assert main(["blend", str(sd3_run / "sd3.safetensors"), str(path), "--out", str(tmp_path / "m.safetensors")]) == 2
    assert not (tmp_path / "m.safetensors").exists()
