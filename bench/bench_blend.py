#!/usr/bin/env python
"""Benchmark: fused exact blending (trainer.adapters.FusedBlender) against peft/diffusers `set_adapters`.

Measures, on the tiny model (trainer/assets/tiny-sd, else the tests' tiny components) and on an SD1.5-size UNet
built from its config (random weights):
- per-step cost with 0 adapters and with 3 adapters (fused: same cost as the base by construction; peft: the LoRA
  modules stay in the forward pass), as medians over interleaved passes, since the cores are shared;
- the time to change one adapter's weight (fused: recompute that adapter's layers from W0; peft: set_adapters).

Prints a markdown table and writes it into docs/benchmarks.md (between this script's markers).

    python bench/bench_blend.py                 # both models: about 4-6 minutes on 2 shared CPU cores
    python bench/bench_blend.py --skip-sd15     # the tiny model only
"""
from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from docs_section import write_section  # noqa: E402
from trainer.formats import module_index  # noqa: E402
from trainer.adapters.blend import FusedBlender  # noqa: E402
from trainer.lora_state import Adapter, LoraLayer  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
WEIGHTS = [0.7, -0.3, 0.5]


def median_time(fn, passes: int) -> float:
    """Median wall time of fn over passes."""
    return statistics.median(timed(fn)[0] for _ in range(passes))


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process): CPU time is what a step costs; on shared cores the wall time
    also holds the time spent waiting for a core."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def random_adapters(unet, rank: int, n: int = 3) -> list[Adapter]:
    """n adapters on the UNet's attention projections with random (non-zero) factors."""
    index = module_index(unet, {})
    names = [k for k, (_, path, _) in index.items() if any(path.endswith(f".{t}") for t in TARGETS)]
    adapters = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        layers = {}
        for name in names:
            weight = index[name][2].weight
            down = torch.randn(rank, weight.shape[1], generator=g) / weight.shape[1] ** 0.5
            layers[name] = LoraLayer(down, torch.randn(weight.shape[0], rank, generator=g) * 0.01, float(rank))
        adapters.append(Adapter(layers))
    return adapters


def add_peft_adapters(unet, rank: int, n: int = 3) -> list[str]:
    from peft import LoraConfig
    names = [f"bench{i}" for i in range(n)]
    for i, name in enumerate(names):
        torch.manual_seed(i)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, init_lora_weights=False),
                         adapter_name=name)
    unet.set_adapters(names, weights=WEIGHTS)
    return names


def flops(step) -> int:
    """Floating-point operations of one call, counted by torch (noise-free, unlike any timing)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def measure(step, unet, rank: int, passes: int) -> dict:
    """Interleaved passes: base and fused alternate, then peft-off and peft-on alternate (drift cancels)."""
    adapters = random_adapters(unet, rank)
    blender = FusedBlender(unet)
    step()  # warm-up

    def blend_all():
        for i, (a, w) in enumerate(zip(adapters, WEIGHTS)):
            blender.add(f"a{i}", a, w)

    counted = {"base_flops": flops(step)}
    blend_all()
    counted["fused_flops"] = flops(step)
    blender.clear()
    base, fused, blend_in = [], [], []

    for k in range(passes):  # order base, fused | fused, base | ...: one switch per pass, drift cancels
        if k % 2 == 0:
            base.append(timed(step))
            blend_in.append(median_time(blend_all, 1))
            fused.append(timed(step))
        else:
            fused.append(timed(step))
            blender.clear()
            base.append(timed(step))
    blender.clear()
    blend_all()
    values = itertools.cycle([0.2, 0.9])
    fused_change = median_time(lambda: blender.set_weight("a1", next(values)), max(3, passes))
    blender.clear()

    names = add_peft_adapters(unet, rank)
    counted["peft_flops"] = flops(step)
    peft_base, peft = [], []
    for k in range(passes):
        for on in ((False, True) if k % 2 == 0 else (True, False)):
            if on:
                unet.enable_adapters()
                unet.set_adapters(names, weights=WEIGHTS)
            else:
                unet.disable_adapters()
            (peft if on else peft_base).append(timed(step))
    unet.enable_adapters()
    weights = itertools.cycle([[0.7, w, 0.5] for w in (0.2, 0.9)])
    peft_change = median_time(lambda: unet.set_adapters(names, weights=next(weights)), max(3, passes))
    unet.delete_adapters(names)
    out = {"layers": len(adapters[0]), "blend_in": statistics.median(blend_in), "fused_change": fused_change,
           "peft_change": peft_change, **counted}
    for key, pairs in (("base", base), ("fused", fused), ("peft_base", peft_base), ("peft", peft)):
        out[key] = statistics.median(p[0] for p in pairs)
        out[key + "_cpu"] = statistics.median(p[1] for p in pairs)
    return out


# ---- the two models ------------------------------------------------------------------------------------------------

def tiny_case(passes: int, steps: int) -> tuple[str, dict]:
    folder = ROOT / "trainer" / "assets" / "tiny-sd"
    if (folder / "model_index.json").is_file():
        from trainer.models import load_base_model
        base = load_base_model(str(folder))
        pipe, label = base.pipeline(), "tiny-sd (shipped)"
    else:
        from diffusers import StableDiffusionPipeline
        from tiny import tiny_components
        pipe = StableDiffusionPipeline(**tiny_components(), safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        label = "tiny (tests/tiny.py)"
    pipe.set_progress_bar_config(disable=True)

    def generate():
        with torch.no_grad():
            pipe("a red circle on a blue background", num_inference_steps=steps,
                 generator=torch.Generator().manual_seed(0), output_type="np")

    result = measure(generate, pipe.unet, rank=8, passes=passes)
    return f"{label}, {steps}-step generation", result


def sd15_case(passes: int, batch: int) -> tuple[str, dict]:
    from diffusers import UNet2DConditionModel
    config = UNet2DConditionModel.load_config(str(ROOT / "trainer" / "models" / "configs" / "sd15"), subfolder="unet")
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(config).eval().requires_grad_(False)
    latents = torch.randn(batch, 4, 64, 64)
    text = torch.randn(batch, 77, 768)
    timestep = torch.tensor(500)

    def forward():
        with torch.no_grad():
            unet(latents, timestep, encoder_hidden_states=text)

    result = measure(forward, unet, rank=16, passes=passes)
    return f"SD1.5 UNet (random weights), one step: batch {batch}, 64x64 latents", result


# ---- report --------------------------------------------------------------------------------------------------------

def table(cases: list[tuple[str, dict]], passes: str) -> str:
    lines = ["### Fused blending vs peft `set_adapters` (bench/bench_blend.py)", "",
             f"{platform.machine()}, {torch.get_num_threads()} torch thread(s) on shared cores, torch "
             f"{torch.__version__}; medians of {passes} interleaved passes. 3 adapters on the UNet attention "
             f"projections (to_q, to_k, to_v, to_out.0). Fused: the adapters summed into the weights "
             f"(`trainer.adapters.FusedBlender`); peft: diffusers' `set_adapters`, LoRA modules in the forward pass. "
             f"Times are CPU seconds of the process (the cost; the cores are shared, so wall time also counts "
             f"waiting), wall medians in brackets; each ratio is against the 0-adapter passes interleaved with it. "
             f"The FLOPs ratio (counted by torch.utils.flop_counter, free of timing noise) is against 0 adapters.",
             "",
             "| model | layers per adapter | 0 adapters | 3 fused | ratio | peft: 0 active | peft: 3 active | ratio "
             "| FLOPs ratio fused / peft | change one weight: fused | change weights: peft | blend 3 in (fused) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, r in cases:
        cells = [label, str(r["layers"])]
        for pair in (("base", "fused"), ("peft_base", "peft")):
            cells += [_both(r, pair[0]), _both(r, pair[1]), f"{r[pair[1] + '_cpu'] / r[pair[0] + '_cpu']:.3f}"]
        cells.append(f"{r['fused_flops'] / r['base_flops']:.4f} / {r['peft_flops'] / r['base_flops']:.4f}")
        cells += [_s(r["fused_change"]), _s(r["peft_change"]), _s(r["blend_in"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Reading: a fused step does exactly the base model's floating-point work (FLOPs ratio 1.0000), so its "
              "time ratio is 1 up to timing noise, which on shared cores is several percent per median (the two "
              "0-adapter columns do the same work). peft's active adapters add FLOPs and many small kernels to every "
              "step. A weight change costs the fused blend one fp32 recomputation of that adapter's layers, once:"]
    for label, r in cases:
        overhead = r["peft_cpu"] - r["peft_base_cpu"]
        if overhead > 0:
            lines.append(f"- {label}: one fused weight change costs {r['fused_change'] / overhead:.2f} times peft's "
                         f"extra cost per timed call ({_s(overhead)}), which peft pays on every call.")
    return "\n".join(lines) + "\n"


def _both(r: dict, key: str) -> str:
    return f"{_s(r[key + '_cpu'])} ({_s(r[key])})"


def _s(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--passes", type=int, default=15, help="interleaved passes per case (medians)")
    parser.add_argument("--sd15-passes", type=int, default=5, help="passes for the SD1.5 UNet (each is seconds)")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps of the tiny generation")
    parser.add_argument("--batch", type=int, default=1, help="SD1.5 batch (2 = one guided step)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: idle OpenMP threads do not spin on shared cores, so CPU time is "
                             "stable)")
    parser.add_argument("--skip-sd15", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"), help="markdown file ('' = none)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cases = [tiny_case(args.passes, args.steps)]
    print(f"measured {cases[-1][0]}", file=sys.stderr)
    if not args.skip_sd15:
        cases.append(sd15_case(args.sd15_passes, args.batch))
    passes = f"{args.passes}" + ("" if args.skip_sd15 else f" (tiny) / {args.sd15_passes} (SD1.5)")
    text = table(cases, passes)
    print(text)
    if args.out:
        write_section("bench_blend", text, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
