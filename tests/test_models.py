"""trainer.models: diffusers folders, original-layout single files (offline), hub ids, pickles, bad input."""
from __future__ import annotations

import gzip
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from trainer.models import BaseModel, ModelLoadError, get_family, load_base_model, resolve_model_path, sd1

SD15 = Path(sd1.__file__).parent / "configs" / "sd15"


# --- diffusers -> original (CompVis) layout, for writing test checkpoints only -------------------------------------
# (the production converter is trainer/adapters/bake.py; this one is kept local so the tests check the loader
# against diffusers' own original -> diffusers converter, not against another piece of ours)

RESNET_NAMES = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
                ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]
VAE_ATTN_NAMES = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]


def _unet_prefixes(cfg) -> dict[str, str]:
    n, per = len(cfg["block_out_channels"]), cfg["layers_per_block"]
    pm = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
          "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
          "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
          "mid_block.resnets.1": "middle_block.2"}
    for i in range(n):
        for j in range(per):
            pm[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{1 + i * (per + 1) + j}.0"
            pm[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{1 + i * (per + 1) + j}.1"
        pm[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{(i + 1) * (per + 1)}.0.op"
        for j in range(per + 1):
            pm[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{i * (per + 1) + j}.0"
            pm[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{i * (per + 1) + j}.1"
        upsample_slot = 2 if "CrossAttn" in cfg["up_block_types"][i] else 1
        pm[f"up_blocks.{i}.upsamplers.0"] = f"output_blocks.{i * (per + 1) + per}.{upsample_slot}"
    return pm


def _rename(key: str, prefixes: dict[str, str]) -> str:
    for hf, ldm in sorted(prefixes.items(), key=lambda kv: -len(kv[0])):
        if key.startswith(hf + "."):
            rest = key[len(hf) + 1:]
            if "resnets" in hf:
                rest = next((b + rest[len(a):] for a, b in RESNET_NAMES if rest.startswith(a + ".")), rest)
            return f"{ldm}.{rest}"
    return key


def to_original_layout(unet, vae, text_encoder) -> dict[str, torch.Tensor]:
    unet_pm = _unet_prefixes(unet.config)
    out = {"model.diffusion_model." + _rename(k, unet_pm): v for k, v in unet.state_dict().items()}
    n = len(vae.config.block_out_channels)
    vae_pm = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"}
    for part in ("encoder", "decoder"):
        vae_pm |= {f"{part}.mid_block.resnets.0": f"{part}.mid.block_1",
                   f"{part}.mid_block.resnets.1": f"{part}.mid.block_2",
                   f"{part}.mid_block.attentions.0": f"{part}.mid.attn_1"}
    for i in range(n):
        vae_pm |= {f"encoder.down_blocks.{i}.resnets": f"encoder.down.{i}.block",
                   f"encoder.down_blocks.{i}.downsamplers.0": f"encoder.down.{i}.downsample",
                   f"decoder.up_blocks.{i}.resnets": f"decoder.up.{n - 1 - i}.block",
                   f"decoder.up_blocks.{i}.upsamplers.0": f"decoder.up.{n - 1 - i}.upsample"}
    for k, v in vae.state_dict().items():
        new = next((ldm + k[len(hf):] for hf, ldm in vae_pm.items() if k.startswith(hf + ".")), k)
        new = new.replace("conv_shortcut", "nin_shortcut")
        if ".mid.attn_1." in new:
            for a, b in VAE_ATTN_NAMES:
                new = new.replace(f"attn_1.{a}.", f"attn_1.{b}.")
            v = v[:, :, None, None] if v.ndim == 2 else v  # the original VAE attention uses 1x1 convs
        out["first_stage_model." + new] = v
    for k, v in text_encoder.state_dict().items():
        out["cond_stage_model.transformer.text_model." + k.removeprefix("text_model.")] = v
    return {k: v.contiguous() for k, v in out.items()}


def copy_configs(model_dir: Path, dest: Path) -> Path:
    """A diffusers folder without weights: what a single file's sidecar holds."""
    for src in model_dir.rglob("*"):
        if src.is_file() and src.suffix in (".json", ".txt"):
            (dest / src.relative_to(model_dir)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dest / src.relative_to(model_dir))
    return dest


def assert_same_weights(a: BaseModel, b: BaseModel) -> None:
    for name in ("denoiser", "vae", "text_encoder"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"{name}.{key}"


# --- fixtures -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_base(tiny_model_dir) -> BaseModel:
    return load_base_model(str(tiny_model_dir))


@pytest.fixture(scope="module")
def tiny_original(tiny_base) -> dict[str, torch.Tensor]:
    return to_original_layout(tiny_base.denoiser, tiny_base.vae, tiny_base.text_encoder)


@pytest.fixture
def tiny_file(tmp_path, tiny_model_dir, tiny_original) -> Path:
    """The tiny model as one original-layout .safetensors with a '<stem>.config' sidecar beside it."""
    file = tmp_path / "tiny.safetensors"
    save_file(tiny_original, str(file))
    copy_configs(tiny_model_dir, tmp_path / "tiny.config")
    return file


# --- a diffusers folder -------------------------------------------------------------------------------------------

def test_loads_a_diffusers_folder(tiny_base, tiny_model_dir):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    assert tiny_base.family.name == "sd1" and tiny_base.family is get_family("sd1")
    assert tiny_base.source == str(tiny_model_dir.resolve())
    assert isinstance(tiny_base.denoiser, UNet2DConditionModel) and isinstance(tiny_base.vae, AutoencoderKL)
    assert isinstance(tiny_base.text_encoder, CLIPTextModel) and isinstance(tiny_base.tokenizer, CLIPTokenizer)
    assert isinstance(tiny_base.noise_scheduler, DDPMScheduler)
    assert tiny_base.noise_scheduler.config.beta_start == 0.00085
    assert tiny_base.prediction_type() == "epsilon"
    assert tiny_base.text_encoders == {"lora_te": tiny_base.text_encoder}
    assert tiny_base.tokenizers == {"lora_te": tiny_base.tokenizer}
    assert tiny_base.dtype == torch.float32 and tiny_base.device.type == "cpu"


def test_base_weights_are_frozen(tiny_base):
    for module in (tiny_base.denoiser, tiny_base.vae, tiny_base.text_encoder):
        assert not any(p.requires_grad for p in module.parameters())
    assert not tiny_base.vae.training and not tiny_base.text_encoder.training


def tokenize(base, captions):
    return base.family.tokenize(base.tokenizer, captions)


def test_tokenize_pads_and_truncates_to_77(tiny_base):
    ids = tokenize(tiny_base, ["a red circle", "a red circle " * 40])
    tok = tiny_base.tokenizer
    assert ids.dtype == torch.long and ids.shape == (2, 77)
    assert ids[0, 0] == tok.bos_token_id and ids[0, -1] == tok.pad_token_id
    assert ids[1, -1] == tok.eos_token_id  # truncated, still closed by end-of-text
    assert torch.equal(tokenize(tiny_base, ["a red circle"]), ids[:1])


def test_encode_text_gives_the_unets_conditioning(tiny_base):
    hidden = tiny_base.encode_text(["a red circle", "a blue star"])["encoder_hidden_states"]
    assert hidden.shape == (2, 77, tiny_base.denoiser.config.cross_attention_dim)
    ids = tokenize(tiny_base, ["a red circle", "a blue star"])
    assert torch.equal(hidden, tiny_base.text_encoder(ids).last_hidden_state)
    assert not torch.equal(hidden[0], hidden[1])


def test_pipeline_shares_the_modules_and_samples(tiny_base):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    pipe = tiny_base.pipeline()
    assert pipe.unet is tiny_base.denoiser and pipe.vae is tiny_base.vae
    assert pipe.text_encoder is tiny_base.text_encoder and pipe.tokenizer is tiny_base.tokenizer
    assert pipe.safety_checker is None and pipe._progress_bar_config == {"disable": True}
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    assert torch.equal(pipe.scheduler.betas, tiny_base.noise_scheduler.betas)
    assert isinstance(tiny_base.pipeline("ddim").scheduler, DDIMScheduler)
    euler = EulerDiscreteScheduler.from_config(tiny_base.noise_scheduler.config)
    assert tiny_base.pipeline(euler).scheduler is euler
    with pytest.raises(ValueError, match="dpmsolver"):
        tiny_base.pipeline("no-such-sampler")
    out = pipe("a red square", num_inference_steps=2, height=16, width=16, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 16, 16, 3)


def test_fp16_and_bf16_load(tiny_model_dir):
    assert load_base_model(str(tiny_model_dir), dtype=torch.float16).denoiser.dtype == torch.float16
    bf16 = load_base_model(str(tiny_model_dir), dtype="bf16")
    assert {bf16.denoiser.dtype, bf16.vae.dtype, bf16.text_encoder.dtype} == {torch.bfloat16}
    with pytest.raises(ModelLoadError, match="fp32, fp16, bf16"):
        load_base_model(str(tiny_model_dir), dtype="int8")


def test_cuda_requested_without_cuda_is_a_clear_error(tiny_model_dir):
    device = "cuda:99" if torch.cuda.is_available() else "cuda"
    with pytest.raises(ModelLoadError, match="cuda"):
        load_base_model(str(tiny_model_dir), device=device)


def test_a_folder_with_only_pickle_weights_needs_trust(tmp_path, tiny_model_dir, tiny_base):
    folder = shutil.copytree(tiny_model_dir, tmp_path / "model")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.unlink()
    torch.save(tiny_base.denoiser.state_dict(), folder / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=r"unet.*pickle.*model\.trust_pickle=true"):
        load_base_model(str(folder))
    assert_same_weights(load_base_model(str(folder), trust_pickle=True), tiny_base)


def test_corrupt_weights_in_a_folder_name_the_component(tmp_path, tiny_model_dir):
    folder = shutil.copytree(tiny_model_dir, tmp_path / "model")
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match=r"model/vae.*copy the complete model folder"):
        load_base_model(str(folder))


# --- original-layout single files ---------------------------------------------------------------------------------

@pytest.mark.parametrize("sidecar", ["stem.config", "stem", "config_dir"])
def test_single_file_round_trip_with_sidecar_configs(tmp_path, tiny_file, tiny_base, sidecar):
    kwargs = {}
    if sidecar == "stem":
        (tmp_path / "tiny.config").rename(tmp_path / "tiny")
    elif sidecar == "config_dir":
        kwargs["config_dir"] = (tmp_path / "tiny.config").rename(tmp_path / "elsewhere")
    loaded = load_base_model(str(tiny_file), **kwargs)
    assert loaded.family.name == "sd1" and loaded.source == str(tiny_file)
    assert_same_weights(loaded, tiny_base)
    assert not any(p.requires_grad for p in loaded.denoiser.parameters()) and not loaded.vae.training
    assert torch.equal(tokenize(loaded, ["a red circle"]), tokenize(tiny_base, ["a red circle"]))
    assert torch.equal(loaded.encode_text("a red circle")["encoder_hidden_states"],
                       tiny_base.encode_text("a red circle")["encoder_hidden_states"])


def test_single_file_loads_in_bf16(tiny_file):
    loaded = load_base_model(str(tiny_file), dtype="bf16")
    assert {loaded.denoiser.dtype, loaded.vae.dtype, loaded.text_encoder.dtype} == {torch.bfloat16}


def test_single_file_that_is_not_sd15_size_asks_for_a_sidecar(tmp_path, tiny_file):
    shutil.rmtree(tmp_path / "tiny.config")
    with pytest.raises(ModelLoadError) as err:
        load_base_model(str(tiny_file))
    message = str(err.value)
    assert str(tiny_file) in message and "shape mismatches" in message
    assert "'tiny.config'" in message and "config_dir" in message


def test_single_file_does_not_touch_the_network(tiny_file, tiny_base, no_network):
    assert_same_weights(load_base_model(str(tiny_file)), tiny_base)
    assert no_network == []


def test_v_prediction_yaml_beside_a_checkpoint(tmp_path, tiny_file):
    (tmp_path / "tiny.yaml").write_text("model:\n  params:\n    parameterization: \"v\"\n", encoding="utf-8")
    loaded = load_base_model(str(tiny_file))
    assert loaded.prediction_type() == "v_prediction"
    assert loaded.pipeline().scheduler.config.prediction_type == "v_prediction"


def test_inpainting_checkpoint_is_refused(tmp_path, tiny_original, tiny_model_dir):
    state = dict(tiny_original)
    key = "model.diffusion_model.input_blocks.0.0.weight"
    state[key] = torch.zeros(state[key].shape[0], 9, 3, 3)
    save_file(state, str(tmp_path / "inpaint.safetensors"))
    copy_configs(tiny_model_dir, tmp_path / "inpaint.config")
    with pytest.raises(ModelLoadError, match="9 input channels"):
        load_base_model(str(tmp_path / "inpaint.safetensors"))


def test_checkpoint_missing_its_vae_says_so(tmp_path, tiny_original, tiny_model_dir):
    state = {k: v for k, v in tiny_original.items() if not k.startswith("first_stage_model.")}
    save_file(state, str(tmp_path / "novae.safetensors"))
    copy_configs(tiny_model_dir, tmp_path / "novae.config")
    with pytest.raises(ModelLoadError, match=r"novae\.safetensors contains no VAE weights"):
        load_base_model(str(tmp_path / "novae.safetensors"))


# --- the shipped SD1.5 configs and tokenizer ----------------------------------------------------------------------

def _sd15_on_meta():
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with init_empty_weights(include_buffers=True):
        return (UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SD15, subfolder="unet")),
                AutoencoderKL.from_config(AutoencoderKL.load_config(SD15, subfolder="vae")),
                CLIPTextModel(CLIPTextConfig.from_pretrained(SD15, subfolder="text_encoder")))


def test_sd15_configs_build_the_real_sd15_architecture():
    unet, vae, text_encoder = _sd15_on_meta()
    # the published parameter counts of runwayml/stable-diffusion-v1-5
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    assert sum(p.numel() for p in text_encoder.parameters()) == 123_060_480
    assert vae.config.scaling_factor == 0.18215 and text_encoder.config.hidden_act == "quick_gelu"
    scheduler = json.loads((SD15 / "scheduler" / "scheduler_config.json").read_text())
    assert (scheduler["beta_start"], scheduler["beta_end"], scheduler["beta_schedule"]) == (
        0.00085, 0.012, "scaled_linear")


def test_sd15_size_single_file_loads_with_the_shipped_configs(no_network):
    """The real SD1.5 key layout and shapes (on the meta device: no 4 GB file) fit the configs, offline."""
    state = to_original_layout(*_sd15_on_meta())
    assert len(state) == 686 + 248 + 196  # UNet, VAE and text-encoder tensors of an SD1.5 checkpoint
    parts = get_family("sd1").load_single_file(state, source=Path("sd15.safetensors"), config_dir=None,
                                               dtype=torch.float16)
    assert parts["denoiser"].dtype == torch.float16 and parts["denoiser"].config.cross_attention_dim == 768
    assert parts["noise_scheduler"].config.prediction_type == "epsilon"
    assert no_network == []


def test_sd15_tokenizer_gives_the_real_clip_ids():
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(SD15 / "tokenizer", local_files_only=True)
    assert len(tok) == 49408 and tok.model_max_length == 77
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.pad_token_id == tok.eos_token_id == 49407


def test_derive_script_reproduces_the_shipped_tokenizer(tmp_path):
    spec = importlib.util.spec_from_file_location("derive", SD15.parent / "derive_clip_tokenizer.py")
    derive = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(derive)
    shipped_merges = (SD15 / "tokenizer" / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    # CLIP's table: a header line, the merges, then ranks the tokenizer never uses
    table = "\n".join(["bpe_simple_vocab_16e6.txt#version: 0.2", *shipped_merges, "un used", "more unused"])
    gz = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    gz.write_bytes(gzip.compress(table.encode("utf-8")))
    derive.main(str(gz), str(tmp_path / "out"))
    assert (tmp_path / "out" / "merges.txt").read_bytes() == (SD15 / "tokenizer" / "merges.txt").read_bytes()
    assert json.loads((tmp_path / "out" / "vocab.json").read_text(encoding="utf-8")) == json.loads(
        (SD15 / "tokenizer" / "vocab.json").read_text(encoding="utf-8"))


# --- pickles ------------------------------------------------------------------------------------------------------

def test_pickle_checkpoint_is_refused_unless_trusted(tmp_path, tiny_original, tiny_model_dir, tiny_base):
    file = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": tiny_original, "global_step": 10}, file)
    copy_configs(tiny_model_dir, tmp_path / "tiny.config")
    with pytest.raises(ModelLoadError) as err:
        load_base_model(str(file))
    assert str(file) in str(err.value) and "model.trust_pickle=true" in str(err.value)
    assert ".safetensors" in str(err.value)
    assert_same_weights(load_base_model(str(file), trust_pickle=True), tiny_base)


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")  # would create the marker file when unpickled


def test_trusted_pickle_still_never_runs_code(tmp_path):
    marker = tmp_path / "code-ran"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _RunsCode(marker)}, tmp_path / "evil.ckpt")
    with pytest.raises(ModelLoadError, match="other than tensors"):
        load_base_model(str(tmp_path / "evil.ckpt"), trust_pickle=True)
    assert not marker.exists()


# --- hub ids ------------------------------------------------------------------------------------------------------

def test_hub_id_offline_asks_for_a_local_path(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=r"'someone/sd15-model'.*HF_HUB_OFFLINE.*local path"):
        load_base_model("someone/sd15-model")


def test_hub_id_without_network_asks_for_a_local_path(no_network):
    with pytest.raises(ModelLoadError, match=r"could not be downloaded.*local path"):
        load_base_model("someone/sd15-model")
    assert no_network, "the hub was never tried"


# --- bad input ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_safetensors_names_the_file(tmp_path, tiny_file, damage):
    data = tiny_file.read_bytes()
    tiny_file.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"not a model at all",
                           "empty": b""}[damage])
    with pytest.raises(ModelLoadError, match=r"tiny\.safetensors.*truncated or corrupt"):
        load_base_model(str(tiny_file))


def test_missing_path_names_it_and_the_choices(tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match=r"nowhere\.safetensors does not exist.*diffusers folder"):
        load_base_model(str(tmp_path / "nowhere.safetensors"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE"):
        load_base_model("models/not-here")  # reads as a hub id "owner/name"...
    (tmp_path / "models").mkdir()
    with pytest.raises(ModelLoadError, match="models/not-here does not exist"):
        load_base_model("models/not-here")  # ...but with a local models/ folder it is a mistyped path


def test_folder_without_model_index_points_at_the_checkpoint_inside(tmp_path, tiny_file):
    with pytest.raises(ModelLoadError, match=r"no model_index\.json.*tiny\.safetensors"):
        load_base_model(str(tmp_path))


def test_empty_path_is_the_tiny_built_in_model():
    import trainer

    assert resolve_model_path("") == str(Path(trainer.__file__).parent / "assets" / "tiny-sd")
    assert resolve_model_path("  ") == resolve_model_path("")


@pytest.mark.parametrize("keys, message", [
    ({"conditioner.embedders.0.model.transformer.resblocks.0.attn.in_proj_weight": 1,
      "model.diffusion_model.input_blocks.0.0.weight": 1}, "is an SDXL refiner"),
    ({"conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight": 1,
      "model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)}, "9 input channels .*SDXL"),
    ({"cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": 1,
      "model.diffusion_model.input_blocks.0.0.weight": 1}, "do not fit the configs in .*sd2-768-v.*Stable Diffusion 2.x"),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": 1}, "LoRA adapter, not a base model"),
    ({"model.diffusion_model.input_blocks.0.0.weight": 1}, "no text encoder"),
    ({"down_blocks.0.resnets.0.conv1.weight": 1}, "diffusers layout"),
])
def test_other_checkpoint_kinds_are_named(tmp_path, keys, message):
    file = tmp_path / "other.safetensors"
    save_file({k: torch.zeros(v) for k, v in keys.items()}, str(file))
    with pytest.raises(ModelLoadError, match=message) as err:
        load_base_model(str(file))
    assert str(file) in str(err.value)


def test_an_incomplete_sdxl_folder_is_named(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline",
                                                          "unet": ["diffusers", "UNet2DConditionModel"],
                                                          "text_encoder": ["transformers", "CLIPTextModel"]}))
    with pytest.raises(ModelLoadError, match="unet is missing; a SDXL folder needs"):
        load_base_model(str(tmp_path))


def test_an_sdxl_refiner_folder_is_refused(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLImg2ImgPipeline",
                                                          "text_encoder": [None, None], "unet": ["x", "y"]}))
    with pytest.raises(ModelLoadError, match="SDXL refiner"):
        load_base_model(str(tmp_path))


def test_family_must_agree_with_the_model(tiny_model_dir):
    assert load_base_model(str(tiny_model_dir), family="sd1").family.name == "sd1"
    with pytest.raises(ModelLoadError, match=r"Stable Diffusion 1.x model \(sd1\), but model.family is 'sdxl' \(SDXL\)"):
        load_base_model(str(tiny_model_dir), family="sdxl")
    with pytest.raises(ModelLoadError, match="choose one of flux, flux2, sd1, sd2, sd3, sdxl"):
        load_base_model(str(tiny_model_dir), family="sd4")
    with pytest.raises(ModelLoadError, match=r"model \(sd1\), but model.family is 'sd3' \(Stable Diffusion 3 / 3.5\)"):
        load_base_model(str(tiny_model_dir), family="sd3")
