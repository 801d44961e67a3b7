#!/usr/bin/env python
"""Benchmark: peak memory and time of one LoRA training step at real SD 1.5, SDXL, SD 3.5 and FLUX.1-dev size (real
configs, random weights), against a frozen forward pass of the same denoiser (UNet or MMDiT transformer).

Each row runs in a fresh process so its peak is its own: frozen denoiser weights in bf16, rank-8 LoRA on its
attention (fp32 weights, trained through bf16 autocast), gradient checkpointing, cached latents and text-encoder
outputs (so no VAE or text encoder is resident), batch 1. On the CPU the peak is the process's maximum resident set;
on a CUDA machine (--device cuda, the default when one is present) it is torch.cuda.max_memory_allocated.

A CPU without native bf16 (AVX2 only, like the development machine) runs PyTorch's bf16 kernels slowly and
unevenly: the UNet is kept channels_last (a 3x3 convolution in the default layout has no fast bf16 kernel there:
48 s against 0.6 s), and still one SDXL training step at 512 px takes about an hour on 2 cores, against minutes
for its forward pass (the backward kernels are the slow ones). The peaks are what such a machine can measure; a GPU
or a CPU with AVX-512 BF16 / AMX gives the times too.

    python bench/bench_memory.py                 # SD 1.5 and SDXL at 512 px, 2 timed steps each
    python bench/bench_memory.py --models sdxl --resolution 1024 --steps 1
    python bench/bench_memory.py --models sd35m --resolution 256 --steps 1   # SD 3.5 Medium on a CPU
    python bench/bench_memory.py --models flux1 --resolution 1024 --steps 1 --fp8   # FLUX.1-dev on a GPU
    python bench/bench_memory.py --models flux1 --resolution 1024 --steps 1 --fp8 --offload 35   # + block offload

FLUX.1-dev's transformer is 11.9 B parameters: 23.8 GB in bf16, 11.9 GB with --fp8 (allocated in fp8 from the
start, so the peak never holds a bf16 copy). Its cached text is T5's 512 tokens x 4096 and CLIP-L's pooled 768;
latents are packed 2x2 into 64 channels as the family's predict does, with dev's guidance embedding at 1.0.
    python bench/bench_memory.py --write         # also put the table into docs/benchmarks.md
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from docs_section import write_section  # noqa: E402  (bench/ is the script's folder)
# name -> (family, shipped config folder); the SD3 rows are opt-in (--models): SD 3.5 Large's bf16 transformer
# alone is 16 GB, and gpu_check.py runs both at 1024 px
MODELS = {"sd15": ("sd1", "sd15"), "sdxl": ("sdxl", "sdxl"), "sd35m": ("sd3", "sd35-medium"),
          "sd35l": ("sd3", "sd35-large"), "flux1": ("flux", "flux1-dev"), "klein4b": ("flux2", "flux2-klein-4b")}
DEFAULT_MODELS = ["sd15", "sdxl"]
# SD3's cached text: CLIP-L + CLIP-G's 77 tokens in front of T5's (model.t5_length 256, sd-scripts' default and the
# sd35 presets'), 4096 wide (trainer/models/sd3.py encode_text); pooled: both CLIPs' projections, 768 + 1280
SD3_T5_LENGTH = 256
# FLUX.1-dev's cached text: T5 alone, at dev's 512 tokens (model.t5_length in the flux-dev presets; sd-scripts
# flux_train_network.py l. 171-175), joint_attention_dim wide; pooled: CLIP-L's pooler output (pooled_projection_dim)
FLUX_T5_LENGTH = 512
# FLUX.2 klein's cached text: Qwen3's hidden states at the pipeline's 512 tokens (max_sequence_length), the
# transformer's joint_attention_dim wide (three layers' states stacked: 7680 for 4B); no pooled vector
KLEIN_TEXT_LENGTH = 512
FLOW_FAMILIES = ("sd3", "flux", "flux2")  # timesteps are flow times x 1000


def peak_gb(device: str) -> float:
    import torch
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def denoiser_class(family):
    """The diffusers class of a family's denoiser (by its name: the bench knows the families it has rows for)."""
    import diffusers
    name = family.name if family is not None else "sd1"
    return getattr(diffusers, {"sd3": "SD3Transformer2DModel", "flux": "FluxTransformer2DModel",
                               "flux2": "Flux2Transformer2DModel"}.get(
        name, "UNet2DConditionModel"))


def random_unet(config_dir: Path, device: str, family=None, fp8: bool = False, offload: int = 0):
    """The denoiser of a config (the family's: a UNet, SD3's or FLUX's transformer) with random weights, allocated
    once in bf16 (no fp32 copy on the way); with fp8, the layers precision.fp8_base stores in float8_e4m3fn are
    allocated in it from the start (diffusers' layerwise casting, set up on the meta device), so the peak never
    holds the bf16 copy (FLUX.1: 23.8 GB) that casting a built model would. With `offload`, the last N blocks'
    weights are made in CPU memory and stay there (precision.offload_blocks, trainer/models/offload.py); the model's
    `offload` attribute holds the BlockOffload."""
    import torch
    from accelerate import init_empty_weights
    sub = family.denoiser_component if family is not None else "unet"
    cls = denoiser_class(family)
    with init_empty_weights():
        unet = cls.from_config(cls.load_config(str(config_dir), subfolder=sub)).to(torch.bfloat16)
    if fp8:  # the loop's BaseModel.store_denoiser_in_fp8 (peft's layers, added later, are skipped by name)
        from trainer.models.base import store_in_fp8
        store_in_fp8(unet, torch.bfloat16)
    unet = unet.to_empty(device="cpu" if offload else device)
    if offload:
        from trainer.models.offload import BlockOffload, move_except, offloaded_blocks
        fill_random(unet, "cpu")
        unet.offload = BlockOffload(offloaded_blocks(family.blocks(unet), offload), torch.device(device))
        move_except(unet, device, unet.offload)
        return unet.requires_grad_(False)
    if sub == "unet":
        # channels_last: PyTorch's CPU bf16 convolution in the default layout has no fast kernel on a CPU without
        # native bf16 (a 320-channel 3x3 conv at 64x64: 48 s, against 0.6 s channels_last on AVX2); on CUDA it is
        # the fast one. (The transformers have one convolution at most, their patch embedding.)
        unet = unet.to(memory_format=torch.channels_last)
    fill_random(unet, device)
    return unet.requires_grad_(False)


def fill_random(module, device: str) -> None:
    """N(0, 0.02) weights; fp8 tensors (no normal_ kernel) through a bf16 draw one tensor at a time."""
    import torch
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            if p.dtype == torch.float8_e4m3fn:
                p.copy_(torch.empty(p.shape, dtype=torch.bfloat16, device=device).normal_(0, 0.02, generator=g))
            else:
                p.normal_(0, 0.02, generator=g)


def conditioning(family_name: str, resolution: int, device: str, config=None) -> dict:
    """Cached text-encoder outputs (and SDXL's size ids) of the right shapes, as the text cache holds them
    (FLUX's widths from its transformer `config`)."""
    import torch
    from trainer.models import get_family
    from trainer.models.family import SizeInfo
    if family_name == "flux":
        return {"encoder_hidden_states": torch.randn(1, FLUX_T5_LENGTH, config.joint_attention_dim, device=device),
                "pooled_projections": torch.randn(1, config.pooled_projection_dim, device=device)}
    if family_name == "flux2":
        return {"encoder_hidden_states": torch.randn(1, KLEIN_TEXT_LENGTH, config.joint_attention_dim, device=device)}
    if family_name == "sd3":
        return {"encoder_hidden_states": torch.randn(1, 77 + SD3_T5_LENGTH, 4096, device=device),
                "pooled_projections": torch.randn(1, 768 + 1280, device=device)}
    width = {"sd1": 768, "sdxl": 2048}[family_name]
    text = {"encoder_hidden_states": torch.randn(1, 77, width, device=device)}
    if family_name == "sdxl":
        text["text_embeds"] = torch.randn(1, 1280, device=device)
    sizes = [SizeInfo((resolution, resolution), (0, 0), (resolution, resolution))]
    return get_family(family_name).conditioning(None, text, sizes) if family_name == "sdxl" else text


def measure(model: str, resolution: int, steps: int, device: str, checkpointing: bool = True,
            fp8: bool = False, offload: int = 0) -> dict:
    """One process's row: weights, forward and training-step times (medians), peaks after each phase."""
    import torch
    from types import SimpleNamespace
    from trainer import config as C
    from trainer.models import get_family
    from trainer.network import inject_lora
    family_name, configs = MODELS[model]
    family = get_family(family_name)
    unet = random_unet(ROOT / "trainer" / "models" / "configs" / configs, device, family, fp8, offload)
    weights = peak_gb(device)
    base = SimpleNamespace(denoiser=unet, text_encoders={}, family=family)
    cond = {k: v.to(torch.bfloat16) for k, v in conditioning(family_name, resolution, device, unet.config).items()}
    # the VAE's channels: 4; SD3's 16; FLUX.1's 16 and klein's 32, which their predict packs 2x2 into the
    # transformer's 64 and 128
    channels = unet.config.in_channels // (4 if family_name in ("flux", "flux2") else 1)
    latents = torch.randn(1, channels, resolution // 8, resolution // 8, device=device, dtype=torch.bfloat16)
    latents = latents.to(memory_format=torch.channels_last)
    t = torch.tensor([500.0 if family_name in FLOW_FAMILIES else 500], device=device)  # a flow time x 1000
    # bf16 compute dtype even over fp8 storage; options: FLUX-dev's guidance embedding at model.train_guidance 1.0
    stand_in = SimpleNamespace(denoiser=unet, dtype=torch.bfloat16, options={"train_guidance": 1.0})
    predict = lambda: family.predict(stand_in, latents, t, cond)  # noqa: E731
    forward = []
    for _ in range(steps):
        start = time.perf_counter()
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
            predict()
        forward.append(time.perf_counter() - start)
    peak_forward = peak_gb(device)
    cfg = C.TrainConfig()
    C.apply_overrides(cfg, ["network.rank=8", "network.alpha=8", "network.text_encoders=[]"])
    params = inject_lora(base, cfg)
    for p in params.named().values():
        p.data = p.data.float().to(device)  # peft makes an offloaded block's LoRA where its weights are (the CPU)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    optimizer = torch.optim.AdamW(params.param_groups())
    train = []
    for _ in range(steps):
        start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = predict().float().pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train.append(time.perf_counter() - start)
    return {"model": model, "resolution": resolution, "device": device, "fp8": fp8, "offload": offload,
            "lora_params": sum(p.numel() for p in params.named().values()), "weights_gb": weights,
            "forward_s": statistics.median(forward), "forward_peak_gb": peak_forward,
            "step_s": statistics.median(train), "step_peak_gb": peak_gb(device), "threads": torch.get_num_threads()}


def run_row(model: str, resolution: int, steps: int, device: str, checkpointing: bool = True,
            fp8: bool = False, offload: int = 0) -> dict:
    """One row, measured in a fresh process (bench/gpu_check.py runs it too)."""
    done = subprocess.run([sys.executable, __file__, "--child", model, "--resolution", str(resolution),
                           "--steps", str(steps), "--device", device]
                          + ([] if checkpointing else ["--no-checkpointing"]) + (["--fp8"] if fp8 else [])
                          + ["--offload", str(offload)],
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{model} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    import torch
    device = rows[0]["device"]
    peak = "max resident set" if device == "cpu" else "torch.cuda.max_memory_allocated"
    lines = ["### One LoRA training step at real size (bench/bench_memory.py)", "",
             f"{platform.machine()}, {device}, {rows[0]['threads']} torch thread(s), torch {torch.__version__}. "
             f"Real configs with random weights; frozen denoiser in bf16, rank-8 LoRA on its attention (fp32 "
             f"weights, bf16 autocast), gradient checkpointing, cached latents and text-encoder outputs (no VAE or "
             f"text encoder resident; SD3: 77 + {SD3_T5_LENGTH} text tokens, FLUX.1: {FLUX_T5_LENGTH}), batch 1, AdamW; medians of the timed "
             f"passes. Peak: {peak}, in its own process.",
             "", "| model | px | LoRA parameters | weights | frozen forward | peak | training step | peak | "
                 "step / forward |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        offloaded = f", {r['offload']} blocks offloaded" if r.get("offload") else ""
        lines.append(f"| {r['model']}{' (fp8 base)' if r.get('fp8') else ''}{offloaded} | {r['resolution']} | {r['lora_params']:,} | {r['weights_gb']:.2f} GB | "
                     f"{r['forward_s']:.1f} s | {r['forward_peak_gb']:.2f} GB | {r['step_s']:.1f} s | "
                     f"{r['step_peak_gb']:.2f} GB | {r['step_s'] / r['forward_s']:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=list(MODELS))
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--steps", type=int, default=2, help="timed passes of each kind")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    ap.add_argument("--write", action="store_true", help="put the table into docs/benchmarks.md")
    ap.add_argument("--no-checkpointing", action="store_true", help="without gradient checkpointing")
    ap.add_argument("--fp8", action="store_true", help="the denoiser's frozen weights in fp8 (precision.fp8_base)")
    ap.add_argument("--offload", type=int, default=0, help="the transformer's last N blocks in CPU memory "
                    "(precision.offload_blocks; needs checkpointing)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.child:
        print(json.dumps(measure(args.child, args.resolution, args.steps, device, not args.no_checkpointing,
                                 args.fp8, args.offload)))
        return 0
    rows = [run_row(m, args.resolution, args.steps, device, not args.no_checkpointing, args.fp8, args.offload)
            for m in args.models]
    text = table(rows)
    print(text)
    if args.write:
        write_section("bench_memory", text)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
