#!/usr/bin/env python
"""Build loradesk's offline tiny Stable Diffusion base model from scratch.

No model hub is reachable from where loradesk is built and tested, so the project ships its own tiny model with
the Stable Diffusion 1.x architecture (AutoencoderKL + CLIPTextModel/CLIPTokenizer + UNet2DConditionModel with
cross-attention), trained on the procedural world of ``trainer/tinyworld.py`` (captioned 64x64 images of
coloured shapes). The result is a standard diffusers folder that ``StableDiffusionPipeline.from_pretrained``
loads unchanged; LoRA target module names are the same as SD 1.5's.

Stages (all seeded; the same seed and steps give the same weights on the same torch build):

1. tokenizer: a CLIP-format byte-level BPE (``vocab.json`` + ``merges.txt``) learnt on the world's words;
2. VAE: ``AutoencoderKL`` with a downsampling factor of 4 (64x64 RGB -> 4x16x16 latents), trained on freshly
   generated images with an L1 + MSE reconstruction loss and a tiny KL term;
3. latent cache: a fixed set of generated images encoded once (mean and std of the posterior are stored, a
   fresh latent is sampled from them at every use);
4. UNet + text encoder, trained jointly: epsilon prediction with SD's scaled_linear betas, offset noise (so the
   model cannot read the colours out of the starting noise), the epsilon loss weighted by min(1/alpha_bar, 50)
   (without it the tiny UNet ignored the caption), AdamW with warmup + cosine decay, 10% caption dropout for
   classifier-free guidance, EMA of the weights (the saved weights); captions in the world's one phrasing
   (``--varied-captions`` adds others and unknown filler words: measured worse, see the model card);
5. evaluation with the plain pipeline (the same prompts and seeds as ``tests/test_tiny_base_quality.py``) and save.

Usage::

    python tools/build_tiny_base.py                       # the shipped weights (5000 steps): 79 to 90 min on 2 cores
    python tools/build_tiny_base.py --pilot --out /tmp/x  # a few minutes, to validate the recipe
    python tools/build_tiny_base.py --resume-from DIR --steps 1000 --lr 5e-4   # continue a built model

The thread count is part of the recipe (another count gives other bytes); use ``--threads 1`` when the cores are
shared with other jobs. How the shipped weights were built, in how long and how good they are is written down in
``trainer/assets/tiny-sd/README.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer import tinyworld as tw  # noqa: E402
from trainer.losses import high_noise_weights, min_snr_weights  # noqa: E402

DEFAULT_OUT = ROOT / "trainer" / "assets" / "tiny-sd"

EVAL_PROMPT_SEED = tw.QUALITY_PROMPT_SEED  # the quality test uses the same prompts and seeds
EVAL_N = 48


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------------------------
# 1. tokenizer

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode mapping."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


#: Prompt length in tokens (SD uses 77; captions here are at most ~16 tokens, and shorter is faster on a CPU).
MAX_TOKENS = 32

WORLD_WORDS = ["a", "on", "background", *tw.COLOURS, *tw.SHAPES]


def build_tokenizer(folder: Path) -> "CLIPTokenizer":  # noqa: F821
    """Learn a CLIP-format BPE on the world's words and save it to ``folder``.

    The vocabulary is CLIP's layout: 256 byte symbols, the same 256 with ``</w>`` (end of word), the learnt merges,
    then ``<|startoftext|>`` and ``<|endoftext|>``. Every world word becomes a single token; any other text still
    tokenizes (into sub-word or byte symbols), so rare trigger words such as ``zqx`` work.
    """
    from transformers import CLIPTokenizer

    byte_syms = list(_bytes_to_unicode().values())
    vocab = byte_syms + [s + "</w>" for s in byte_syms]
    # plain BPE training on the word types (all with the same frequency)
    words = {w: [*w[:-1], w[-1] + "</w>"] for w in WORLD_WORDS}
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter = Counter()
        for syms in words.values():
            for a, b in zip(syms, syms[1:]):
                pairs[(a, b)] += 1
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], -len(merges), kv[0]))[0]  # deterministic tie-break
        best = sorted([p for p, c in pairs.items() if c == pairs[best]])[0]
        merges.append(best)
        merged = best[0] + best[1]
        for w, syms in words.items():
            out, i = [], 0
            while i < len(syms):
                if i + 1 < len(syms) and (syms[i], syms[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            words[w] = out
        if merged not in vocab:
            vocab.append(merged)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False),
                                       encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n",
                                       encoding="utf-8")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=MAX_TOKENS)
    for w in WORLD_WORDS:  # sanity: each world word is one token
        ids = tok(w, add_special_tokens=False).input_ids
        assert len(ids) == 1, (w, ids, tok.convert_ids_to_tokens(ids))
    tok.save_pretrained(str(folder))
    return tok


# ----------------------------------------------------------------------------------------------------------------
# 2. VAE

def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=16,
        sample_size=64, act_fn="silu",
    )


def images_to_tensor(images) -> torch.Tensor:
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def tensor_to_images(x: torch.Tensor):
    from PIL import Image

    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]


def cosine_lr(step: int, total: int, warmup: int, floor: float = 0.05) -> float:
    if step < warmup:
        return (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))


def train_vae(vae, steps: int, batch: int, lr: float, seed: int, crop: int = 32) -> None:
    """Train on random ``crop`` x ``crop`` crops (the VAE is convolutional; crops are 4x cheaper than full images
    and it generalises to 64x64, which ``vae_check`` verifies)."""
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps, max(1, steps // 20)))
    stream = tw.iter_samples(seed)
    vae.train()
    t0 = time.time()
    for step in range(steps):
        x = images_to_tensor([next(stream).image for _ in range(batch)])
        if crop < tw.IMAGE_SIZE:
            i, j = torch.randint(0, tw.IMAGE_SIZE - crop + 1, (2,)).tolist()
            x = x[:, :, i:i + crop, j:j + crop]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        kl = post.kl().mean() / post.mean[0].numel()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-5 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step}/{steps} loss {loss.item():.4f} kl {kl.item():.2f} ({time.time() - t0:.0f}s)")
    vae.eval()


@torch.no_grad()
def vae_check(vae, n: int, seed: int) -> float:
    samples = tw.generate_samples(n, seed=seed)
    x = images_to_tensor([s.image for s in samples])
    rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
    ok = 0
    for s, im in zip(samples, tensor_to_images(rec)):
        ok += tw.classify(im) == (s.background, s.foreground, s.shape)
    return ok / n


# ----------------------------------------------------------------------------------------------------------------
# 3./4. text encoder + UNet

def make_text_encoder(tok):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS, hidden_act="quick_gelu", projection_dim=128,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    return CLIPTextModel(cfg)


def make_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3, mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(32, 64, 128), layers_per_block=1, cross_attention_dim=128,
        attention_head_dim=4, norm_num_groups=16,
    )


#: Stable Diffusion's own beta schedule. (The DDPM "linear" 1e-4..0.02 schedule was tried first: its terminal SNR
#: is lower, but epsilon prediction is so ill-conditioned at its high-noise steps that the tiny UNet learnt to
#: ignore the caption. Offset noise instead keeps the model from reading colours out of the starting noise.)
BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def make_noise_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, **BETAS,
                         prediction_type="epsilon", clip_sample=False)


def make_sampling_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, **BETAS,
                         prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                         timestep_spacing="leading")


#: Never drawn as filler words, so demo trigger words stay unseen by the base model. A fixed set, not read from
#: tinyworld's demo settings, so that changing the demo never changes this build's random stream.
RESERVED_WORDS = {"zqx", "star"}


def filler_word(rng: random.Random) -> str:
    """A random lowercase "word" the tokenizer does not know (it splits into byte tokens), like a rare token."""
    while True:
        w = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 6)))
        if w not in RESERVED_WORDS and w not in WORLD_WORDS:
            return w


def varied_caption(rng: random.Random, background: str, foreground: str, shape: str) -> str:
    """The caption in one of several phrasings, sometimes with unknown words before or after it.

    Why: a text encoder that only ever saw the fixed form at fixed positions cannot read a prompt with a prefix
    (``zqx, a red star on a blue background`` drew a green triangle on red), so a LoRA could not teach it a trigger
    word. Half the captions keep the canonical form, which the quality test uses.
    """
    bg, fg = background, foreground
    r = rng.random()
    if r < 0.5:
        text = f"a {fg} {shape} on a {bg} background"
    elif r < 0.65:
        text = f"{fg} {shape} on {bg} background"
    elif r < 0.8:
        text = f"a {fg} {shape}, {bg} background"
    else:
        text = f"{bg} background, a {fg} {shape}"
    r = rng.random()
    if r < 0.25:
        text = f"{filler_word(rng)}, {text}"
    elif r < 0.35:
        text = f"{filler_word(rng)} {filler_word(rng)}, {text}"
    elif r < 0.45:
        text = f"{text}, {filler_word(rng)}"
    return text


def tokenize(tok, captions) -> torch.Tensor:
    return tok(list(captions), padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids


class EMA:
    def __init__(self, params, decay: float):
        self.params = list(params)
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay = decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for s, p in zip(self.shadow, self.params):
            s.mul_(d).add_(p.detach(), alpha=1 - d)

    @torch.no_grad()
    def swap(self) -> None:
        for s, p in zip(self.shadow, self.params):
            tmp = p.detach().clone()
            p.copy_(s)
            s.copy_(tmp)


@torch.no_grad()
def encode_cache(vae, n: int, seed: int, batch: int = 64):
    samples_iter = tw.iter_samples(seed)
    means, stds, caps = [], [], []
    for i in range(0, n, batch):
        ss = [next(samples_iter) for _ in range(min(batch, n - i))]
        d = vae.encode(images_to_tensor([s.image for s in ss])).latent_dist
        means.append(d.mean)
        stds.append(d.std)
        caps += [s.caption for s in ss]
    return torch.cat(means), torch.cat(stds), caps


def eval_prompts(n: int = EVAL_N, seed: int = EVAL_PROMPT_SEED):
    """The quality test's prompts: ``(prompt, (bg, fg, shape), generator_seed)``."""
    return tw.quality_prompts(n, seed)


@torch.no_grad()
def evaluate(pipe, n: int = EVAL_N, steps: int = 30, guidance: float = 4.0):
    items = eval_prompts(n)
    hits = np.zeros(3)
    for chunk in range(0, n, 24):
        part = items[chunk:chunk + 24]
        gens = [torch.Generator().manual_seed(s) for _, _, s in part]
        images = pipe([p for p, _, _ in part], num_inference_steps=steps, guidance_scale=guidance,
                      generator=gens, height=64, width=64, output_type="pil").images
        for (_, want, _), im in zip(part, images):
            got = tw.classify(im)
            hits += [got[0] == want[0], got[1] == want[1], got[2] == want[2]]
    return hits / n


def make_pipeline(vae, te, tok, unet):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
                                   scheduler=make_sampling_scheduler(), safety_checker=None,
                                   feature_extractor=None, image_encoder=None, requires_safety_checker=False)


TOKENIZER_SRC: Path | None = None


def save(pipe, out: Path, info: dict) -> None:
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    if TOKENIZER_SRC is not None:  # keep the CLIP-format files next to tokenizer.json
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(TOKENIZER_SRC / name, tmp / "tokenizer" / name)
    (tmp / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    readme = out / "README.md"
    if readme.exists():
        shutil.copy(readme, tmp / "README.md")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def param_count(m) -> int:
    return sum(p.numel() for p in m.parameters())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--vae-steps", type=int, default=1600)
    ap.add_argument("--vae-batch", type=int, default=16)
    ap.add_argument("--vae-lr", type=float, default=3e-3)
    ap.add_argument("--vae-crop", type=int, default=32)
    ap.add_argument("--cache", type=int, default=20000, help="images in the latent cache")
    ap.add_argument("--steps", type=int, default=5000, help="UNet + text encoder steps")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--ema", type=float, default=0.998)
    ap.add_argument("--cfg-drop", type=float, default=0.1)
    ap.add_argument("--min-snr", type=float, default=5.0, help="min-SNR-gamma weighting (only with --weight-cap 0)")
    ap.add_argument("--noise-offset", type=float, default=0.1)
    ap.add_argument("--weight-cap", type=float, default=50.0, help="cap of the 1/alpha_bar loss weight")
    ap.add_argument("--save-every", type=int, default=500, help="save the EMA weights every N steps (no eval)")
    ap.add_argument("--eval-every", type=int, default=1000, help="evaluate (and save) every N steps")
    ap.add_argument("--eval-prompts", type=int, default=EVAL_N, help="prompts per evaluation (the quality test's 48)")
    ap.add_argument("--varied-captions", action="store_true",
                    help="train on several phrasings with unknown filler words (prefixed prompts then parse, but "
                         "shapes and LoRA learning got worse: see the model card)")
    ap.add_argument("--threads", type=int, default=2,
                    help="torch threads; the shipped weights were built with 2, and the same count gives the same "
                         "weights (on cores shared with other jobs use 1: 2 oversubscribed threads ran 7x slower)")
    ap.add_argument("--resume-from", type=Path, default=None,
                    help="continue training the UNet + text encoder of a built folder (its VAE is kept)")
    ap.add_argument("--pilot", action="store_true", help="tiny budget, to validate the recipe end to end")
    args = ap.parse_args(argv)
    if args.pilot:
        args.vae_steps, args.cache, args.steps, args.warmup, args.eval_every = 150, 2000, 300, 50, 10 ** 9

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    t_start = time.time()
    info: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "torch": torch.__version__}

    import tempfile

    tok_dir = Path(tempfile.mkdtemp(prefix="tiny_tok_"))
    tok = build_tokenizer(tok_dir)
    global TOKENIZER_SRC
    TOKENIZER_SRC = tok_dir
    log(f"tokenizer: {len(tok)} tokens; 'a red circle on a blue background' -> "
        f"{tok('a red circle on a blue background').input_ids}")

    if args.resume_from is None:
        vae = make_vae()
        log(f"vae params {param_count(vae):,}")
        train_vae(vae, args.vae_steps, args.vae_batch, args.vae_lr, args.seed + 1, args.vae_crop)
    else:  # continue training a built model: same tokenizer and VAE, UNet + text encoder start from its weights
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(str(args.resume_from / "vae"))
        info["resumed_from"] = json.loads((args.resume_from / "build_info.json").read_text())
        log(f"resuming from {args.resume_from}")
    acc = vae_check(vae, 200, args.seed + 99)
    log(f"vae reconstruction classify accuracy {acc:.3f}")
    info["vae_recon_accuracy"] = acc
    vae.requires_grad_(False)

    means, stds, caps = encode_cache(vae, args.cache, args.seed + 2 + (0 if args.resume_from is None else 7))
    if args.resume_from is None:
        scale = 1.0 / float(means.std())
        vae.register_to_config(scaling_factor=scale)
    scale = float(vae.config.scaling_factor)
    log(f"latent cache {tuple(means.shape)} mean {means.mean():.3f} std {means.std():.3f} -> scaling_factor {scale:.4f}"
        f" ({time.time() - t_start:.0f}s)")
    info["scaling_factor"] = scale
    triples = [tw.parse_caption(c) for c in caps]  # (bg, fg, shape) per cached latent
    caption_rng = random.Random(args.seed + 5)
    ids_all = None if args.varied_captions else tokenize(tok, caps)  # fixed captions: tokenized once
    empty_ids = tokenize(tok, [""])[0]

    if args.resume_from is None:
        te = make_text_encoder(tok)
        unet = make_unet()
    else:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        te = CLIPTextModel.from_pretrained(str(args.resume_from / "text_encoder"))
        unet = UNet2DConditionModel.from_pretrained(str(args.resume_from / "unet"))
    log(f"unet params {param_count(unet):,}; text encoder params {param_count(te):,}")
    noise_sched = make_noise_scheduler()
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, args.steps, args.warmup))
    ema = EMA(params, args.ema)
    g = torch.Generator().manual_seed(args.seed + 3)
    unet.train()
    te.train()
    t0 = time.time()
    run_loss = 0.0
    for step in range(args.steps):
        idx = torch.randint(0, means.shape[0], (args.batch,), generator=g)
        lat = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=g)) * scale
        if args.varied_captions:
            ids = tokenize(tok, [varied_caption(caption_rng, *triples[i]) for i in idx.tolist()])
        else:
            ids = ids_all[idx].clone()
        drop = torch.rand(args.batch, generator=g) < args.cfg_drop
        ids[drop] = empty_ids
        noise = torch.randn(lat.shape, generator=g)
        if args.noise_offset > 0:  # per-image, per-channel constant: the colours must come from the caption
            noise = noise + args.noise_offset * torch.randn((lat.shape[0], lat.shape[1], 1, 1), generator=g)
        t = torch.randint(0, 1000, (args.batch,), generator=g)
        noisy = noise_sched.add_noise(lat, noise, t)
        enc = te(ids)[0]
        pred = unet(noisy, t, enc).sample
        per = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        if args.weight_cap > 0:
            # v-prediction-equivalent weighting 1/alpha_bar = 1 + 1/SNR, capped: the plain epsilon loss is nearly
            # blind to the high-noise steps, where the caption decides the colours and the shape (without this
            # the model learnt to ignore the text).
            per = per * high_noise_weights(noise_sched, t, args.weight_cap, "epsilon")
        elif args.min_snr > 0:
            per = per * min_snr_weights(noise_sched, t, args.min_snr, "epsilon")
        loss = per.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.update(step)
        run_loss += loss.item()
        if (step + 1) % 100 == 0:
            el = time.time() - t0
            log(f"unet step {step + 1}/{args.steps} loss {run_loss / 100:.4f} lr {sched.get_last_lr()[0]:.2e} "
                f"({el:.0f}s, {el / (step + 1):.2f}s/step, eta {el / (step + 1) * (args.steps - step - 1) / 60:.1f} min)")
            run_loss = 0.0
        if (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            ema.swap()
            info["steps_done"] = step + 1
            info["build_seconds"] = time.time() - t_start
            save(make_pipeline(vae, te, tok, unet), args.out, info)
            log(f"saved EMA checkpoint at step {step + 1}")
            ema.swap()
        if (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            ema.swap()
            unet.eval(); te.eval()
            pipe = make_pipeline(vae, te, tok, unet)
            pipe.set_progress_bar_config(disable=True)
            q = evaluate(pipe, args.eval_prompts)
            log(f"EVAL step {step + 1} (EMA): bg {q[0]:.2%} fg {q[1]:.2%} shape {q[2]:.2%}")
            info.setdefault("evals", []).append({"step": step + 1, "bg": q[0], "fg": q[1], "shape": q[2]})
            info["steps_done"] = step + 1
            info["build_seconds"] = time.time() - t_start
            save(pipe, args.out, info)  # keep a usable model on disk at every eval
            ema.swap()
            unet.train(); te.train()

    ema.swap()  # final weights = EMA weights
    unet.eval(); te.eval()
    pipe = make_pipeline(vae, te, tok, unet)
    pipe.set_progress_bar_config(disable=True)
    info["steps_done"] = args.steps
    info["train_seconds"] = time.time() - t_start
    info["params"] = {"unet": param_count(unet), "vae": param_count(vae), "text_encoder": param_count(te)}
    save(pipe, args.out, info)
    log(f"saved final weights ({info['train_seconds'] / 60:.1f} min); evaluating")
    q = evaluate(pipe, args.eval_prompts)
    log(f"FINAL (EMA): bg {q[0]:.2%} fg {q[1]:.2%} shape {q[2]:.2%}")
    info["final"] = {"bg": q[0], "fg": q[1], "shape": q[2]}
    info["build_seconds"] = time.time() - t_start
    save(pipe, args.out, info)
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    log(f"saved to {args.out} ({size / 1e6:.1f} MB) in {(time.time() - t_start) / 60:.1f} min")
    shutil.rmtree(tok_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
