"""The tiny FLUX.1 test model (tests/tiny_flux.py): a real FluxPipeline folder that diffusers loads offline and
renders from, with FLUX's text layout (CLIP-L pooled, T5 sequence), 2x2 latent packing, dev (guidance embedding,
shifted schedule) and schnell layouts, and seed-determined weights."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tiny_flux as T


@pytest.fixture(scope="module")
def dev_dir(tmp_path_factory) -> Path:
    return T.make_tiny_flux(tmp_path_factory.mktemp("tiny-flux-dev"))


@pytest.fixture(scope="module")
def dev_pipe(dev_dir):
    from diffusers import FluxPipeline
    return FluxPipeline.from_pretrained(dev_dir)


@pytest.fixture(scope="module")
def schnell_pipe(tmp_path_factory):
    from diffusers import FluxPipeline
    return FluxPipeline.from_pretrained(T.make_tiny_flux(tmp_path_factory.mktemp("tiny-flux-schnell"),
                                                         guidance=False))


def _render(pipe, guidance_scale: float = 3.5, seed: int = 0):
    return pipe("a red square", num_inference_steps=2, max_sequence_length=16, height=T.IMAGE_SIZE,
                width=T.IMAGE_SIZE, guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(seed),
                output_type="np").images


def test_folder_loads_offline_and_renders_two_steps(dev_dir, no_network):
    from diffusers import FluxPipeline
    pipe = FluxPipeline.from_pretrained(dev_dir)
    image = _render(pipe)
    assert image.shape == (1, T.IMAGE_SIZE, T.IMAGE_SIZE, 3)
    assert torch.isfinite(torch.from_numpy(image)).all() and image.std() > 0
    assert (image == _render(pipe)).all()  # same seed, same image
    assert no_network == []


def test_folder_has_flux_component_settings(dev_dir, dev_pipe):
    vae, transformer = dev_pipe.vae.config, dev_pipe.transformer.config
    assert (vae.latent_channels, vae.scaling_factor, vae.shift_factor) == (16, 0.3611, 0.1159)
    assert not vae.use_quant_conv and not vae.use_post_quant_conv
    assert transformer.in_channels == 4 * vae.latent_channels and transformer.patch_size == 1
    assert sum(transformer.axes_dims_rope) == transformer.attention_head_dim
    assert (transformer.joint_attention_dim, transformer.pooled_projection_dim) == (T.T5_WIDTH, T.CLIP_WIDTH)
    assert transformer.guidance_embeds and hasattr(dev_pipe.transformer.time_text_embed, "guidance_embedder")
    assert type(dev_pipe.text_encoder).__name__ == "CLIPTextModel"  # no projection: FLUX pools CLIP-L unprojected
    # transformers 5 names its (fast) T5 tokenizer T5Tokenizer; the index says T5TokenizerFast, as released
    assert dev_pipe.tokenizer_2.is_fast and dev_pipe.tokenizer_2.pad_token_id == 0
    index = json.loads((dev_dir / "model_index.json").read_text())
    assert index["tokenizer_2"] == ["transformers", "T5TokenizerFast"]
    scheduler = dev_pipe.scheduler.config
    assert type(dev_pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert {key: scheduler[key] for key in T.DEV_SCHEDULER} == T.DEV_SCHEDULER
    assert dev_pipe.vae_scale_factor == 2
    assert sum(f.stat().st_size for f in dev_dir.rglob("*") if f.is_file()) < 2 * 2**20


def test_prompt_embeddings_follow_flux_layout(dev_pipe):
    """T5's states are the sequence; the pooled vector is CLIP-L's pooler output, unprojected."""
    embeds, pooled, text_ids = dev_pipe.encode_prompt("a red square", "a red square", max_sequence_length=16)
    assert embeds.shape == (1, 16, T.T5_WIDTH) and pooled.shape == (1, T.CLIP_WIDTH)
    assert text_ids.shape == (16, 3) and text_ids.abs().max() == 0  # FLUX.1 text tokens all sit at position 0
    ids = dev_pipe.tokenizer("a red square", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(pooled, dev_pipe.text_encoder(ids).pooler_output)


def test_latents_pack_2x2_into_the_transformer_channels(dev_pipe):
    latents, image_ids = dev_pipe.prepare_latents(1, T.LATENT_CHANNELS, T.IMAGE_SIZE, T.IMAGE_SIZE, torch.float32,
                                                  "cpu", torch.Generator().manual_seed(0))
    side = T.IMAGE_SIZE // dev_pipe.vae_scale_factor // 2
    assert latents.shape == (1, side * side, dev_pipe.transformer.config.in_channels)
    assert image_ids.shape == (side * side, 3) and image_ids[:, 1:].max() == side - 1


def test_guidance_is_embedded_in_dev_and_absent_in_schnell(dev_pipe, schnell_pipe):
    assert (_render(dev_pipe, 1.0) != _render(dev_pipe, 3.5)).any()
    assert not schnell_pipe.transformer.config.guidance_embeds
    assert not hasattr(schnell_pipe.transformer.time_text_embed, "guidance_embedder")
    assert (_render(schnell_pipe, 1.0) == _render(schnell_pipe, 3.5)).all()  # schnell ignores guidance_scale
    config = schnell_pipe.scheduler.config
    assert {key: config[key] for key in T.SCHNELL_SCHEDULER} == T.SCHNELL_SCHEDULER


def test_dev_schedule_shifts_with_the_token_count(dev_pipe, schnell_pipe):
    """dev's sigmas depend on the image's token count (mu from calculate_shift); schnell's are the plain ones."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    plain = [1.0, 0.5]
    schnell_pipe.scheduler.set_timesteps(sigmas=plain)
    assert torch.allclose(schnell_pipe.scheduler.sigmas[:2], torch.tensor(plain))
    dev_pipe.scheduler.set_timesteps(sigmas=plain, mu=calculate_shift(64))
    shifted = dev_pipe.scheduler.sigmas[1].item()
    dev_pipe.scheduler.set_timesteps(sigmas=plain, mu=calculate_shift(4096))
    assert 0.5 < shifted < dev_pipe.scheduler.sigmas[1].item()


def test_blocks_are_double_then_single_stream():
    transformer = T._transformer(0, guidance=True)
    assert len(transformer.transformer_blocks) == T.NUM_LAYERS
    assert len(transformer.single_transformer_blocks) == T.NUM_SINGLE_LAYERS
    double = transformer.transformer_blocks[0].attn
    assert double.add_q_proj is not None and double.norm_added_q is not None  # text stream inside the block
    single = transformer.single_transformer_blocks[0]
    assert not hasattr(single.attn, "add_q_proj") and single.proj_mlp.out_features == 4 * T.HEADS * T.HEAD_DIM


def _state(parts: dict) -> dict[str, torch.Tensor]:
    return {f"{part}.{key}": value for part, module in parts.items() if isinstance(module, torch.nn.Module)
            for key, value in module.state_dict().items()}


def test_same_seed_gives_identical_weights_and_the_folder_holds_them(dev_pipe):
    first, again, other = (_state(T.tiny_flux_components(seed)) for seed in (0, 0, 1))
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["transformer.proj_out.weight"], other["transformer.proj_out.weight"])
    saved = _state({name: getattr(dev_pipe, name) for name in
                    ("transformer", "vae", "text_encoder", "text_encoder_2")})
    # the folder loads back exactly the seed-0 tensors, none missing, none re-initialised
    assert saved.keys() == first.keys()
    assert all(torch.equal(saved[k], first[k]) for k in first)


SHIPPED = Path(__file__).resolve().parents[1] / "trainer" / "models" / "configs"


@pytest.mark.parametrize("name, guidance, scheduler", [("flux1-dev", True, T.DEV_SCHEDULER),
                                                       ("flux1-schnell", False, T.SCHNELL_SCHEDULER)])
def test_shipped_flux_configs_build_the_released_sizes_on_meta(name, guidance, scheduler):
    """The shipped FLUX.1 configs (no weights) build a 19 + 38 block, 3072-wide transformer of ~11.9B parameters
    (BFL: "12B"), the guidance embedder only in dev, and carry the scheduler the tiny model copies."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    folder = SHIPPED / name
    with init_empty_weights():
        transformer = FluxTransformer2DModel.from_config(FluxTransformer2DModel.load_config(folder / "transformer"))
    assert (len(transformer.transformer_blocks), len(transformer.single_transformer_blocks)) == (19, 38)
    assert transformer.inner_dim == 3072 and transformer.config.in_channels == 4 * 16
    guidance_params = 10_229_760 if guidance else 0  # the guidance embedder: two linears, 256 -> 3072 -> 3072
    assert sum(p.numel() for p in transformer.parameters()) == 11_891_178_560 + guidance_params
    assert hasattr(transformer.time_text_embed, "guidance_embedder") == guidance
    vae = AutoencoderKL.load_config(folder / "vae")
    assert (vae["latent_channels"], vae["scaling_factor"], vae["shift_factor"]) == (
        T.LATENT_CHANNELS, T.FLUX_SCALING_FACTOR, T.FLUX_SHIFT_FACTOR)
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert {key: config[key] for key in scheduler} == scheduler
    index = json.loads((folder / "model_index.json").read_text())
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"] and index["_class_name"] == "FluxPipeline"
