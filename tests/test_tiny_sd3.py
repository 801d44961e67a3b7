"""The tiny SD3.5 test model (tests/tiny_sd3.py): a real StableDiffusion3Pipeline folder that diffusers loads
offline and renders from, with SD3's text layout, a working T5 tokenizer, dual attention on demand and
seed-determined weights."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import tiny_sd3 as T
from tiny import WORDS


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory) -> Path:
    return T.make_tiny_sd3(tmp_path_factory.mktemp("tiny-sd3"))


@pytest.fixture(scope="module")
def sd3_pipe(sd3_dir):
    from diffusers import StableDiffusion3Pipeline
    return StableDiffusion3Pipeline.from_pretrained(sd3_dir)


def test_folder_loads_offline_and_renders_two_steps(sd3_dir, no_network):
    from diffusers import StableDiffusion3Pipeline
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_dir)
    image = pipe("a red square", negative_prompt="a blue circle", num_inference_steps=2, max_sequence_length=16,
                 guidance_scale=4.0, generator=torch.Generator().manual_seed(0), output_type="np").images
    # the native size is sample_size x the VAE's x2 downsampling
    assert image.shape == (1, 2 * T.SAMPLE_SIZE, 2 * T.SAMPLE_SIZE, 3)
    assert torch.isfinite(torch.from_numpy(image)).all() and image.std() > 0
    assert no_network == []


def test_folder_has_sd3_component_settings(sd3_dir, sd3_pipe):
    vae, scheduler = sd3_pipe.vae.config, sd3_pipe.scheduler
    assert (vae.latent_channels, vae.scaling_factor, vae.shift_factor) == (16, 1.5305, 0.0609)
    assert not vae.use_quant_conv and not vae.use_post_quant_conv
    assert type(scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and scheduler.config.shift == 3.0
    assert sd3_pipe.vae_scale_factor == 2
    assert sum(f.stat().st_size for f in sd3_dir.rglob("*") if f.is_file()) < 2 * 2**20


def test_prompt_embeddings_follow_sd3s_joint_layout(sd3_pipe):
    """CLIP-L ++ CLIP-G penultimate states, zero-padded to T5's width, then T5's states along the sequence."""
    embeds, _, pooled, _ = sd3_pipe.encode_prompt("a red square", "a red square", "a red square",
                                                  do_classifier_free_guidance=False, max_sequence_length=16)
    clip_len = sd3_pipe.tokenizer.model_max_length
    assert embeds.shape == (1, clip_len + 16, T.T5_WIDTH)
    assert pooled.shape == (1, T.CLIP_L_PROJ + T.CLIP_G_PROJ)
    clip_width = T.CLIP_L_WIDTH + T.CLIP_G_WIDTH
    assert embeds[:, :clip_len, clip_width:].abs().max() == 0  # the padding really happens
    assert embeds[:, :clip_len, :clip_width].abs().max() > 0 and embeds[:, clip_len:].abs().max() > 0


def test_t5_tokenizer_round_trips_the_demo_words(sd3_dir):
    from transformers import T5TokenizerFast
    tok = T5TokenizerFast.from_pretrained(sd3_dir / "tokenizer_3")
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    sentence = " ".join(WORDS)
    ids = tok(sentence).input_ids
    assert len(ids) == len(WORDS) + 1 and ids[-1] == tok.eos_token_id  # one piece a word, then </s>
    assert tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == sentence
    # a word outside the vocabulary is spelled with letter pieces, not lost to <unk>
    ids = tok("a zebra").input_ids
    assert tok.unk_token_id not in ids and tok.decode(ids, skip_special_tokens=True) == "a zebra"
    padded = tok("a dog", padding="max_length", max_length=8).input_ids
    assert padded[3:] == [tok.pad_token_id] * 5


@pytest.mark.parametrize("dual", [True, False])
def test_dual_attention_puts_attn2_in_block_0_only(dual):
    blocks = T._transformer(0, dual_attention=dual).transformer_blocks
    assert len(blocks) == T.NUM_LAYERS
    assert [hasattr(b, "attn2") and b.attn2 is not None for b in blocks] == [dual] + [False] * (T.NUM_LAYERS - 1)
    assert blocks[-1].context_pre_only and not blocks[0].context_pre_only
    assert blocks[0].attn.norm_q is not None  # qk rms-norm, as SD 3.5


def _state(parts: dict) -> dict[str, torch.Tensor]:
    return {f"{part}.{key}": value for part, module in parts.items() if isinstance(module, torch.nn.Module)
            for key, value in module.state_dict().items()}


def test_same_seed_gives_identical_weights_and_the_folder_holds_them(sd3_pipe):
    first, again, other = (_state(T.tiny_sd3_components(seed)) for seed in (0, 0, 1))
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["transformer.proj_out.weight"], other["transformer.proj_out.weight"])
    saved = _state({name: getattr(sd3_pipe, name) for name in
                    ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")})
    # the folder loads back exactly the seed-0 tensors, none missing, none re-initialised
    assert saved.keys() == first.keys()
    assert all(torch.equal(saved[k], first[k]) for k in first)
