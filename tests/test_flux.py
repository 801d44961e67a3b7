"""FLUX.1 through the family seam: a tiny FLUX.1-dev (guidance embedding, 2 double and 2 single blocks, CLIP-L + T5)
trained through the CLI; kohya's BFL layout (fused qkv and linear1 = [q; k; v; mlp]) as the default file, which
diffusers' FluxPipeline loads with every key and the outputs of a hand merge; real-size key sets as sd-scripts'."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tiny import hand_merged, make_images, train_transformer_cli
from trainer import runs
from trainer.formats import load_adapter
from trainer.models import load_base_model

ALL_GROUPS = "network.unet_targets=['attention', 'feed_forward', 'single_blocks', 'adaln']"


def train(model: Path, root: Path, *extra: str, steps: int = 8) -> Path:
    return train_transformer_cli(model, root, "flux", *extra, steps=steps, save_every=4)


@pytest.fixture(scope="module")
def flux_run(tiny_flux_dir, tmp_path_factory):
    """8 CLI steps on the tiny FLUX.1-dev: every transformer group and CLIP-L."""
    return train(tiny_flux_dir, tmp_path_factory.mktemp("flux-run"), ALL_GROUPS, "network.text_encoders=['te1']")


def modules_of(path: Path) -> tuple[set[str], dict]:
    with safe_open(str(path), "pt") as f:
        return {k.split(".")[0] for k in f.keys()}, f.metadata()


def test_the_default_file_is_kohyas_flux_layout_with_sd_scripts_metadata(flux_run):
    names, meta = modules_of(flux_run / "flux.safetensors")
    unet = {n for n in names if n.startswith("lora_unet_")}
    double = {f"lora_unet_double_blocks_{i}_{s}_{m}" for i in range(2) for s in ("img", "txt")
              for m in ("attn_qkv", "attn_proj", "mlp_0", "mlp_2", "mod_lin")}
    single = {f"lora_unet_single_blocks_{i}_{m}" for i in range(2) for m in ("linear1", "linear2", "modulation_lin")}
    assert unet == double | single
    assert {n.split("_text_model_")[0] for n in names - unet} == {"lora_te1"}
    assert meta["ss_base_model_version"] == "flux1" and meta["modelspec.architecture"] == "flux-1-dev/lora"
    assert not (flux_run / "flux-diffusers.safetensors").exists(), "one layout loads everywhere: one file"


def test_fused_qkv_and_linear1_equal_the_split_modules_as_they_trained(flux_run):
    with safe_open(str(flux_run / "flux.safetensors"), "pt") as f:
        def fused(name):
            down, up = f.get_tensor(f"{name}.lora_down.weight"), f.get_tensor(f"{name}.lora_up.weight")
            return float(f.get_tensor(f"{name}.alpha")) / down.shape[0] * (up @ down), down.shape[0]
        qkv, qkv_rank = fused("lora_unet_double_blocks_0_img_attn_qkv")
        linear1, linear1_rank = fused("lora_unet_single_blocks_1_linear1")
    assert (qkv_rank, linear1_rank) == (12, 16)  # [A_q; A_k; A_v] and [A_q; A_k; A_v; A_mlp], block-diagonal up
    state = load_file(str(runs.last_checkpoint(flux_run) / "lora.safetensors"))

    def trained(path: str) -> torch.Tensor:
        return (2 / 4) * (state[f"unet.{path}.lora_B.default.weight"] @ state[f"unet.{path}.lora_A.default.weight"])
    assert torch.equal(qkv, torch.cat([trained(f"transformer_blocks.0.attn.to_{p}") for p in "qkv"]))
    assert torch.equal(linear1, torch.cat([trained(f"single_transformer_blocks.1.{p}")
                                           for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")]))
    back = load_adapter(flux_run / "flux.safetensors")  # read back: the split modules at their own rank
    assert back.layers["lora_unet_single_transformer_blocks_1_proj_mlp"].rank == 4
    assert torch.equal(back.layers["lora_unet_single_transformer_blocks_1_proj_mlp"].delta(),
                       trained("single_transformer_blocks.1.proj_mlp"))


def transformer_output(transformer) -> torch.Tensor:
    from trainer.models.flux import image_ids
    g = torch.Generator().manual_seed(0)
    packed, text, pooled = torch.randn(1, 16, 64, generator=g), torch.randn(1, 8, 40, generator=g), \
        torch.randn(1, 32, generator=g)
    with torch.no_grad():
        return transformer(hidden_states=packed, timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
                           pooled_projections=pooled, encoder_hidden_states=text, txt_ids=torch.zeros(8, 3),
                           img_ids=image_ids(4, 4, "cpu", torch.float32), return_dict=False)[0]


@pytest.fixture
def kohya_converter_at_tiny_width(monkeypatch):
    """diffusers' kohya FLUX converter with its one hard-coded FLUX.1 width (linear1 split as 3072 x 3 + 12288,
    lora_conversion_utils.py:552) set to the tiny model's (16 x 3 + 64): otherwise the very code FluxPipeline runs."""
    import inspect

    from diffusers.loaders import lora_conversion_utils, lora_pipeline
    source = inspect.getsource(lora_conversion_utils._convert_kohya_flux_lora_to_diffusers)
    assert source.count("dims=[3072, 3072, 3072, 12288]") == 1  # diffusers changed: look at this test again
    namespace = dict(vars(lora_conversion_utils))
    exec(compile(source.replace("dims=[3072, 3072, 3072, 12288]", "dims=[16, 16, 16, 64]"),
                 lora_conversion_utils.__file__, "exec"), namespace)
    monkeypatch.setattr(lora_pipeline, "_convert_kohya_flux_lora_to_diffusers",
                        namespace["_convert_kohya_flux_lora_to_diffusers"])


def test_diffusers_loads_the_kohya_file_with_every_key_and_the_hand_merged_output(flux_run, tiny_flux_dir, caplog,
                                                                                  kohya_converter_at_tiny_width):
    from diffusers import FluxPipeline
    from diffusers.utils import logging as dlogging
    pipe = FluxPipeline.from_pretrained(str(tiny_flux_dir))
    plain = transformer_output(pipe.transformer)
    dlogging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            pipe.load_lora_weights(str(flux_run / "flux.safetensors"))
    finally:
        dlogging.disable_propagation()
    assert not [r for r in caplog.records if "unexpected" in r.getMessage() or "missing" in r.getMessage()]
    adapter = load_adapter(flux_run / "flux.safetensors")
    loaded = sum(1 for model in (pipe.transformer, pipe.text_encoder) for m in model.modules()
                 if hasattr(m, "lora_A") and m.lora_A)
    assert loaded == len(adapter.layers)  # every split module of the file found its module in diffusers
    theirs, ours = transformer_output(pipe.transformer), transformer_output(hand_merged(tiny_flux_dir, adapter))
    assert (ours - theirs).abs().max() < 1e-4
    assert (ours - plain).abs().max() > 1e-3, "the LoRA changes the output"


def test_the_diffusers_layout_on_request_reads_back_to_the_same_deltas(flux_run, tmp_path):
    from trainer.__main__ import main
    out = tmp_path / "flux-diffusers.safetensors"
    assert main(["export", str(flux_run), "--format", "diffusers", "--dtype", "fp32", "--out", str(out)]) == 0
    with safe_open(str(out), "pt") as f:
        assert {k.split(".")[0] for k in f.keys()} == {"transformer", "text_encoder"}
    kohya, back = load_adapter(flux_run / "flux.safetensors"), load_adapter(out)
    assert kohya.layers.keys() == back.layers.keys()
    for name, layer in kohya.layers.items():
        assert torch.allclose(layer.delta(), back.layers[name].delta(), atol=1e-7, rtol=0), name


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "events.jsonl").read_text().splitlines()
            if '"progress"' in line]


def test_the_loss_falls_on_the_tiny_flux(tiny_flux_dir, tmp_path):
    same = make_images(tmp_path / "same", n=4, size=48)  # the training images: a noise-free view of the loss
    run_dir = train(tiny_flux_dir, tmp_path, f"validation.path={same}", "dataset.batch_size=4",
                    "network.text_encoders=[]", ALL_GROUPS, steps=40)
    fixed = runs.validation_losses(run_dir)
    print(f"tiny FLUX: flow-matching loss at fixed sigmas and noise, step 0 {fixed[0]:.4f}, step 40 {fixed[40]:.4f}")
    assert len(losses(run_dir)) == 40 and fixed[40] < 0.95 * fixed[0]


def test_stop_then_resume_equals_an_uninterrupted_flux_run(tiny_flux_dir, tmp_path):
    from test_training import assert_same_tensors, make_cfg, stopped_and_resumed, tensors
    from trainer.events import Progress
    cfg = make_cfg(tiny_flux_dir, make_images(tmp_path / "data", n=4, size=48), tmp_path,
                   **{"model.t5_length": 16, "dataset.resolution": 32, "network.text_encoders": ["te1"],
                      "schedule.max_steps": 6, "dataset.flip": True, "loss.resolution_shift": True})
    full, resumed, events, _, _ = stopped_and_resumed(cfg)
    assert [e.step for e in events if isinstance(e, Progress)] == [4, 5, 6]
    assert_same_tensors(tensors(full), tensors(resumed))


def sd_scripts_flux_names(double: int, single: int) -> set[str]:
    """The modules kohya-ss/sd-scripts' networks/lora_flux.py gives a LoRA by default, restated: every nn.Linear
    inside each DoubleStreamBlock and SingleStreamBlock (FLUX_TARGET_REPLACE_MODULE_DOUBLE / _SINGLE) of BFL's Flux
    (library/flux_models.py): per double block img_attn.qkv, img_attn.proj, img_mlp.0, img_mlp.2, img_mod.lin and
    the same for txt; per single block linear1, linear2, modulation.lin. The name is "lora_unet" + "." + the module
    path with every "." made "_"."""
    names = {f"lora_unet_double_blocks_{i}_{s}_{m}" for i in range(double) for s in ("img", "txt")
             for m in ("attn_qkv", "attn_proj", "mlp_0", "mlp_2", "mod_lin")}
    return names | {f"lora_unet_single_blocks_{i}_{m}" for i in range(single)
                    for m in ("linear1", "linear2", "modulation_lin")}


@pytest.mark.parametrize("config", ["flux1-dev", "flux1-schnell"])
def test_real_size_key_sets_match_sd_scripts(config):
    from trainer.models import get_family, meta_index
    from trainer.models.family import CONFIGS
    family = get_family("flux")
    index = meta_index("flux", CONFIGS / config)
    transformer = {n: e for n, e in index.items() if e[0] == "lora_unet"}
    targets = tuple("." + m for g in ("attention", "feed_forward", "single_blocks", "adaln")
                    for m in family.unet_groups[g])
    trained = {n: e for n, e in transformer.items() if e[1].startswith(("transformer_blocks.",
                                                                       "single_transformer_blocks."))
               and e[1].endswith(targets)}
    names = {f.name for f in family.kohya_file_layout(trained)}
    assert names == sd_scripts_flux_names(19, 38) and len(names) == 304  # 19 x 10 + 38 x 3
    attention = tuple("." + m for m in family.unet_groups["attention"])
    assert sum(1 for _, p, _ in transformer.values() if p.endswith(attention)) == 19 * 8 + 38 * 3
    assert sum(1 for e in index.values() if e[0] == "lora_te1") == 72  # CLIP-L: 12 layers x 6
    assert sum(1 for e in index.values() if e[0] == "lora_te3") == 168  # T5-XXL: 24 blocks x 7


def test_bfl_single_files_load_and_a_bake_writes_bfls_transformer_file(flux_run, tiny_flux_dir, tmp_path):
    """flux1-dev.safetensors (BFL's names) with ae, clip_l and t5xxl beside it, as ComfyUI users keep them, loads to
    the folder's weights; a bake of the run's adapter (transformer and CLIP-L LoRA) writes a checkpoint as ComfyUI
    saves FLUX, which reads back fused (diffusers reads only FLUX.1-wide transformers: its converter fixes 3072)."""
    from safetensors.torch import save_file

    from tiny_flux import write_bfl_files
    from trainer.__main__ import main
    folder = load_base_model(str(tiny_flux_dir))
    options = write_bfl_files(folder, tmp_path)
    loaded = load_base_model(str(tmp_path / "transformer.safetensors"), config_dir=tiny_flux_dir, options=options)
    assert loaded.family.name == "flux"
    for a, b in zip(loaded.components, folder.components):
        x, y = a.state_dict(), b.state_dict()
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), type(a).__name__
    baked = tmp_path / "baked.safetensors"
    assert main(["bake", "--model", str(tiny_flux_dir), str(flux_run / "flux.safetensors"), "--out", str(baked),
                 "--dtype", "fp32"]) == 0
    from trainer.adapters.blend import FusedBlender
    expected = load_base_model(str(tiny_flux_dir), options={"t5_length": 16})
    blender = FusedBlender.of(expected)
    blender.add("run", load_adapter(flux_run / "flux.safetensors"), 1.0)
    state = load_file(str(baked))  # as Comfy-Org's flux1-dev-fp8.safetensors: CLIP's logit_scale beside it
    save_file({**state, "text_encoders.clip_l.logit_scale": torch.tensor(4.6)}, str(baked))
    back = load_base_model(str(baked), config_dir=tiny_flux_dir, options={"t5_length": 16})  # all inside
    for name in ("denoiser", "vae"):
        x, y = getattr(back, name).state_dict(), getattr(expected, name).state_dict()
        assert max((x[k] - y[k]).abs().max().item() for k in y) < 1e-5, name
    for prefix in ("lora_te1", "lora_te3"):
        x, y = back.text_encoders[prefix].state_dict(), expected.text_encoders[prefix].state_dict()
        assert max((x[k] - y[k]).abs().max().item() for k in y if k in x) < 1e-5, prefix
    plain = folder.text_encoders["lora_te1"].state_dict()
    assert any(not torch.equal(plain[k], back.text_encoders["lora_te1"].state_dict()[k]) for k in plain)


def test_blend_resize_analyze_generate_and_compare_work_on_a_flux_run(flux_run, tiny_flux_dir, tmp_path):
    """The toolkit on FLUX adapters through the CLI: exact and SVD blends and resize keep kohya's BFL layout
    (linear1 fused), analyze, generate (the family's pipeline) and compare."""
    import numpy as np
    from PIL import Image

    from trainer.__main__ import main
    adapter, ckpt = str(flux_run / "flux.safetensors"), str(flux_run / "checkpoints" / "step-000004")
    exact, small = tmp_path / "exact.safetensors", tmp_path / "r2.safetensors"
    assert main(["blend", f"{adapter}:0.7", f"{ckpt}:0.3", "--out", str(exact), "--dtype", "fp32"]) == 0
    assert main(["resize", adapter, "--rank", "2", "--out", str(small)]) == 0
    assert modules_of(exact)[0] == modules_of(Path(adapter))[0]  # the BFL layout: linear1 and qkv fused
    one, two, blend = load_adapter(adapter), load_adapter(ckpt), load_adapter(exact)
    for name in ("lora_unet_single_transformer_blocks_1_proj_mlp", "lora_unet_transformer_blocks_0_attn_add_k_proj"):
        expected = 0.7 * one.layers[name].delta() + 0.3 * two.layers[name].delta()
        assert torch.allclose(blend.layers[name].delta(), expected, atol=1e-6), name
    assert {layer.rank for layer in load_adapter(small).layers.values()} == {2}
    assert main(["analyze", adapter, ckpt, "--out", str(tmp_path / "analysis")]) == 0
    images = {}
    for label, lora in (("with", ["--lora", f"{adapter}:1.0"]), ("without", [])):
        png = tmp_path / f"{label}.png"
        assert main(["generate", "--model", str(tiny_flux_dir), *lora, "--prompt", "zqx", "--steps", "2",
                     "--width", "32", "--height", "32", "--out", str(png)]) == 0
        images[label] = np.asarray(Image.open(png), dtype=np.int16)
    assert images["with"].shape == (32, 32, 3) and np.abs(images["with"] - images["without"]).max() > 0
    grid = tmp_path / "compare.png"
    assert main(["compare", str(flux_run), "--steps", "1", "--size", "32", "--out", str(grid)]) == 0
    assert Image.open(grid).size[1] > 2 * 32


def test_fp8_base_weights_train_the_tiny_flux_and_its_loss_falls(tiny_flux_dir, tmp_path):
    same = make_images(tmp_path / "same", n=4, size=48)
    run_dir = train(tiny_flux_dir, tmp_path, f"validation.path={same}", "dataset.batch_size=4",
                    "network.text_encoders=[]", ALL_GROUPS, "precision.fp8_base=true", steps=40)
    fixed = runs.validation_losses(run_dir)
    print(f"tiny FLUX over fp8 weights: loss at fixed sigmas and noise, step 0 {fixed[0]:.4f}, "
          f"step 40 {fixed[40]:.4f}")
    assert fixed[40] < 0.95 * fixed[0]
    with safe_open(str(run_dir / "flux.safetensors"), "pt") as f:  # fp32 LoRA factors, as saving.dtype says
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}


def test_a_transformer_file_with_tensors_the_loader_does_not_take_is_refused_naming_them(tiny_flux_dir, tmp_path):
    """ComfyUI's "scaled fp8" transformers carry a scale per weight; read as plain weights they would draw noise."""
    from safetensors.torch import save_file

    from trainer.models import ModelLoadError
    from trainer.models.flux_layout import transformer_to_original
    folder = load_base_model(str(tiny_flux_dir))
    state = transformer_to_original(folder.denoiser.state_dict(), folder.denoiser.config)
    state["double_blocks.0.img_attn.qkv.scale_weight"] = torch.ones(1)
    save_file({k: v.clone().contiguous() for k, v in state.items()}, str(tmp_path / "scaled.safetensors"))
    with pytest.raises(ModelLoadError, match="double_blocks.0.img_attn.qkv.scale_weight"):
        load_base_model(str(tmp_path / "scaled.safetensors"), config_dir=tiny_flux_dir)
