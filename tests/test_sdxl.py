"""SDXL through the family seam: key sets of the real configs, a tiny SDXL trained through the CLI and loaded by
diffusers, kohya's original-layout names in every file layout, single files both ways, size conditioning."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tiny import make_images
from trainer import config as C
from trainer import runs
from trainer.formats import kohya_name, load_adapter, save_adapter
from trainer.lora_state import Adapter, LoraLayer
from trainer.models import get_family, load_base_model, meta_index
from trainer.models.meta import meta_models

ROOT = Path(__file__).resolve().parent.parent


def count(index: dict, prefix: str, targets: list[str]) -> int:
    return sum(1 for name, (p, path, _) in index.items()
               if p == prefix and any(path == t or path.endswith("." + t) for t in targets))


ATTN, FF, PROJ = (get_family("sdxl").unet_groups[g] for g in ("attention", "feed_forward", "projections"))
TE_ATTN, TE_MLP = get_family("sdxl").text_encoder_specs[0].groups.values()


# ---- the real configs, on the meta device ------------------------------------------------------------------------

def test_sdxl_key_sets_of_the_real_configs():
    index = meta_index("sdxl")
    assert count(index, "lora_unet", ATTN) == 560 and count(index, "lora_unet", ATTN + FF + PROJ) == 722
    per_rank = sum(m.in_features + m.out_features for n, (p, path, m) in index.items()
                   if p == "lora_unet" and any(path.endswith("." + t) for t in ATTN))
    assert per_rank == 1_451_520
    assert (count(index, "lora_te1", TE_ATTN), count(index, "lora_te1", TE_ATTN + TE_MLP)) == (48, 72)
    assert (count(index, "lora_te2", TE_ATTN), count(index, "lora_te2", TE_ATTN + TE_MLP)) == (128, 192)
    unet, _ = meta_models("sdxl", str(get_family("sdxl").meta_config_dir()))
    assert round(sum(p.numel() for p in unet.parameters()) / 1e9, 2) == 2.57
    names = set(index)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names
    assert any(n.startswith("lora_unet_middle_block_1_") for n in names)
    assert any(n.startswith("lora_unet_output_blocks_0_1_") for n in names)
    assert "lora_te2_text_model_encoder_layers_31_self_attn_q_proj" in names


def test_sd2_key_sets_of_the_real_configs():
    index = meta_index("sd2")
    assert count(index, "lora_unet", ATTN) == 128 and count(index, "lora_unet", ATTN + FF + PROJ) == 192
    assert (count(index, "lora_te", TE_ATTN), count(index, "lora_te", TE_ATTN + TE_MLP)) == (92, 138)
    assert "lora_te_text_model_encoder_layers_22_self_attn_q_proj" in index


# ---- a tiny SDXL trained through the CLI ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sdxl_run(tiny_sdxl_dir, tmp_path_factory):
    """12 CLI steps on the tiny SDXL (UNet and both text encoders), rank 4, alpha 2, fp32 adapter."""
    from trainer.__main__ import main
    root = tmp_path_factory.mktemp("sdxl-run")
    data = make_images(root / "data", n=4, size=48)
    sets = [f"model.path={tiny_sdxl_dir}", f"dataset.path={data}", "dataset.resolution=32", "dataset.batch_size=2",
            "schedule.max_steps=12", "schedule.lr_scheduler=constant", "optimizer.unet_lr=3e-3",
            "optimizer.text_encoder_lrs=['te1=1e-3', 'te2=2e-3']", "network.rank=4", "network.alpha=2",
            f"saving.runs_dir={root / 'runs'}", "run.name=xl", "saving.dtype=fp32", "saving.every_n_steps=6"]
    assert main(["train", "--quiet", *[x for s in sets for x in ("--set", s)]]) == 0
    run_dir, = (root / "runs").iterdir()
    return run_dir


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "events.jsonl").read_text().splitlines()
            if '"progress"' in line]


def test_the_sdxl_adapter_has_kohyas_sdxl_names_and_metadata(sdxl_run):
    with safe_open(str(sdxl_run / "xl.safetensors"), "pt") as f:
        names, meta = {k.split(".")[0] for k in f.keys()}, f.metadata()
    unet = [n for n in names if n.startswith("lora_unet_")]
    assert unet and all(n.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_",
                                      "lora_unet_output_blocks_")) for n in unet)
    assert {n.split("_text_model_")[0] for n in names if not n.startswith("lora_unet")} == {"lora_te1", "lora_te2"}
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["ss_network_train_unet_only"] == "False"


def test_per_encoder_learning_rates_reach_the_optimizer(tiny_sdxl_dir, tmp_path):
    from trainer.loop import Trainer
    cfg = C.TrainConfig()
    C.apply_overrides(cfg, [f"model.path={tiny_sdxl_dir}", f"dataset.path={make_images(tmp_path / 'd', n=2)}",
                            "optimizer.text_encoder_lrs=['te1=1e-3', 'te2=0']", "dataset.resolution=32"])
    trainer = Trainer(cfg, tmp_path)
    trainer.scan = None
    trainer._setup_model()
    trainer.total_steps = 1
    trainer._setup_optimizer()
    lrs = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert lrs == {"unet": cfg.optimizer.unet_lr, "text_encoder": 1e-3}  # te2 at 0: frozen, no LoRA
    assert set(trainer.trained_encoders) == {"lora_te1"} and not trainer.base.text_encoders["lora_te2"].training


def test_loss_falls_on_the_tiny_sdxl(tiny_sdxl_dir, tmp_path):
    from trainer.__main__ import main
    data = make_images(tmp_path / "data", n=4)
    same = make_images(tmp_path / "same", n=4)  # the training images again: a noise-free view of the training loss
    sets = [f"model.path={tiny_sdxl_dir}", f"dataset.path={data}", "dataset.resolution=32", "dataset.batch_size=4",
            "schedule.max_steps=40", "optimizer.unet_lr=3e-3", "network.text_encoders=[]",
            f"saving.runs_dir={tmp_path / 'runs'}", "schedule.lr_scheduler=constant", f"validation.path={same}"]
    assert main(["train", "--quiet", *[x for s in sets for x in ("--set", s)]]) == 0
    run_dir, = (tmp_path / "runs").iterdir()
    assert len(losses(run_dir)) == 40
    fixed = runs.validation_losses(run_dir)  # fixed timesteps and noise: the random timestep's noise is gone
    print(f"tiny SDXL: loss at fixed timesteps and noise, step 0 {fixed[0]:.4f}, step 40 {fixed[40]:.4f}")
    assert fixed[40] < fixed[0]


def sdxl_inputs(pipe_or_base):
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 4, 4, 4, generator=g), torch.tensor([500])


def outputs_of(unet, te1, te2, tok1, tok2) -> dict[str, torch.Tensor]:
    """The three models' outputs on fixed inputs: what the LoRA changes."""
    ids1 = tok1(["zqx, a red square"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    ids2 = tok2(["zqx, a red square"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        h1 = te1(ids1, output_hidden_states=True).hidden_states[-2]
        out2 = te2(ids2, output_hidden_states=True)
        h2, pooled = out2.hidden_states[-2], out2.text_embeds
        noisy, t = sdxl_inputs(None)
        ids = torch.tensor([[32.0, 48.0, 0.0, 8.0, 32.0, 32.0]])
        pred = unet(noisy, t, torch.cat([h1, h2], -1), added_cond_kwargs={"text_embeds": pooled,
                                                                          "time_ids": ids}).sample
    return {"te1": h1, "te2": h2, "pooled": pooled, "unet": pred}


def test_diffusers_loads_the_kohya_file_with_every_key_and_the_same_outputs(sdxl_run, tiny_sdxl_dir, caplog):
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import logging as dlogging

    from trainer.adapters.blend import FusedBlender
    base = load_base_model(str(tiny_sdxl_dir))
    blender = FusedBlender.of(base)
    blender.add("xl", load_adapter(sdxl_run / "xl.safetensors"), 1.0)
    ours = outputs_of(base.denoiser, base.text_encoders["lora_te1"], base.text_encoders["lora_te2"],
                      base.tokenizers["lora_te1"], base.tokenizers["lora_te2"])
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_dir))
    plain = outputs_of(pipe.unet, pipe.text_encoder, pipe.text_encoder_2, pipe.tokenizer, pipe.tokenizer_2)
    dlogging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            pipe.load_lora_weights(str(sdxl_run / "xl.safetensors"))
    finally:
        dlogging.disable_propagation()
    assert not [r for r in caplog.records if "unexpected" in r.getMessage() or "missing" in r.getMessage()]
    with safe_open(str(sdxl_run / "xl.safetensors"), "pt") as f:
        layers = {k.split(".")[0] for k in f.keys()}
    loaded = sum(1 for m in (*pipe.unet.modules(), *pipe.text_encoder.modules(), *pipe.text_encoder_2.modules())
                 if hasattr(m, "lora_A") and m.lora_A)
    assert loaded == len(layers)
    theirs = outputs_of(pipe.unet, pipe.text_encoder, pipe.text_encoder_2, pipe.tokenizer, pipe.tokenizer_2)
    for key in ours:
        assert (ours[key] - theirs[key]).abs().max() < 1e-4, key
        assert (ours[key] - plain[key]).abs().max() > 1e-4, f"the LoRA changes {key}"


def test_export_to_diffusers_writes_diffusers_keys_that_diffusers_loads(sdxl_run, tiny_sdxl_dir, tmp_path, caplog):
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import logging as dlogging

    from trainer.__main__ import main
    out = tmp_path / "xl-diffusers.safetensors"
    assert main(["export", str(sdxl_run), "--format", "diffusers", "--dtype", "fp32", "--out", str(out)]) == 0
    with safe_open(str(out), "pt") as f:
        keys = list(f.keys())
    assert all(k.startswith(("unet.", "text_encoder.", "text_encoder_2.")) for k in keys)
    assert any(k.startswith("unet.down_blocks.1.attentions.0.") for k in keys)
    assert not any("input_blocks" in k or "input.blocks" in k for k in keys)
    kohya, back = load_adapter(sdxl_run / "xl.safetensors"), load_adapter(out)
    assert back.layers.keys() == kohya.layers.keys()  # read back under kohya's SDXL names
    for name in kohya.layers:
        assert torch.allclose(back.layers[name].delta(), kohya.layers[name].delta(), atol=1e-6)
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_dir))
    dlogging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            pipe.load_lora_weights(str(out))
    finally:
        dlogging.disable_propagation()
    assert not [r for r in caplog.records if "unexpected" in r.getMessage()]


# ---- every layout SDXL files come in, read under kohya's names and written back identically -----------------------

def standard_sdxl_adapter() -> Adapter:
    """Rank-1 layers on every adaptable module of the real SDXL (its real shapes), under kohya's names."""
    g = torch.Generator().manual_seed(3)
    layers = {}
    for name, (prefix, path, module) in meta_index("sdxl").items():
        if not isinstance(module, torch.nn.Linear) or not any(path.endswith(t) for t in ATTN + FF + TE_ATTN):
            continue
        layers[name] = LoraLayer(torch.randn(1, module.in_features, generator=g),
                                 torch.randn(module.out_features, 1, generator=g), 1.0)
    return Adapter(layers=layers)


@pytest.fixture(scope="module")
def standard():
    return standard_sdxl_adapter()


def names_in(path: Path) -> set[str]:
    with safe_open(str(path), "pt") as f:
        return {k.split(".")[0] for k in f.keys()}


def test_every_layout_reads_back_to_kohyas_names(standard, tmp_path):
    index = meta_index("sdxl")
    assert len(standard) == 560 + 140 + 48 + 128
    sgm = save_adapter(standard, tmp_path / "sgm.safetensors", dtype="fp32")
    assert names_in(sgm) == set(standard.layers)  # SGM-named kohya: as written
    plain = {kohya_name(index[n][0], index[n][1]): layer for n, layer in standard.layers.items()}
    diffusers_kohya = save_adapter(Adapter(plain), tmp_path / "dk.safetensors", dtype="fp32")
    assert any(n.startswith("lora_unet_down_blocks_") for n in names_in(diffusers_kohya))
    diffusers = save_adapter(standard, tmp_path / "d.safetensors", format="diffusers", dtype="fp32")
    peft_unet = {f"base_model.model.{index[n][1]}.lora_{'A' if part == 'down' else 'B'}.weight":
                 getattr(layer, part) for n, layer in standard.layers.items() if n.startswith("lora_unet_")
                 for part in ("down", "up")}
    save_file(peft_unet, str(tmp_path / "peft.safetensors"))
    for path in (sgm, diffusers_kohya, diffusers):
        back = load_adapter(path)
        assert set(back.layers) == set(standard.layers), path.name
        again = save_adapter(back, tmp_path / f"again-{path.name}", dtype="fp32")
        assert names_in(again) == set(standard.layers), path.name
    peft = load_adapter(tmp_path / "peft.safetensors")
    assert set(peft.layers) == {n for n in standard.layers if n.startswith("lora_unet_")}


def test_an_sd1_adapter_on_an_sdxl_base_is_refused_naming_both(tiny_sdxl_dir):
    from trainer.adapters.blend import FusedBlender
    from trainer.formats import AdapterFormatError
    sd1 = Adapter({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k":
                   LoraLayer(torch.ones(2, 768), torch.ones(320, 2), 2.0)})
    with pytest.raises(AdapterFormatError, match=r"made for Stable Diffusion 1.x \(sd1\); the base model is SDXL"):
        FusedBlender.of(load_base_model(str(tiny_sdxl_dir))).add("sd1", sd1)


# ---- single files ----------------------------------------------------------------------------------------------

def meta_base(family_name: str, config_dir: Path | None = None, prediction: str = "epsilon"):
    """A stand-in BaseModel of the real-size models on the meta device (for key layouts; no weights)."""
    from diffusers import AutoencoderKL
    from trainer.models.loading import empty_models
    family = get_family(family_name)
    config_dir = config_dir or family.meta_config_dir()
    unet, encoders = meta_models(family_name, str(config_dir))
    vae_config = AutoencoderKL.load_config(str(config_dir), subfolder="vae")
    vae = empty_models({"vae": lambda: AutoencoderKL.from_config(vae_config)})["vae"]
    scheduler = SimpleNamespace(config={"prediction_type": prediction})
    return SimpleNamespace(family=family, denoiser=unet, vae=vae, text_encoders=encoders,
                           text_encoder=next(iter(encoders.values())), noise_scheduler=scheduler,
                           prediction_type=lambda: prediction)


def test_a_real_size_sdxl_single_file_layout_loads_with_the_shipped_configs(no_network):
    family = get_family("sdxl")
    state = family.original_checkpoint(meta_base("sdxl"))
    assert sum(k.startswith("conditioner.embedders.0.transformer.text_model.") for k in state) > 190
    assert "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight" in state
    assert "model.diffusion_model.label_emb.0.0.weight" in state
    parts = family.load_single_file(state, source=Path("sdxl.safetensors"), config_dir=None, dtype=torch.float16)
    assert parts["denoiser"].config.cross_attention_dim == 2048 and set(parts["text_encoders"]) == {"lora_te1",
                                                                                                 "lora_te2"}
    assert parts["noise_scheduler"].config.prediction_type == "epsilon" and no_network == []


def test_v_prediction_and_zero_terminal_snr_markers_are_read():
    family = get_family("sdxl")
    state = family.original_checkpoint(meta_base("sdxl"))
    state.update(v_pred=torch.tensor([]), ztsnr=torch.tensor([]))
    parts = family.load_single_file(state, source=Path("noob.safetensors"), config_dir=None, dtype=torch.float16)
    config = parts["noise_scheduler"].config
    assert config.prediction_type == "v_prediction" and config.rescale_betas_zero_snr
    assert parts["noise_scheduler"].alphas_cumprod[-1] < 1e-6  # zero terminal SNR, really


def test_sd2_single_files_are_768_v_unless_they_say_512_base():
    family = get_family("sd2")
    state = family.original_checkpoint(meta_base("sd2"))
    assert "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight" in state
    v = family.load_single_file(state, source=Path("v2-1_768.safetensors"), config_dir=None, dtype=torch.float16)
    assert v["noise_scheduler"].config.prediction_type == "v_prediction" and v["denoiser"].config.sample_size == 96
    state["global_step"] = torch.tensor(875000)
    base = family.load_single_file(state, source=Path("512-base.safetensors"), config_dir=None, dtype=torch.float16)
    assert base["noise_scheduler"].config.prediction_type == "epsilon" and base["denoiser"].config.sample_size == 64
    forced = family.load_single_file(state, source=Path("x.safetensors"), config_dir=None, dtype=torch.float16,
                                     prediction="v_prediction")  # what a '<stem>.yaml' with parameterization v says
    assert forced["noise_scheduler"].config.prediction_type == "v_prediction"


def assert_same_weights(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}.{key}"


def test_tiny_sdxl_bakes_to_a_single_file_that_both_loaders_read_back(tiny_sdxl_dir, tmp_path, no_network):
    import shutil
    from diffusers import StableDiffusionXLPipeline
    from trainer.adapters.bake import save_single_file
    base = load_base_model(str(tiny_sdxl_dir))
    file = save_single_file(base, tmp_path / "tiny-xl.safetensors", dtype="fp32")
    shutil.copytree(tiny_sdxl_dir, tmp_path / "tiny-xl.config",
                    ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))  # the configs beside it
    ours = load_base_model(str(file))
    assert ours.family.name == "sdxl"
    theirs = StableDiffusionXLPipeline.from_single_file(str(file), config=str(tiny_sdxl_dir),
                                                        local_files_only=True)
    for name, module in (("unet", base.denoiser), ("vae", base.vae), ("text_encoder", base.text_encoders["lora_te1"]),
                         ("text_encoder_2", base.text_encoders["lora_te2"])):
        original = module.state_dict()
        reread = (ours.denoiser if name == "unet" else ours.vae if name == "vae" else
                  ours.text_encoders["lora_te1" if name == "text_encoder" else "lora_te2"]).state_dict()
        assert_same_weights(reread, original, f"ours: {name}")
        assert_same_weights({k: v for k, v in getattr(theirs, name).state_dict().items() if k in original},
                            original, f"diffusers: {name}")
    assert no_network == []


# ---- size conditioning -----------------------------------------------------------------------------------------

def test_a_bucketed_and_cropped_image_passes_its_true_size_and_crop(tiny_sdxl_dir, tmp_path):
    from PIL import Image
    from trainer.data import BatchPlan, cover_size, scan_dataset
    from trainer.loop import Trainer
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (400, 40), (200, 30, 30)).save(data / "wide.png")  # wider than any bucket: cropped at the sides
    cfg = C.TrainConfig()
    C.apply_overrides(cfg, [f"model.path={tiny_sdxl_dir}", f"dataset.path={data}", "dataset.resolution=40",
                            "dataset.bucket_step=8", "network.text_encoders=[]"])
    trainer = Trainer(cfg, tmp_path)
    trainer.scan = scan_dataset(cfg.dataset)
    trainer.plan = BatchPlan(trainer.scan, cfg.dataset, cfg.run.seed)
    trainer._setup_model()
    (bw, bh), _ = trainer.plan.bucket_of(0), None
    cw, ch = cover_size((400, 40), (bw, bh))
    cond = trainer.micro_batch(0)[1]
    assert cond["time_ids"].tolist() == [[40, 400, (ch - bh) // 2, (cw - bw) // 2, bh, bw]]
    assert (cw - bw) // 2 > 20, "the center crop of a very wide image starts well right of 0"


# ---- the toolkit on SDXL files ---------------------------------------------------------------------------------

def test_blend_resize_bake_analyze_and_generate_work_on_sdxl(sdxl_run, tiny_sdxl_dir, tmp_path, capsys):
    from trainer.__main__ import main
    adapter, ckpt = str(sdxl_run / "xl.safetensors"), str(sdxl_run / "checkpoints" / "step-000006")
    exact, svd = tmp_path / "exact.safetensors", tmp_path / "svd.safetensors"
    assert main(["blend", f"{adapter}:0.7", f"{ckpt}:0.3", "--out", str(exact), "--dtype", "fp32"]) == 0
    assert main(["blend", f"{adapter}:0.7", f"{ckpt}:0.3", "--rank", "4", "--out", str(svd)]) == 0
    assert main(["resize", adapter, "--rank", "2", "--out", str(tmp_path / "r2.safetensors")]) == 0
    for out in (exact, svd, tmp_path / "r2.safetensors"):
        assert names_in(out) == names_in(Path(adapter)), out.name  # kohya's SDXL names survive every tool
    one = load_adapter(adapter)
    name = next(n for n in one.layers if n.startswith("lora_unet_input_blocks_"))
    blend = load_adapter(exact).layers[name].delta()
    expected = 0.7 * one.layers[name].delta() + 0.3 * load_adapter(ckpt).layers[name].delta()
    assert torch.allclose(blend, expected, atol=1e-6)
    assert main(["bake", "--model", str(tiny_sdxl_dir), f"{adapter}:1.0", "--out", str(tmp_path / "baked")]) == 0
    assert (tmp_path / "baked" / "text_encoder_2").is_dir()
    assert main(["bake", "--model", str(tiny_sdxl_dir), adapter, "--out", str(tmp_path / "baked.safetensors")]) == 0
    with safe_open(str(tmp_path / "baked.safetensors"), "pt") as f:
        assert any(k.startswith("conditioner.embedders.1.model.") for k in f.keys())
    assert main(["analyze", adapter, ckpt, "--out", str(tmp_path / "analysis")]) == 0
    assert (tmp_path / "analysis" / "analysis.json").is_file()
    png = tmp_path / "xl.png"
    assert main(["generate", "--model", str(tiny_sdxl_dir), "--lora", f"{adapter}:1.0", "--prompt", "zqx",
                 "--steps", "2", "--width", "32", "--height", "32", "--out", str(png)]) == 0
    from PIL import Image
    assert Image.open(png).size == (32, 32)


def test_every_family_implements_the_whole_seam():
    """The seam is a base class: each registered family is one, and overrides every method the base leaves open."""
    import inspect
    from trainer.models.detect import FAMILIES, get_family
    from trainer.models.family import Family
    open_methods = [name for name, fn in inspect.getmembers(Family, inspect.isfunction)
                    if "raise NotImplementedError" in inspect.getsource(fn)]
    assert len(open_methods) >= 8
    for name in FAMILIES:
        family = get_family(name)
        assert isinstance(family, Family) and family.name == name
        missing = [m for m in open_methods if getattr(type(family), m) is getattr(Family, m)]
        assert not missing, f"{family} leaves {missing} to the base class"
        for name in ("name", "label", "text_encoder_specs"):
            assert getattr(family, name, None) not in (None, ""), (family, name)


def test_the_generate_tab_draws_an_sdxl_base_with_its_adapter(sdxl_run, tiny_sdxl_dir, tmp_path):
    import numpy as np
    from app import generation as G
    from app.settings import AppSettings
    s = AppSettings(data_dir=tmp_path / "d", runs_dir=sdxl_run.parent, adapters_dir=tmp_path / "a",
                    base_model=str(tiny_sdxl_dir))

    def draw(slots):
        images = G.generate(s, s.base_model, slots, "a red square", seed=3, steps=2, guidance=3.0, width=64,
                            height=48, num_images=1)
        return np.asarray(images[0], dtype=np.int16)

    base, adapted = draw([]), draw([G.Slot(str(sdxl_run), 1.0)])  # a run folder: its final adapter
    assert base.shape == (48, 64, 3) and np.abs(adapted - base).mean() > 0.5
