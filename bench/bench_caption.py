#!/usr/bin/env python
"""Benchmark: captioning speed (images/s) on this machine's CPU for the smallest real-architecture captioners.

Each model is built from its real configuration with random weights (seed 0) and saved to a temporary folder with
a synthesized byte-level tokenizer, then run through loradesk's own captioner (trainer.caption.load_captioner), so
preprocessing, batching and decoding are counted. Random weights never stop early nor run on by chance: each
caption is forced to a fixed number of new tokens, about a real caption's length (stated in the table).

- Florence-2 base: DaViT (depths 1-1-9-1, 128..1024 wide) at 768 px + BART 6+6 layers, d_model 768 (the
  florence-community/Florence-2-base configuration), <DETAILED_CAPTION>, 3 beams as its model card, 48 tokens;
- BLIP base: ViT-B/16 at 384 px + BERT-base decoder (Salesforce/blip-image-captioning-base), greedy, 20 tokens;
- WD tagger: a ViT-B/16 at 448 px with a 10,861-tag sigmoid head exported to ONNX (wd-vit-tagger-v3's shape),
  run by onnxruntime on the CPU.

    python bench/bench_caption.py                 # all three: a few minutes on 2 shared CPU cores
    python bench/bench_caption.py --only tagger --images 16 --batch-size 8
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

WD_TAGS = 10861  # wd-vit-tagger-v3's selected_tags.csv rows


def build_florence2_base(folder: Path) -> Path:
    from transformers import (BartTokenizer, CLIPImageProcessor, Florence2Config, Florence2ForConditionalGeneration,
                              Florence2Processor)
    from tiny import byte_bpe
    tok_dir = byte_bpe(folder / "bpe", ["<s>", "<pad>", "</s>", "<unk>"])
    tok = BartTokenizer(vocab=str(tok_dir / "vocab.json"), merges=str(tok_dir / "merges.txt"),
                        extra_special_tokens={"image_token": "<image>"})
    images = CLIPImageProcessor(size={"height": 768, "width": 768}, crop_size={"height": 768, "width": 768},
                                do_center_crop=False)
    images.image_seq_length = 577  # (768 / 32)^2 + 1
    text = dict(model_type="bart", vocab_size=51289, max_position_embeddings=1024, encoder_layers=6,
                decoder_layers=6, encoder_ffn_dim=3072, decoder_ffn_dim=3072, encoder_attention_heads=12,
                decoder_attention_heads=12, d_model=768, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id, decoder_start_token_id=tok.eos_token_id)
    vision = dict(depths=[1, 1, 9, 1], embed_dim=[128, 256, 512, 1024], num_heads=[4, 8, 16, 32],
                  num_groups=[4, 8, 16, 32], window_size=12, projection_dim=768)
    torch.manual_seed(0)
    model = Florence2ForConditionalGeneration(Florence2Config(text_config=text, vision_config=vision,
                                                              image_token_id=tok.image_token_id))
    model.save_pretrained(folder)
    Florence2Processor(image_processor=images, tokenizer=tok).save_pretrained(folder)
    return folder


def build_blip_base(folder: Path) -> Path:
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a"]) + "\n")
    tok = BertTokenizer(str(folder / "vocab.txt"), bos_token="[DEC]")
    text = dict(vocab_size=30524, bos_token_id=tok.bos_token_id, sep_token_id=tok.sep_token_id,
                pad_token_id=tok.pad_token_id)  # the rest: BlipTextConfig's defaults, BERT-base
    vision = dict(image_size=384, patch_size=16)  # BlipVisionConfig's defaults: ViT-B
    torch.manual_seed(0)
    BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision)).save_pretrained(folder)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 384, "width": 384}), tokenizer=tok) \
        .save_pretrained(folder)
    (folder / "vocab.txt").unlink()
    return folder


def build_wd_tagger(folder: Path) -> Path:
    from transformers import ViTConfig, ViTModel

    class Tagger(torch.nn.Module):  # NHWC BGR 0..255 in, sigmoid scores out: the WD taggers' interface
        def __init__(self):
            super().__init__()
            self.vit = ViTModel(ViTConfig(image_size=448, patch_size=16), add_pooling_layer=False)
            self.head = torch.nn.Linear(768, WD_TAGS)

        def forward(self, x):
            hidden = self.vit(pixel_values=x.permute(0, 3, 1, 2) / 255.0).last_hidden_state
            return torch.sigmoid(self.head(hidden[:, 0]))

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = Tagger().eval()
    torch.onnx.export(model, (torch.rand(1, 448, 448, 3) * 255,), str(folder / "model.onnx"), dynamo=False,
                      input_names=["input_1"], output_names=["predictions_sigmoid"],
                      dynamic_axes={"input_1": {0: "N"}, "predictions_sigmoid": {0: "N"}}, opset_version=17)
    cats = ["9"] * 4 + ["0"] * (WD_TAGS - 4 - 2000) + ["4"] * 2000
    rows = ["tag_id,name,category,count"] + [f"{i},tag_{i},{c},1" for i, c in enumerate(cats)]
    (folder / "selected_tags.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder


def make_images(folder: Path, n: int) -> Path:
    import numpy as np
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):  # a usual training-image size, not the models' input size: resizing is part of the work
        Image.fromarray(rng.integers(0, 255, (768, 1024, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return folder


def force_length(captioner, tokens: int) -> None:
    if hasattr(captioner, "model"):
        captioner.max_new_tokens = tokens
        captioner.model.generation_config.min_new_tokens = tokens


def measure(name, build, data: Path, tmp: Path, batch_size: int, tokens: int | None) -> dict:
    from trainer import CaptionOptions, load_captioner, preview_captions
    folder = build(tmp / name)
    start = time.perf_counter()
    captioner = load_captioner(str(folder), CaptionOptions(device="cpu"))
    load_s = time.perf_counter() - start
    if tokens:
        force_length(captioner, tokens)
    options = CaptionOptions(batch_size=batch_size)
    preview_captions(data, captioner, n=1, options=options)  # warm-up: first-call allocations
    n = len(list(data.glob("*.png")))
    done = []  # images through the model (a random-weight caption can decode to nothing and be skipped)
    start = time.perf_counter()
    preview_captions(data, captioner, n=n, options=options, progress=lambda d, total: done.append(d))
    seconds = time.perf_counter() - start
    params = sum(p.numel() for p in captioner.model.parameters()) if hasattr(captioner, "model") else None
    return {"model": name, "params": params, "load_s": load_s, "images": done[-1] if done else 0, "seconds": seconds,
            "tokens": tokens}


MODELS = {"florence2-base": (build_florence2_base, 48), "blip-base": (build_blip_base, 20),
          "tagger": (build_wd_tagger, None)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--only", choices=list(MODELS), action="append")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-caption-") as tmp:
        data = make_images(Path(tmp) / "data", args.images)
        for name in args.only or MODELS:
            build, tokens = MODELS[name]
            rows.append(measure(name, build, data, Path(tmp), args.batch_size, tokens))
            print(f"{name}: done", file=sys.stderr, flush=True)
    print(f"\nCPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
          f"{torch.get_num_threads()}; batch {args.batch_size}; images 1024x768\n")
    print("| captioner (random weights, real config) | parameters | load s | tokens/caption | images/s | s/image |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        params = f"{r['params'] / 1e6:.0f} M" if r["params"] else "ViT-B/16 448 (ONNX)"
        print(f"| {r['model']} | {params} | {r['load_s']:.1f} | {r['tokens'] or 'tags'} | "
              f"{r['images'] / r['seconds']:.2f} | {r['seconds'] / max(r['images'], 1):.2f} |")


if __name__ == "__main__":
    main()
