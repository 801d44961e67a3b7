"""A tiny Stable Diffusion 3.5-layout pipeline (MMDiT + three text encoders + 16-channel VAE + rectified-flow
scheduler) built from configs after a fixed seed, fully offline, diffusers-test style.

Widths are chosen so that StableDiffusion3Pipeline's own prompt encoding fits (diffusers 0.42.1,
pipelines/stable_diffusion_3/pipeline_stable_diffusion_3.py):
- `_get_clip_prompt_embeds` (l. 289-342) takes each CLIP's penultimate hidden state and its `text_embeds`;
- `encode_prompt` (l. 450-464) concatenates the CLIP-L and CLIP-G states on the feature axis, zero-pads them to the
  T5 width and concatenates them with T5's states on the sequence axis, so joint_attention_dim = T5 d_model >=
  CLIP-L width + CLIP-G width; pooled = CLIP-L text_embeds ++ CLIP-G text_embeds, so pooled_projection_dim =
  projection_dim_L + projection_dim_G.
CLIP-G's projection width differs from its hidden width on purpose (the real model has them equal), so code that
confuses a CLIP's hidden width with its pooled width fails here instead of passing by coincidence. CLIP-L's
projection is an identity, as in SAI's SD3 (it pools CLIP-L unprojected: ComfyUI's SD3 text model and diffusers'
single-file reader both take it so).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from tiny import WORDS, write_tokenizer

# The sizes below, in one place, so tests can assert against them.
CLIP_L_WIDTH, CLIP_L_PROJ = 32, 32
CLIP_G_WIDTH, CLIP_G_PROJ = 48, 40
T5_WIDTH = 96                       # > 32 + 48, so the CLIP states really get zero-padded as in SD3 (2048 -> 4096)
HEADS, HEAD_DIM = 2, 8              # inner dim 16 = caption_projection_dim
NUM_LAYERS = 3                      # block 0 dual-attention, block 1 plain, block 2 context_pre_only (the last)
SAMPLE_SIZE = 8                     # latent side; the VAE downsamples x2, so the native image side is 16 px
T5_MAX_LENGTH = 512                 # T5-XXL's model_max_length in SD3's tokenizer_3

# SD3's VAE latent statistics, from the SD3 / SD3.5 vae/config.json (which also sets use_quant_conv and
# use_post_quant_conv false). diffusers' own SD3 tests use 1.5035, a digit swap; 1.5305 is the released value.
SD3_SCALING_FACTOR, SD3_SHIFT_FACTOR = 1.5305, 0.0609


def write_t5_tokenizer(folder: str | Path) -> Path:
    """A T5 (SentencePiece Unigram) tokenizer synthesized offline: T5's special ids pad=0, eos=1, unk=2, a piece
    "▁word" per demo word and single letters as a fallback, so unknown words still split into known pieces."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import T5TokenizerFast

    # Unigram keeps the segmentation with the best total score: one whole-word piece (-2) beats spelling it out
    # with letters (-5 each), as SentencePiece's learned scores would.
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    vocab += [("▁" + word, -2.0) for word in WORDS]
    vocab += [(letter, -5.0) for letter in "abcdefghijklmnopqrstuvwxyz"]
    model = Tokenizer(Unigram(vocab, unk_id=2, byte_fallback=False))
    # The pre-tokenizer, decoder and "$A </s>" template are what transformers' own T5 converter builds
    # (transformers 5.25 models/t5/tokenization_t5.py, T5Tokenizer.__init__).
    model.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)])
    model.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    model.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                         special_tokens=[("</s>", 1)])
    # extra_ids=0: T5's 100 sentinel tokens are for span corruption, which an encoder-only text path never uses.
    tokenizer = T5TokenizerFast(tokenizer_object=model, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                                extra_ids=0, model_max_length=T5_MAX_LENGTH)
    folder = Path(folder)
    tokenizer.save_pretrained(folder)
    _drop_empty_extra_special_tokens(folder / "tokenizer_config.json")
    return folder


def _drop_empty_extra_special_tokens(config_file: Path) -> None:
    """transformers 5 writes `"extra_special_tokens": []`; 4.x (which pyproject allows) reads that key as a dict
    and fails on a list, so an empty one is left out. Also drops the load-time flags 5.x echoes back on a re-save."""
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if config.get("extra_special_tokens") in ([], {}):
        del config["extra_special_tokens"]
    for key in ("is_local", "local_files_only"):
        config.pop(key, None)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _clip_tokenizers():
    """CLIP-L's tokenizer pads with <|endoftext|>, CLIP-G's with "!" (as in the SD3 / SDXL releases)."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="tiny-tok-") as tmp:  # read into memory before the folder goes
        tok_dir = write_tokenizer(tmp)
        files = (str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"))
        return (CLIPTokenizer(*files, model_max_length=77),
                CLIPTokenizer(*files, model_max_length=77, pad_token="!"))


def _t5_tokenizer():
    from transformers import T5TokenizerFast

    with tempfile.TemporaryDirectory(prefix="tiny-t5tok-") as tmp:
        return T5TokenizerFast.from_pretrained(write_t5_tokenizer(tmp))


def _text_encoders(seed: int, vocab_size: int, t5_vocab_size: int):
    """CLIP-L and CLIP-G stand-ins (both with projections: SD3 pools both) and an encoder-only T5 v1.1."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    def clip(hidden: int, projection: int) -> CLIPTextConfig:
        return CLIPTextConfig(bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
                              hidden_size=hidden, intermediate_size=37, projection_dim=projection,
                              layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=2,
                              vocab_size=vocab_size, max_position_embeddings=77, hidden_act="gelu")
    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(clip(CLIP_L_WIDTH, CLIP_L_PROJ))
    with torch.no_grad():  # SAI's CLIP-L pools unprojected
        text_encoder.text_projection.weight.copy_(torch.eye(CLIP_L_PROJ))
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(clip(CLIP_G_WIDTH, CLIP_G_PROJ))
    torch.manual_seed(seed + 2)
    # gated-gelu + untied embeddings: T5 v1.1 / T5-XXL as shipped in SD3's text_encoder_3.
    text_encoder_3 = T5EncoderModel(T5Config(
        vocab_size=t5_vocab_size, d_model=T5_WIDTH, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    return text_encoder, text_encoder_2, text_encoder_3


def _transformer(seed: int, dual_attention: bool):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=SAMPLE_SIZE, patch_size=2, in_channels=16, out_channels=16, num_layers=NUM_LAYERS,
        attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, joint_attention_dim=T5_WIDTH,
        caption_projection_dim=HEADS * HEAD_DIM, pooled_projection_dim=CLIP_L_PROJ + CLIP_G_PROJ,
        # 16 patches a side covers images up to 64 px; the default 96 would store a 96x96 table (0.6 MB here).
        pos_embed_max_size=16,
        dual_attention_layers=(0,) if dual_attention else (), qk_norm="rms_norm")


def _vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    # SD3's VAE has no quant_conv / post_quant_conv (its vae/config.json sets both false).
    return AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=16,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=8, sample_size=SAMPLE_SIZE * 2,
                         scaling_factor=SD3_SCALING_FACTOR, shift_factor=SD3_SHIFT_FACTOR,
                         use_quant_conv=False, use_post_quant_conv=False)


def tiny_sd3_components(seed: int = 0, *, dual_attention: bool = True) -> dict:
    """The keyword arguments of StableDiffusion3Pipeline (without the optional image encoder) at toy size."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    tokenizer, tokenizer_2 = _clip_tokenizers()
    tokenizer_3 = _t5_tokenizer()
    text_encoder, text_encoder_2, text_encoder_3 = _text_encoders(seed, len(tokenizer), len(tokenizer_3))
    return {"transformer": _transformer(seed, dual_attention), "vae": _vae(seed),
            "text_encoder": text_encoder, "text_encoder_2": text_encoder_2, "text_encoder_3": text_encoder_3,
            "tokenizer": tokenizer, "tokenizer_2": tokenizer_2, "tokenizer_3": tokenizer_3,
            # shift 3.0 = SD3's scheduler/scheduler_config.json
            "scheduler": FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)}


def make_tiny_sd3(folder: str | Path, seed: int = 0, *, dual_attention: bool = True) -> Path:
    """Write the tiny components as a standard diffusers StableDiffusion3Pipeline folder (safetensors)."""
    from diffusers import StableDiffusion3Pipeline

    folder = Path(folder)
    pipe = StableDiffusion3Pipeline(**tiny_sd3_components(seed, dual_attention=dual_attention))
    pipe.save_pretrained(folder, safe_serialization=True)
    _name_fast_t5_tokenizer(folder / "model_index.json")
    _drop_empty_extra_special_tokens(folder / "tokenizer_3" / "tokenizer_config.json")
    return folder


def _name_fast_t5_tokenizer(index_file: Path) -> None:
    """transformers 5 saves tokenizer_3 as "T5Tokenizer" (its only T5 tokenizer); under 4.x that name is the
    SentencePiece one, which needs a spiece.model this folder lacks. The released SD3 folders name
    "T5TokenizerFast", which both versions load from tokenizer.json (5.x keeps it as an alias)."""
    index = json.loads(index_file.read_text(encoding="utf-8"))
    index["tokenizer_3"] = ["transformers", "T5TokenizerFast"]
    index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
