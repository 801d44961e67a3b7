"""SD 2.x through the family seam: an OpenCLIP text encoder in its own single-file layout, v-prediction read from
the model, kohya names as SD 1.x's, metadata as sd-scripts writes it."""
from __future__ import annotations

import shutil

import torch
from safetensors import safe_open

from tiny import make_images, save_tiny_sd2
from trainer.models import load_base_model


def test_tiny_sd2_is_detected_trained_and_named_as_sd2(tmp_path):
    from trainer.__main__ import main
    model = save_tiny_sd2(tmp_path / "sd2")
    base = load_base_model(str(model))
    assert base.family.name == "sd2" and base.prediction_type() == "v_prediction"
    sets = [f"model.path={model}", f"dataset.path={make_images(tmp_path / 'data')}", "dataset.resolution=32",
            "schedule.max_steps=3", f"saving.runs_dir={tmp_path / 'runs'}", "run.name=v2", "network.rank=2"]
    assert main(["train", "--quiet", *[x for s in sets for x in ("--set", s)]]) == 0
    run_dir, = (tmp_path / "runs").iterdir()
    with safe_open(str(run_dir / "v2.safetensors"), "pt") as f:
        names, meta = {k.split(".")[0] for k in f.keys()}, f.metadata()
    assert any(n.startswith("lora_te_text_model_encoder_layers_1_") for n in names)
    assert any(n.startswith("lora_unet_down_blocks_0_attentions_1_") for n in names)
    assert (meta["ss_base_model_version"], meta["ss_v2"]) == ("sd_v2_v", "True")
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora" and meta["modelspec.prediction_type"] == "v"


def test_tiny_sd2_bakes_to_a_single_file_that_both_loaders_read_back(tmp_path, no_network):
    from diffusers import StableDiffusionPipeline
    from trainer.adapters.bake import save_single_file
    model = save_tiny_sd2(tmp_path / "sd2", prediction="epsilon")
    base = load_base_model(str(model))
    file = save_single_file(base, tmp_path / "v2.safetensors", dtype="fp32")
    with safe_open(str(file), "pt") as f:
        keys = set(f.keys())
    assert "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight" in keys
    assert "cond_stage_model.model.ln_final.weight" in keys and not any(".q_proj." in k for k in keys)
    shutil.copytree(model, tmp_path / "v2.config", ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    ours = load_base_model(str(file))
    theirs = StableDiffusionPipeline.from_single_file(str(file), config=str(model), local_files_only=True)
    assert ours.family.name == "sd2" and ours.metadata() == {
        "ss_base_model_version": "sd_v2", "ss_v2": "True", "modelspec.architecture": "stable-diffusion-v2-512/lora",
        "modelspec.implementation": "diffusers"}  # the 512 base predicts epsilon
    for name in ("unet", "vae", "text_encoder"):  # a BaseModel's denoiser is the pipeline's unet
        ours_name = "denoiser" if name == "unet" else name
        original = getattr(base, ours_name).state_dict()
        for what, model_ in (("ours", getattr(ours, ours_name)), ("diffusers", getattr(theirs, name))):
            reread = {k: v for k, v in model_.state_dict().items() if k in original}
            assert reread.keys() == original.keys(), (what, name)
            assert all(torch.equal(reread[k], original[k]) for k in original), (what, name)
    assert no_network == []
