"""A tiny FLUX.1-layout pipeline (double- and single-stream blocks, CLIP-L pooled + T5 states, 16-channel VAE
packed 2x2 into 64 transformer channels, dynamically shifted rectified-flow scheduler) built from configs after a
fixed seed, fully offline, diffusers-test style.

Widths are chosen so that FluxPipeline's own prompt encoding and latent packing fit (diffusers 0.42.1,
pipelines/flux/pipeline_flux.py):
- `_get_clip_prompt_embeds` (l. 267-310) takes CLIPTextModel's `pooler_output` unprojected, so
  pooled_projection_dim = CLIP-L's hidden width (768 in FLUX.1);
- `_get_t5_prompt_embeds` (l. 217-265) gives T5's last hidden state, the only sequence the transformer sees, so
  joint_attention_dim = T5 d_model (4096);
- `prepare_latents` / `_pack_latents` (l. 522-575) fold each 2x2 latent patch into the channel axis, so
  in_channels = 4 x the VAE's latent channels (64 = 4 x 16), and `__call__` (l. 810) reads it back as
  `in_channels // 4`;
- the transformer's rotary embedding splits each head over `axes_dims_rope`, so their sum = attention_head_dim.
The three widths (CLIP 32, T5 40, transformer 16) differ on purpose, so code that confuses them fails here.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from tiny import write_tokenizer
from tiny_sd3 import _drop_empty_extra_special_tokens, write_t5_tokenizer

# The sizes below, in one place, so tests can assert against them.
CLIP_WIDTH = 32                     # CLIP-L stand-in; its pooler output is FLUX's pooled vector
T5_WIDTH = 40                       # T5 stand-in; FLUX's joint_attention_dim
HEADS, HEAD_DIM = 2, 8              # transformer inner dim 16 (FLUX.1: 24 x 128 = 3072)
AXES_DIMS_ROPE = (4, 2, 2)          # (index, height, width), summing to HEAD_DIM; FLUX.1: (16, 56, 56), h == w
NUM_LAYERS, NUM_SINGLE_LAYERS = 2, 2  # FLUX.1: 19 double-stream, 38 single-stream blocks
LATENT_CHANNELS = 16                # as FLUX.1's VAE; packed 2x2 -> 64 transformer channels
IMAGE_SIZE = 32                     # native side in px: VAE x2 down, packing x2 -> an 8x8 grid of 64 tokens
T5_MAX_LENGTH = 512                 # T5-XXL's model_max_length in FLUX's tokenizer_2

# FLUX.1's VAE latent statistics (BFL flux src/flux/util.py AutoEncoderParams scale_factor / shift_factor).
FLUX_SCALING_FACTOR, FLUX_SHIFT_FACTOR = 0.3611, 0.1159

# The two released scheduler configs (see trainer/models/configs/SOURCES-flux.md): dev shifts the schedule by the
# image's token count (BFL sampling.get_schedule, shift=True); schnell, step-distilled, is sampled unshifted.
DEV_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                     max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
SCHNELL_SCHEDULER = {**DEV_SCHEDULER, "shift": 1.0, "use_dynamic_shifting": False}


def _tokenizers():
    """FLUX's CLIP-L tokenizer pads with <|endoftext|> (its tokenizer/ config); T5 is synthesized offline."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    with tempfile.TemporaryDirectory(prefix="tiny-tok-") as tmp:  # read into memory before the folder goes
        tok_dir = write_tokenizer(Path(tmp) / "clip")
        clip = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77)
        t5 = T5TokenizerFast.from_pretrained(write_t5_tokenizer(Path(tmp) / "t5"))
    return clip, t5


def _text_encoders(seed: int, vocab_size: int, t5_vocab_size: int):
    """CLIP-L without projection (FLUX's text_encoder is a CLIPTextModel) and an encoder-only T5 v1.1."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
        hidden_size=CLIP_WIDTH, intermediate_size=37, layer_norm_eps=1e-05, num_attention_heads=4,
        num_hidden_layers=2, vocab_size=vocab_size, max_position_embeddings=77, hidden_act="quick_gelu"))
    torch.manual_seed(seed + 1)
    # gated-gelu + untied embeddings: T5 v1.1 / T5-XXL as shipped in FLUX's text_encoder_2.
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=t5_vocab_size, d_model=T5_WIDTH, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    return text_encoder, text_encoder_2


def _transformer(seed: int, guidance: bool):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=NUM_LAYERS, num_single_layers=NUM_SINGLE_LAYERS,
        attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, joint_attention_dim=T5_WIDTH,
        pooled_projection_dim=CLIP_WIDTH, guidance_embeds=guidance, axes_dims_rope=AXES_DIMS_ROPE)


def _vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    # FLUX's autoencoder has no quant_conv / post_quant_conv (its vae/config.json sets both false).
    return AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=8, sample_size=IMAGE_SIZE,
                         scaling_factor=FLUX_SCALING_FACTOR, shift_factor=FLUX_SHIFT_FACTOR,
                         use_quant_conv=False, use_post_quant_conv=False)


def tiny_flux_components(seed: int = 0, *, guidance: bool = True) -> dict:
    """The keyword arguments of FluxPipeline (without the optional IP-Adapter image encoder) at toy size.
    guidance=True is FLUX.1-dev's layout (guidance embedding, shifted schedule), False FLUX.1-schnell's."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    tokenizer, tokenizer_2 = _tokenizers()
    text_encoder, text_encoder_2 = _text_encoders(seed, len(tokenizer), len(tokenizer_2))
    scheduler = FlowMatchEulerDiscreteScheduler(**(DEV_SCHEDULER if guidance else SCHNELL_SCHEDULER))
    return {"transformer": _transformer(seed, guidance), "vae": _vae(seed),
            "text_encoder": text_encoder, "text_encoder_2": text_encoder_2,
            "tokenizer": tokenizer, "tokenizer_2": tokenizer_2, "scheduler": scheduler}


def make_tiny_flux(folder: str | Path, seed: int = 0, *, guidance: bool = True) -> Path:
    """Write the tiny components as a standard diffusers FluxPipeline folder (safetensors)."""
    from diffusers import FluxPipeline

    folder = Path(folder)
    pipe = FluxPipeline(**tiny_flux_components(seed, guidance=guidance))
    pipe.save_pretrained(folder, safe_serialization=True)
    _name_fast_t5_tokenizer(folder / "model_index.json")
    _drop_empty_extra_special_tokens(folder / "tokenizer_2" / "tokenizer_config.json")
    return folder


def _name_fast_t5_tokenizer(index_file: Path) -> None:
    """transformers 5 saves tokenizer_2 as "T5Tokenizer"; under 4.x that name is the SentencePiece class, which
    needs a spiece.model this folder lacks. The released FLUX.1 folders name "T5TokenizerFast" (as
    tests/tiny_sd3.py does for SD3's tokenizer_3). The null optional components (image_encoder,
    feature_extractor) that save_pretrained records are dropped, as in the released model_index.json."""
    index = json.loads(index_file.read_text(encoding="utf-8"))
    index["tokenizer_2"] = ["transformers", "T5TokenizerFast"]
    for name in ("image_encoder", "feature_extractor"):
        if index.get(name) in ([None, None], None):
            index.pop(name, None)
    index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_bfl_files(base, dest: Path) -> dict:
    """A loaded tiny FLUX (trainer BaseModel) as BFL's separate files, as ComfyUI users keep them: transformer (BFL
    names), ae, clip_l, t5xxl .safetensors in `dest`; the model options that name the last three (T5 at 16 tokens)."""
    from safetensors.torch import save_file

    from trainer.adapters.original_layout import vae_to_original
    from trainer.models.flux_layout import transformer_to_original
    from trainer.models.sd3_bake import clip_to_original, t5_to_original
    files = {"transformer": transformer_to_original(base.denoiser.state_dict(), base.denoiser.config),
             "ae": vae_to_original(base.vae.state_dict()),
             "clip_l": clip_to_original(base.text_encoders["lora_te1"].state_dict()),
             "t5xxl": t5_to_original(base.text_encoders["lora_te3"].state_dict())}
    for name, state in files.items():
        save_file({k: v.clone().contiguous() for k, v in state.items()}, str(Path(dest) / f"{name}.safetensors"))
    return {"vae_path": str(Path(dest) / "ae.safetensors"), "clip_l_path": str(Path(dest) / "clip_l.safetensors"),
            "t5_path": str(Path(dest) / "t5xxl.safetensors"), "t5_length": 16}
