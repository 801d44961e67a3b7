"""Tiny SD-architecture components built from configs after a fixed seed (diffusers-test style), fully offline."""
from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = ["a", "an", "on", "the", "red", "green", "blue", "yellow", "purple", "orange", "white", "black", "circle",
         "square", "triangle", "star", "background", "photo", "of", "zqx", "sks", "dog", "cat", "style", "painting"]


def write_tokenizer(folder: str | Path) -> Path:
    """A valid CLIP BPE tokenizer: byte-level base vocab, merges that spell WORDS, CLIP's special tokens."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = list(_bytes_to_unicode().values())
    vocab = base + [b + "</w>" for b in base]
    merges = []
    for word in WORDS:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            merged = pair[0] + pair[1]
            if pair not in merges:
                merges.append(pair)
                if merged not in vocab:
                    vocab.append(merged)
            symbols = [merged] + symbols[2:]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                       encoding="utf-8")
    return folder


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table (the base of a byte-level BPE vocab)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_bpe(folder: Path, specials: list[str]) -> Path:
    """A byte-level BPE vocabulary (GPT-2/BART style) with no merges: every byte is a token."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = specials + [c for c in _bytes_to_unicode().values() if c not in specials]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return folder


def tiny_components(seed: int = 0, tokenizer_dir: str | Path | None = None) -> dict:
    """unet, vae, text_encoder, tokenizer, scheduler: the SD1.x layout at toy size."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    import tempfile
    with tempfile.TemporaryDirectory(prefix="tiny-tok-") as tmp:  # the tokenizer is read into memory
        tok_dir = write_tokenizer(tokenizer_dir or tmp)
        tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, norm_num_groups=32)
    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=4, norm_num_groups=32, sample_size=32)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=len(tokenizer) - 2, eos_token_id=len(tokenizer) - 1, pad_token_id=len(tokenizer) - 1,
        hidden_size=32, intermediate_size=37, layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=len(tokenizer), max_position_embeddings=77))
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False,
                              steps_offset=1, prediction_type="epsilon")
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "scheduler": scheduler}


def save_tiny_model(folder: str | Path, seed: int = 0) -> Path:
    """Write the tiny components as a standard diffusers StableDiffusionPipeline folder."""
    from diffusers import StableDiffusionPipeline

    folder = Path(folder)
    parts = tiny_components(seed)
    pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def make_images(folder: str | Path, n: int = 4, size: int = 32, caption: str | None = "a red square") -> Path:
    """n small PNGs of coloured squares with same-name .txt captions."""
    from PIL import Image, ImageDraw

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    colours = [(220, 30, 30), (30, 200, 40), (40, 60, 220), (230, 210, 30)]
    for i in range(n):
        img = Image.new("RGB", (size, size), (255, 255, 255))
        ImageDraw.Draw(img).rectangle([size // 4, size // 4, 3 * size // 4, 3 * size // 4], fill=colours[i % 4])
        img.save(folder / f"img{i}.png")
        if caption is not None:
            (folder / f"img{i}.txt").write_text(caption, encoding="utf-8")
    return folder


def tiny_sdxl_components(seed: int = 0) -> dict:
    """An SDXL-layout pipeline at toy size: two CLIP encoders (the second with a projection), a three-block UNet
    with SDXL's block types and layers_per_block (so kohya's original-layout names are SDXL's), text_time added
    conditioning."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    import tempfile
    with tempfile.TemporaryDirectory(prefix="tiny-tok-") as tmp:
        tok_dir = write_tokenizer(tmp)
        tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77)
        tokenizer_2 = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77,
                                    pad_token="!")

    def clip(hidden: int, **extra) -> CLIPTextConfig:
        return CLIPTextConfig(bos_token_id=len(tokenizer) - 2, eos_token_id=len(tokenizer) - 1,
                              pad_token_id=len(tokenizer) - 1, hidden_size=hidden, intermediate_size=37,
                              layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=3,
                              vocab_size=len(tokenizer), max_position_embeddings=77, hidden_act="gelu", **extra)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(clip(32))
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(clip(40, projection_dim=16))
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64, 64), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 4), cross_attention_dim=72, norm_num_groups=32, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 16)
    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=4, norm_num_groups=32, sample_size=32)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, steps_offset=1, prediction_type="epsilon",
                                       timestep_spacing="leading")
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2,
            "tokenizer": tokenizer, "tokenizer_2": tokenizer_2, "scheduler": scheduler}


def save_tiny_sdxl(folder: str | Path, seed: int = 0) -> Path:
    """The tiny SDXL components as a standard diffusers StableDiffusionXLPipeline folder."""
    from diffusers import StableDiffusionXLPipeline
    folder = Path(folder)
    StableDiffusionXLPipeline(**tiny_sdxl_components(seed), add_watermarker=False).save_pretrained(
        folder, safe_serialization=True)
    return folder


def save_tiny_sd2(folder: str | Path, seed: int = 0, prediction: str = "v_prediction") -> Path:
    """An SD 2.x-layout pipeline at toy size: SD's UNet blocks with linear projections, reading a 1024-wide
    OpenCLIP-style text encoder (gelu), as a diffusers StableDiffusionPipeline folder."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    import tempfile
    with tempfile.TemporaryDirectory(prefix="tiny-tok-") as tmp:
        tok_dir = write_tokenizer(tmp)
        tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77,
                                  pad_token="!")
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=len(tokenizer) - 2, eos_token_id=len(tokenizer) - 1, pad_token_id=0, hidden_size=1024,
        intermediate_size=64, num_attention_heads=16, num_hidden_layers=2, vocab_size=len(tokenizer),
        max_position_embeddings=77, hidden_act="gelu"))
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=1024, attention_head_dim=(2, 4), norm_num_groups=32, use_linear_projection=True)
    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=4, norm_num_groups=32, sample_size=32)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              num_train_timesteps=1000, steps_offset=1, prediction_type=prediction)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(Path(folder), safe_serialization=True)
    return Path(folder)


def wait_for(predicate, timeout: float = 180.0, what: str = "condition"):
    """predicate()'s first true value, polled; an AssertionError naming `what` after `timeout` seconds."""
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def train_transformer_cli(model, root: Path, name: str, *extra: str, steps: int, save_every: int) -> Path:
    """A CLI run on a tiny transformer model (SD 3.5, FLUX): 4 images at 32 px, batch 2, rank 4 / alpha 2, T5 at
    16 tokens, fp32 files, a checkpoint every `save_every` steps, no samples; `extra` overrides. Its run folder."""
    from trainer.__main__ import main
    data = make_images(Path(root) / "data", n=4, size=48)
    sets = [f"model.path={model}", f"dataset.path={data}", "dataset.resolution=32", "dataset.batch_size=2",
            f"schedule.max_steps={steps}", "schedule.lr_scheduler=constant", "optimizer.unet_lr=3e-3",
            "optimizer.text_encoder_lr=2e-3", "model.t5_length=16", "network.rank=4", "network.alpha=2",
            f"saving.runs_dir={Path(root) / 'runs'}", f"run.name={name}", "saving.dtype=fp32",
            f"saving.every_n_steps={save_every}", "sampling.every_n_steps=0", *extra]
    assert main(["train", "--quiet", *[x for s in sets for x in ("--set", s)]]) == 0
    run_dir, = (Path(root) / "runs").iterdir()
    return run_dir


def hand_merged(model_dir, adapter) -> torch.nn.Module:
    """The base model's denoiser with W + (alpha/r) B A written into each adapted weight by hand (its lora_unet_
    layers, named by their diffusers paths)."""
    from trainer.models import load_base_model
    base = load_base_model(str(model_dir))
    modules = dict(base.denoiser.named_modules())
    for name, layer in adapter.layers.items():
        if name.startswith("lora_unet_"):
            path = next(p for p in modules if "lora_unet_" + p.replace(".", "_") == name)
            with torch.no_grad():
                modules[path].weight += (layer.alpha / layer.rank) * (layer.up @ layer.down)
    return base.denoiser
