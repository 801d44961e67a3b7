"""A tiny FLUX.2 klein pipeline (Flux2KleinPipeline: Qwen3 text encoder, Flux2Transformer2DModel, AutoencoderKLFlux2
with its batch-norm latent statistics) built from configs after a fixed seed, fully offline, diffusers-test style.

Widths follow what Flux2KleinPipeline needs (diffusers 0.42.1, pipelines/flux2/pipeline_flux2_klein.py):
- `_get_qwen3_prompt_embeds` (l. 208-263) stacks Qwen3's hidden states of layers (9, 18, 27) (hidden_states[0] is
  the embedding output), so the tiny Qwen3 has 28 layers and joint_attention_dim = 3 x its hidden width;
- it formats each prompt with the tokenizer's chat template (add_generation_prompt, enable_thinking=False) and pads
  to 512 tokens: the synthesized Qwen2 tokenizer carries a chat template that writes exactly Qwen3's text for one
  user message (see CHAT_TEMPLATE);
- `_patchify_latents` / `_pack_latents` (l. 371-398) fold each 2x2 latent patch into channels, so the transformer's
  in_channels = 4 x the VAE's latent channels, and the VAE's BatchNorm2d runs over those 4C channels
  (autoencoder_kl_flux2.py:133-139): its running mean and variance normalise the latents (l. 471-475, 911-916).
  The tiny VAE gets non-trivial statistics so that code skipping them fails here.
- the rotary embedding splits each head over axes_dims_rope (4 axes: t, h, w, l), summing to the head width.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from tiny import WORDS

QWEN_WIDTH, QWEN_LAYERS = 16, 28     # Qwen3-4B: 2560 wide, 36 layers; klein reads layers 9, 18 and 27
TEXT_LAYERS = (9, 18, 27)
HEADS, HEAD_DIM = 2, 16              # transformer inner dim 32 (klein 4B: 24 x 128)
AXES_DIMS_ROPE = (4, 4, 4, 4)        # (t, h, w, l), summing to HEAD_DIM; klein: (32, 32, 32, 32)
NUM_LAYERS, NUM_SINGLE_LAYERS = 2, 2  # klein 4B: 5 double-stream, 20 single-stream blocks
LATENT_CHANNELS = 8                  # klein's VAE: 32; patchified 2x2 -> 4 x 8 = 32 transformer channels
IMAGE_SIZE = 32                      # VAE x2 down, patchify x2 -> an 8x8 grid of 64 tokens

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
# Qwen3's chat template (its tokenizer_config.json) reduced to what Flux2KleinPipeline asks of it: one user message,
# add_generation_prompt=True, enable_thinking=False, which Qwen3's template renders as an empty think block.
CHAT_TEMPLATE = ("{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                 "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                 "{%- if enable_thinking is defined and enable_thinking is false %}"
                 "{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}")
# klein's released scheduler (FLUX.2-klein-4B scheduler/scheduler_config.json, as far as we know it: flow-match Euler,
# shift 3, dynamic shifting; the pipeline passes its own mu from compute_empirical_mu).
SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                 base_image_seq_len=256, max_image_seq_len=4096)


def _byte_level_bpe():
    """A byte-level BPE (GPT-2 / Qwen2 style: no end-of-word marker, a space is 'Ġ') whose merges spell WORDS, with
    and without a leading space, plus the special tokens the chat template writes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    merges = []
    for word in WORDS + ["Ġ" + w for w in WORDS] + ["user", "assistant"]:
        symbols = list(word)
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            symbols = [pair[0] + pair[1]] + symbols[2:]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


def make_tokenizer():
    """A Qwen2TokenizerFast over the synthesized BPE, padding with <|endoftext|> as Qwen3's does."""
    from transformers import Qwen2TokenizerFast
    tok = Qwen2TokenizerFast(tokenizer_object=_byte_level_bpe(), pad_token="<|endoftext|>", eos_token="<|im_end|>",
                             unk_token=None, bos_token=None, model_max_length=512)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _text_encoder(seed: int, vocab_size: int, pad_id: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(Qwen3Config(
        vocab_size=vocab_size, hidden_size=QWEN_WIDTH, intermediate_size=24, num_hidden_layers=QWEN_LAYERS,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=1024,
        tie_word_embeddings=True, pad_token_id=pad_id))


def _transformer(seed: int):
    from diffusers import Flux2Transformer2DModel
    torch.manual_seed(seed)
    model = Flux2Transformer2DModel(
        patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=NUM_LAYERS, num_single_layers=NUM_SINGLE_LAYERS,
        attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, joint_attention_dim=len(TEXT_LAYERS) * QWEN_WIDTH,
        timestep_guidance_channels=16, mlp_ratio=3.0, axes_dims_rope=AXES_DIMS_ROPE, guidance_embeds=False)
    # Every block's output is gated by the modulation of the timestep embedding (Flux2Modulation, bias-free). At
    # torch's default init the gates are ~0.05, so the blocks (where LoRA trains) barely reach the output and a
    # tiny run's loss hardly moves (1% in 30 steps, measured); a 10x timestep embedding gives gates of order 1, as
    # a trained model's are.
    with torch.no_grad():
        model.time_guidance_embed.timestep_embedder.linear_2.weight.mul_(10)
    return model


def _vae(seed: int):
    from diffusers import AutoencoderKLFlux2
    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(block_out_channels=(8, 16), latent_channels=LATENT_CHANNELS,
                             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                             layers_per_block=1, norm_num_groups=8, sample_size=IMAGE_SIZE)
    with torch.no_grad():  # released statistics are far from (0, 1); a test that ignores them must notice
        vae.bn.running_mean.uniform_(-0.5, 0.5)
        vae.bn.running_var.uniform_(0.25, 4.0)
    return vae.eval()


def tiny_klein_components(seed: int = 0) -> dict:
    """The keyword arguments of Flux2KleinPipeline at toy size (is_distilled False: the base model, with CFG)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    tokenizer = make_tokenizer()
    return {"transformer": _transformer(seed), "vae": _vae(seed),
            "text_encoder": _text_encoder(seed, len(tokenizer), tokenizer.pad_token_id), "tokenizer": tokenizer,
            "scheduler": FlowMatchEulerDiscreteScheduler(**SCHEDULER)}


def make_tiny_klein(folder: str | Path, seed: int = 0) -> Path:
    """Write the tiny components as a standard diffusers Flux2KleinPipeline folder (safetensors)."""
    from diffusers import Flux2KleinPipeline
    folder = Path(folder)
    Flux2KleinPipeline(**tiny_klein_components(seed)).save_pretrained(folder, safe_serialization=True)
    config = folder / "tokenizer" / "tokenizer_config.json"  # the chat template must survive the round trip
    if "chat_template" not in json.loads(config.read_text(encoding="utf-8")) and \
            not (folder / "tokenizer" / "chat_template.jinja").exists():
        (folder / "tokenizer" / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    return folder
