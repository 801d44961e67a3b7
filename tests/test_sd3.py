"""SD 3.5 through the family seam: a tiny SD 3.5 (dual attention, qk-norm, CLIP-L + CLIP-G + T5) trained through the
CLI with CLIP LoRA on; both file layouts; diffusers loads its layout with every key and the outputs of a hand merge;
the SAI/kohya layout's fused qkv equals the split modules exactly and reads back to the same deltas."""
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


def train(model: Path, root: Path, *extra: str, steps: int = 12) -> Path:
    return train_transformer_cli(model, root, "sd3", *extra, steps=steps, save_every=6)


@pytest.fixture(scope="module")
def sd3_run(tiny_sd3_dir, tmp_path_factory):
    """12 CLI steps on the tiny SD 3.5: the transformer's attention (both streams and attn2) and both CLIPs."""
    return train(tiny_sd3_dir, tmp_path_factory.mktemp("sd3-run"), "network.text_encoders=['te1', 'te2']")


def keys_of(path: Path) -> tuple[set[str], dict]:
    with safe_open(str(path), "pt") as f:
        return set(f.keys()), f.metadata()


def test_an_sd3_run_writes_both_layouts_with_sd3_metadata(sd3_run):
    diffusers_keys, meta = keys_of(sd3_run / "sd3.safetensors")  # the default: the layout most programs load
    assert {k.split(".")[0] for k in diffusers_keys} == {"transformer", "text_encoder", "text_encoder_2"}
    assert any(".attn2.to_q.lora_A." in k for k in diffusers_keys)
    kohya_keys, kohya_meta = keys_of(sd3_run / "sd3-kohya.safetensors")
    modules = {k.split(".")[0] for k in kohya_keys}
    unet = {m for m in modules if m.startswith("lora_unet_")}
    # sd-scripts' lora_sd3 names: SAI's MMDiT paths, q/k/v as one qkv module
    assert unet == {f"lora_unet_joint_blocks_{i}_{s}" for i, s in
                    [(0, "x_block_attn_qkv"), (0, "x_block_attn_proj"), (0, "x_block_attn2_qkv"),
                     (0, "x_block_attn2_proj"), (0, "context_block_attn_qkv"), (0, "context_block_attn_proj"),
                     (1, "x_block_attn_qkv"), (1, "x_block_attn_proj"), (1, "context_block_attn_qkv"),
                     (1, "context_block_attn_proj"), (2, "x_block_attn_qkv"), (2, "x_block_attn_proj"),
                     (2, "context_block_attn_qkv")]}  # the last block's context stream ends at its qkv
    assert {m.split("_text_model_")[0] for m in modules - unet} == {"lora_te1", "lora_te2"}
    for m in (meta, kohya_meta):  # as sd-scripts writes for SD 3.5 Medium (dual attention and qk-norm)
        assert m["ss_base_model_version"] == "5-medium"
        assert m["modelspec.architecture"] == "stable-diffusion-3-5-medium/lora"


def test_the_fused_qkv_equals_the_split_modules_exactly(sd3_run):
    kohya = load_adapter(sd3_run / "sd3-kohya.safetensors")
    split = load_adapter(sd3_run / "sd3.safetensors")
    assert kohya.layers.keys() == split.layers.keys()
    with safe_open(str(sd3_run / "sd3-kohya.safetensors"), "pt") as f:
        down = f.get_tensor("lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight")
        up = f.get_tensor("lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight")
        alpha = float(f.get_tensor("lora_unet_joint_blocks_0_x_block_attn_qkv.alpha"))
    assert down.shape[0] == 12 and up.shape[1] == 12  # rank 3 x 4: [A_q; A_k; A_v], block-diagonal up
    fused = (alpha / down.shape[0]) * (up @ down)
    parts = [kohya.layers[f"lora_unet_transformer_blocks_0_attn_to_{p}"] for p in "qkv"]
    assert torch.equal(fused, torch.cat([layer.delta() for layer in parts]))
    # and the split modules as they trained (the run's last training state, peft's names): (alpha/r) B A each
    state = load_file(str(runs.last_checkpoint(sd3_run) / "lora.safetensors"))
    trained = [(2 / 4) * (state[f"unet.transformer_blocks.0.attn.to_{p}.lora_B.default.weight"]
                          @ state[f"unet.transformer_blocks.0.attn.to_{p}.lora_A.default.weight"]) for p in "qkv"]
    assert torch.equal(fused, torch.cat(trained))
    for name, layer in kohya.layers.items():  # read back: the same ranks and the same deltas as the split file
        assert layer.rank == split.layers[name].rank == 4, name
        assert torch.allclose(layer.delta(), split.layers[name].delta(), atol=1e-7, rtol=0), name


def transformer_output(transformer) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    noisy, hidden, pooled = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 93, 96, generator=g), \
        torch.randn(1, 72, generator=g)
    with torch.no_grad():
        return transformer(hidden_states=noisy, timestep=torch.tensor([500.0]), encoder_hidden_states=hidden,
                           pooled_projections=pooled, return_dict=False)[0]


def test_diffusers_loads_the_default_file_with_every_key_and_the_hand_merged_output(sd3_run, tiny_sd3_dir, caplog):
    from diffusers import StableDiffusion3Pipeline
    from diffusers.utils import logging as dlogging
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_sd3_dir))
    plain = transformer_output(pipe.transformer)
    dlogging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            pipe.load_lora_weights(str(sd3_run / "sd3.safetensors"))
    finally:
        dlogging.disable_propagation()
    assert not [r for r in caplog.records if "unexpected" in r.getMessage() or "missing" in r.getMessage()]
    keys, _ = keys_of(sd3_run / "sd3.safetensors")
    loaded = sum(1 for model in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2)
                 for m in model.modules() if hasattr(m, "lora_A") and m.lora_A)
    assert loaded == len({k.rsplit(".lora_", 1)[0] for k in keys})  # every layer of the file found its module
    theirs = transformer_output(pipe.transformer)
    ours = transformer_output(hand_merged(tiny_sd3_dir, load_adapter(sd3_run / "sd3-kohya.safetensors")))
    assert (ours - theirs).abs().max() < 1e-4
    assert (ours - plain).abs().max() > 1e-3, "the LoRA changes the output"


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "events.jsonl").read_text().splitlines()
            if '"progress"' in line]


def test_the_flow_matching_loss_falls_on_the_tiny_sd3(tiny_sd3_dir, tmp_path):
    same = make_images(tmp_path / "same", n=4, size=48)  # the training images: a noise-free view of the loss
    run_dir = train(tiny_sd3_dir, tmp_path, "network.text_encoders=['te1', 'te2']", f"validation.path={same}",
                    "dataset.batch_size=4", steps=40)
    assert len(losses(run_dir)) == 40
    fixed = runs.validation_losses(run_dir)  # fixed noise levels and noise
    print(f"tiny SD3: flow-matching loss at fixed sigmas and noise, step 0 {fixed[0]:.4f}, step 40 {fixed[40]:.4f}")
    assert fixed[40] < 0.95 * fixed[0]


# ---- key sets at real size, from the shipped configs on the meta device --------------------------------------------
def sd_scripts_names(num_layers: int, dual_attention: range) -> set[str]:
    """The modules kohya-ss/sd-scripts' networks/lora_sd3.py (main @ 48d368fa) gives a LoRA by default, restated:
    every nn.Linear inside each SingleDiTBlock (LS:231, 324-352), i.e. joint_blocks.N.x_block and .context_block of
    SAI's MMDiT (library/sd3_models.py:691-692): attn.qkv, attn.proj, mlp.fc1, mlp.fc2, adaLN_modulation.1, and on
    dual-attention x blocks attn2.qkv and attn2.proj (sd3_models.py:474-476, 599-616); the last block's context
    block is pre_only (sd3_models.py:849) and has only attn.qkv and adaLN_modulation.1. The name is "lora_unet" +
    "." + the module path with every "." made "_" (LS:233, 333-334)."""
    names = set()
    for i in range(num_layers):
        for stream in ("x_block", "context_block"):
            last_context = stream == "context_block" and i == num_layers - 1
            modules = ["attn.qkv", "adaLN_modulation.1"] if last_context else \
                ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"]
            if stream == "x_block" and i in dual_attention:
                modules += ["attn2.qkv", "attn2.proj"]
            names |= {("lora_unet." + f"joint_blocks.{i}.{stream}.{m}").replace(".", "_") for m in modules}
    return names


@pytest.mark.parametrize("config, layers, dual, counts", [
    # attention: 8 per block (both streams' q, k, v, out), 7 in the last (no context out), 4 per attn2;
    # feed_forward: 4 per block, 2 in the last; adaln: 2 per block
    ("sd35-medium", 24, range(13), {"attention": 24 * 8 - 1 + 13 * 4, "feed_forward": 24 * 4 - 2, "adaln": 48}),
    ("sd35-large", 38, range(0), {"attention": 38 * 8 - 1, "feed_forward": 38 * 4 - 2, "adaln": 76}),
    ("sd3-medium", 24, range(0), {"attention": 24 * 8 - 1, "feed_forward": 24 * 4 - 2, "adaln": 48}),
])
def test_real_size_key_sets_match_sd_scripts(config, layers, dual, counts):
    from trainer.models import get_family, meta_index
    from trainer.models.family import CONFIGS
    family = get_family("sd3")
    index = meta_index("sd3", CONFIGS / config)
    transformer = {n: e for n, e in index.items() if e[0] == "lora_unet"}
    for group, count in counts.items():
        suffixes = tuple("." + m for m in family.unet_groups[group])
        assert sum(1 for _, path, _ in transformer.values() if path.endswith(suffixes)) == count, group
    targets = tuple("." + m for g in ("attention", "feed_forward", "adaln") for m in family.unet_groups[g])
    trained = {n: e for n, e in transformer.items() if e[1].endswith(targets)}
    file_names = {f.name for f in family.kohya_file_layout(trained)}
    assert file_names == sd_scripts_names(layers, dual)
    assert len(file_names) == {"sd35-medium": 263, "sd35-large": 377, "sd3-medium": 237}[config]  # ran sd-scripts
    encoders = {p: sum(1 for e in index.values() if e[0] == p) for p in ("lora_te1", "lora_te2", "lora_te3")}
    # CLIP-L 12 layers x 6 (q, k, v, out, fc1, fc2), CLIP-G 32 x 6, T5-XXL 24 x 7 (q, k, v, o, wi_0, wi_1, wo):
    # sd-scripts' 72, 192 and 168 (lora_sd3.py:232, 418-426), plus the CLIPs' text_projection, which it skips
    assert encoders == {"lora_te1": 72 + 1, "lora_te2": 192 + 1, "lora_te3": 168}
    assert "lora_te3_encoder_block_23_layer_1_DenseReluDense_wi_1" in index
    assert "lora_te2_text_model_encoder_layers_31_mlp_fc2" in index


# ---- resume, data parallel, validation: the run guarantees of the UNet families hold for a flow transformer ----------
def sd3_cfg(model: Path, data: Path, tmp_path: Path, **overrides):
    from test_training import make_cfg
    values = {"model.t5_length": 16, "dataset.resolution": 32, "network.text_encoders": ["te1"],
              "loss.flow_weighting": "sigma_sqrt", "loss.flow_shift": 3.0, **overrides}
    return make_cfg(model, data, tmp_path, **values)


def test_stop_then_resume_equals_an_uninterrupted_sd3_run(tiny_sd3_dir, tmp_path):
    from test_training import assert_same_tensors, stopped_and_resumed, tensors
    from trainer.events import Progress
    cfg = sd3_cfg(tiny_sd3_dir, make_images(tmp_path / "data", n=4, size=48), tmp_path,
                  **{"schedule.max_steps": 6, "dataset.flip": True, "network.dropout": 0.1,
                     "loss.timestep_sampling": "mode"})
    full, resumed, events, _, stopped_at = stopped_and_resumed(cfg)
    assert stopped_at == "step-000003"
    assert [e.step for e in events if isinstance(e, Progress)] == [4, 5, 6]
    assert_same_tensors(tensors(full), tensors(resumed))


def test_two_processes_train_the_sd3_adapter_one_process_trains(tiny_sd3_dir, tmp_path):
    from test_distributed import assert_close
    from test_distributed import train as train_dp
    data = make_images(tmp_path / "eight", n=8, size=48)
    common = ("model.t5_length=16", "network.text_encoders=['te1']", "loss.timestep_sampling=uniform")
    one = train_dp(tiny_sd3_dir, data, tmp_path / "runs", "one", 1, "dataset.batch_size=4", *common)
    two = train_dp(tiny_sd3_dir, data, tmp_path / "runs", "two", 2, "dataset.batch_size=2", *common)
    assert_close(two / "two.safetensors", one / "one.safetensors")
    assert_close(two / "two-kohya.safetensors", one / "one-kohya.safetensors")


def test_the_sd3_validation_loss_is_deterministic_at_fixed_noise_levels(tiny_sd3_dir, tmp_path):
    from test_training import train
    from trainer.events import Validation
    data = make_images(tmp_path / "data", n=6, size=48)
    cfg = sd3_cfg(tiny_sd3_dir, data, tmp_path, **{"validation.split": 0.34, "validation.every_n_steps": 2,
                                                 "schedule.max_steps": 4})
    _, first, _ = train(cfg)
    _, second, _ = train(cfg)
    a, b = ([e for e in events if isinstance(e, Validation)] for events in (first, second))
    assert [v.step for v in a] == [0, 2, 4]
    assert [(v.loss, v.per_timestep) for v in a] == [(v.loss, v.per_timestep) for v in b]
    assert set(a[0].per_timestep) == {"200", "400", "600", "800"}  # sigma 0.2 .. 0.8 x 1000
    assert len({v.loss for v in a}) == len(a), "it moves as the adapter trains"


def test_t5_length_0_leaves_t5_unloaded_and_its_part_zeros(tiny_sd3_dir):
    base = load_base_model(str(tiny_sd3_dir), options={"t5_length": 0})
    assert list(base.text_encoders) == ["lora_te1", "lora_te2"]  # never loaded: no memory for it
    text = base.encode_text(["a red circle"])
    states = text["encoder_hidden_states"]
    assert states.shape == (1, 77 + 77, 96)  # as diffusers' pipeline does without T5: 77 zero positions
    assert torch.count_nonzero(states[:, 77:]) == 0 and torch.count_nonzero(states[:, :77, :80]) > 0
    pipe = base.pipeline()
    assert pipe.text_encoder_3 is None
    embeds = pipe.encode_prompt("a red circle", None, None, do_classifier_free_guidance=False,
                                max_sequence_length=pipe.t5_length)[0]  # what its __call__ passes
    assert torch.equal(embeds, states)  # samples condition as training did


# ---- single files as people keep them ----------------------------------------------------------------------------
def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    x, y = a.state_dict(), b.state_dict()
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def single_files(base, folder: Path) -> tuple[Path, dict[str, Path]]:
    """The model as SAI's single file, and as ComfyUI users keep it: the transformer alone plus a file per part."""
    from safetensors.torch import save_file

    from trainer.models.sd3_bake import original_checkpoint
    state = {k: v.clone().contiguous() for k, v in original_checkpoint(base).items()}
    whole = folder / "sd3.5_tiny.safetensors"
    save_file(state, str(whole))
    parts = {"transformer": "model.diffusion_model.", "vae": "first_stage_model.",
             "clip_l": "text_encoders.clip_l.transformer.", "clip_g": "text_encoders.clip_g.transformer.",
             "t5xxl": "text_encoders.t5xxl.transformer."}
    files = {}
    for name, prefix in parts.items():
        keep = prefix if name == "transformer" else ""  # a separate file holds its own names, no prefix
        files[name] = folder / f"{name}.safetensors"
        save_file({keep + k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, str(files[name]))
    return whole, files


def test_sai_single_files_load_whole_or_with_separate_text_encoders_and_vae(tiny_sd3_dir, tmp_path):
    """SAI's sd3.5_medium.safetensors with everything inside, and the ComfyUI way: the transformer alone plus
    clip_l / clip_g / t5xxl / VAE files (model.clip_l_path ...); both give the folder's weights exactly."""
    folder = load_base_model(str(tiny_sd3_dir))
    whole, files = single_files(folder, tmp_path)
    options = {"clip_l_path": str(files["clip_l"]), "clip_g_path": str(files["clip_g"]),
               "t5_path": str(files["t5xxl"]), "vae_path": str(files["vae"])}
    for path, opts in ((whole, {}), (files["transformer"], options)):
        base = load_base_model(str(path), config_dir=tiny_sd3_dir, options=opts)
        assert base.family.name == "sd3" and list(base.text_encoders) == ["lora_te1", "lora_te2", "lora_te3"]
        for a, b in zip(base.components, folder.components):
            assert same_weights(a, b), type(a).__name__
    from trainer.models import ModelLoadError
    with pytest.raises(ModelLoadError, match="holds no VAE; give its file as model.vae_path"):
        load_base_model(str(files["transformer"]), config_dir=tiny_sd3_dir)
    with pytest.raises(ModelLoadError, match="holds no CLIP-L; give its file as model.clip_l_path"):
        load_base_model(str(files["transformer"]), config_dir=tiny_sd3_dir, options={"vae_path": str(files["vae"])})
    without_t5 = load_base_model(str(files["transformer"]), config_dir=tiny_sd3_dir,
                                 options={k: v for k, v in options.items() if k != "t5_path"})
    assert "lora_te3" not in without_t5.text_encoders  # SD3 without T5: its part of the conditioning is zeros


def test_fp8_base_weights_store_the_denoiser_in_fp8_and_train_the_lora_in_fp32(tiny_sd3_dir, tmp_path):
    """precision.fp8_base (SD 3.5 Large's 16 GB preset): diffusers' layerwise casting keeps the frozen Linear
    weights in float8_e4m3fn and computes in the training precision; the LoRA factors stay fp32 and learn."""
    from test_training import train
    from trainer.loop import Trainer
    cfg = sd3_cfg(tiny_sd3_dir, make_images(tmp_path / "data", n=4, size=48), tmp_path,
                  **{"precision.fp8_base": True, "schedule.max_steps": 3, "network.text_encoders": []})
    trainer = Trainer(cfg, tmp_path / "probe")
    trainer.scan = None
    trainer._setup_model()
    weights = {n: p.dtype for n, p in trainer.base.denoiser.named_parameters()}
    assert weights["transformer_blocks.0.attn.to_q.base_layer.weight"] == torch.float8_e4m3fn
    assert weights["transformer_blocks.0.ff.net.2.weight"] == torch.float8_e4m3fn
    # the adaLN modulation too, which diffusers' default skips by its name ("norm"), as sd-scripts' fp8_base
    assert weights["transformer_blocks.0.norm1.linear.weight"] == torch.float8_e4m3fn
    assert weights["pos_embed.proj.weight"] == torch.float32  # the patch embedding stays as it is
    assert all(p.dtype == torch.float32 for p in trainer.params.named().values())
    assert trainer.base.dtype == torch.float32  # what predict casts its inputs to: the compute dtype
    adapter, _, _ = train(cfg)
    with safe_open(str(adapter), "pt") as f:
        ups = [f.get_tensor(k) for k in f.keys() if "lora_B" in k]
    assert ups and all(torch.isfinite(u).all() for u in ups) and any(u.abs().max() > 0 for u in ups)


def test_t5_trains_only_when_te3_is_named_and_keeps_kohyas_lora_te3_names(tiny_sd3_dir, tmp_path):
    from test_training import train
    data = make_images(tmp_path / "data", n=2, size=48)
    cfg = sd3_cfg(tiny_sd3_dir, data, tmp_path, **{"network.text_encoders": ["all"], "schedule.max_steps": 1})
    from trainer.loop import Trainer
    probe = Trainer(cfg, tmp_path / "probe")
    probe.scan = None
    probe._setup_model()
    assert set(probe.trained_encoders) == {"lora_te1", "lora_te2"}  # 'all' leaves T5 frozen
    cfg = sd3_cfg(tiny_sd3_dir, data, tmp_path, **{"network.text_encoders": ["te3"], "schedule.max_steps": 2,
                                                 "network.text_encoder_targets": ["attention", "mlp"]})
    adapter, _, _ = train(cfg)
    names = {k.split(".")[0] for k in keys_of(adapter.with_name(adapter.stem + "-kohya.safetensors"))[0]}
    te3 = {n for n in names if n.startswith("lora_te3_")}
    assert te3 == {f"lora_te3_encoder_block_{i}_layer_{j}" for i in range(2) for j in
                   ("0_SelfAttention_q", "0_SelfAttention_k", "0_SelfAttention_v", "0_SelfAttention_o",
                    "1_DenseReluDense_wi_0", "1_DenseReluDense_wi_1", "1_DenseReluDense_wo")}
    keys, _ = keys_of(adapter)
    assert "text_encoder_3.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight" in keys
    kohya, split = load_adapter(adapter.with_name(adapter.stem + "-kohya.safetensors")), load_adapter(adapter)
    assert kohya.layers.keys() == split.layers.keys()
    for name, layer in kohya.layers.items():
        assert torch.allclose(layer.delta(), split.layers[name].delta(), atol=1e-7, rtol=0), name


def test_check_names_missing_and_wrong_component_files_before_loading(tiny_sd3_dir, tmp_path):
    """validate and the app's Check read the files' headers: a transformer-only file without its parts, a CLIP-G
    given as CLIP-L, a text encoder given as VAE, T5 trained but left out, sides that are no multiple of 16; loading
    refuses the same wrong file with the same words."""
    import shutil

    from trainer import config_problems
    from trainer import config as C
    from trainer.models import ModelLoadError
    _, files = single_files(load_base_model(str(tiny_sd3_dir)), tmp_path)
    shutil.copytree(tiny_sd3_dir, tmp_path / "transformer")  # the configs beside the file, as '<stem>/'
    data = make_images(tmp_path / "data", n=2, size=48)

    def problems(*sets: str) -> list[str]:
        cfg = C.TrainConfig()
        C.apply_overrides(cfg, [f"model.path={files['transformer']}", f"dataset.path={data}",
                                "dataset.resolution=32", *sets])
        return config_problems(cfg)

    found = problems()
    assert any("holds no VAE; give its file as model.vae_path" in p for p in found), found
    assert any("holds no CLIP-L; give its file as model.clip_l_path" in p for p in found)
    assert any("holds no CLIP-G; give its file as model.clip_g_path" in p for p in found)
    parts = [f"model.vae_path={files['vae']}", f"model.clip_l_path={files['clip_l']}",
             f"model.clip_g_path={files['clip_g']}"]
    assert problems(*parts) == []
    wrong = [f"model.vae_path={files['clip_l']}", f"model.clip_l_path={files['clip_g']}",
             f"model.clip_g_path={files['clip_g']}"]
    found = problems(*wrong)
    assert any("model.clip_l_path" in p and "is not this model's CLIP-L: it has 48 wide where it needs 32" in p
               for p in found), found
    assert any("model.vae_path" in p and "is not a VAE file" in p for p in found)
    assert any("te3 (T5) but model.t5_length is 0" in p
               for p in problems(*parts, "network.text_encoders=['te3']", "model.t5_length=0"))
    assert any("holds no T5" in p for p in problems(*parts, "network.text_encoders=['te3']"))
    assert any("dataset.resolution 40 must be a multiple of 16" in p
               for p in problems(*parts, "dataset.resolution=40"))
    options = {"vae_path": str(files["vae"]), "clip_l_path": str(files["clip_g"]), "clip_g_path": str(files["clip_g"])}
    with pytest.raises(ModelLoadError, match="is not this model's CLIP-L: it has 48 wide where it needs 32"):
        load_base_model(str(files["transformer"]), options=options)


def test_every_target_group_lands_on_the_same_weights_through_both_layouts(tiny_sd3_dir, tmp_path, caplog):
    """Attention, feed-forward and adaLN (whose last context block SAI stores with its halves swapped) trained:
    the kohya file applied as ComfyUI and Forge apply it (each `lora_unet_<SAI path>` onto SAI's single-file
    weight of that path, found from the file's keys as their key maps do) and converted to diffusers' layout by
    diffusers' own converter equals the diffusers file applied to diffusers' weights; diffusers loads that file
    with every key."""
    from diffusers import StableDiffusion3Pipeline
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
    from diffusers.utils import logging as dlogging

    from trainer.formats import kohya_name
    from trainer.models.sd3_layout import transformer_to_original
    run = train(tiny_sd3_dir, tmp_path, "network.text_encoders=[]",
                "network.unet_targets=['attention', 'feed_forward', 'adaln']", steps=4)
    base = load_base_model(str(tiny_sd3_dir)).denoiser
    plain = {k: v.clone() for k, v in base.state_dict().items()}
    sai = transformer_to_original(plain, base.config, prefix="")
    by_name = {kohya_name("lora_unet", k.removesuffix(".weight")): k for k in sai if k.endswith(".weight")}
    with safe_open(str(run / "sd3-kohya.safetensors"), "pt") as f:
        modules = {k.split(".")[0] for k in f.keys()}
        assert "lora_unet_joint_blocks_2_context_block_adaLN_modulation_1" in modules
        for m in modules:
            down, up = f.get_tensor(f"{m}.lora_down.weight"), f.get_tensor(f"{m}.lora_up.weight")
            sai[by_name[m]] = sai[by_name[m]] + float(f.get_tensor(f"{m}.alpha")) / down.shape[0] * (up @ down)
    through_sai = convert_sd3_transformer_checkpoint_to_diffusers({"model.diffusion_model." + k: v
                                                                   for k, v in sai.items()})
    merged = hand_merged(tiny_sd3_dir, load_adapter(run / "sd3.safetensors")).state_dict()
    assert through_sai.keys() == merged.keys()
    changed = [k for k in merged if not torch.equal(merged[k], plain[k])]
    assert "transformer_blocks.2.norm1_context.linear.weight" in changed and len(changed) > 40
    for k in merged:
        assert (through_sai[k] - merged[k]).abs().max() < 1e-6, k
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_sd3_dir))
    dlogging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            pipe.load_lora_weights(str(run / "sd3.safetensors"))
    finally:
        dlogging.disable_propagation()
    assert not [r for r in caplog.records if ("unexpected" in r.getMessage() or "missing" in r.getMessage())
                and "No LoRA keys associated" not in r.getMessage()]  # (no text-encoder layers: none trained)
    loaded = sum(1 for m in pipe.transformer.modules() if hasattr(m, "lora_A") and m.lora_A)
    assert loaded == len(load_adapter(run / "sd3.safetensors").layers)
    ours = transformer_output(hand_merged(tiny_sd3_dir, load_adapter(run / "sd3.safetensors")))
    assert (transformer_output(pipe.transformer) - ours).abs().max() < 1e-4
