#!/usr/bin/env python
"""Every CUDA path in one run (at most about 5 minutes on one recent GPU), one table out.

  1. Tiny-model trainings through the CLI: fp16 and bf16 autocast (with fp16/bf16 frozen weights, as the loop
     keeps them on CUDA), 8-bit AdamW (bitsandbytes), gradient checkpointing; each must finish with a finite loss
     and an adapter.
  2. Peak memory of one LoRA training step at SD 1.5 and SDXL size (real configs, random bf16 weights; the rows of
     bench/bench_memory.py) at 512 and 1024 px, with and without gradient checkpointing; SD 3.5 Medium and Large
     at 1024 px (cached text: 77 + 256 tokens), the sizes the sd35-medium (12 GB) and sd35-large (16 GB) presets
     are meant to fit; FLUX.1-dev at 1024 px in bf16 and over fp8 base weights (cached text: T5's 512 tokens),
     what the flux-dev presets train (their comments say what else they hold on the card).
     With 16 of FLUX.1's 57 blocks offloaded over fp8 weights (the flux-dev-12gb preset), and FLUX.2 klein 4B.
  3. Block offload on CUDA (side-stream prefetch): the tiny FLUX trained with and without, the same adapter.
  4. With two or more GPUs: two processes (DDP over NCCL) against one with the same global batch.

On a machine without CUDA it says so and exits 0. Put the table in docs/benchmarks.md with --write.

    python bench/gpu_check.py [--write] [--skip-memory]
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from docs_section import write_section  # noqa: E402  (bench/ is the script's folder)

TRAININGS = [  # name, --set values over the tiny demo
    ("fp16 autocast, fp16 frozen weights", ["precision.mixed=fp16"]),
    ("bf16 autocast, bf16 frozen weights", ["precision.mixed=bf16"]),
    ("8-bit AdamW (bitsandbytes), fp16", ["precision.mixed=fp16", "optimizer.name=adamw8bit"]),
    ("gradient checkpointing, bf16", ["precision.mixed=bf16", "precision.gradient_checkpointing=true"]),
]


def train(name: str, extra: list[str], root: Path, processes: int = 1) -> tuple[str, str]:
    """(result, detail) of one tiny training through the CLI on the GPU."""
    from trainer import Progress, read_events
    sets = [f"dataset.path={ROOT / 'examples' / 'demo-concept'}", "schedule.max_steps=20", "precision.device=cuda",
            f"saving.runs_dir={root}", f"run.name={name}", "saving.dtype=fp32", *extra]
    cmd = [sys.executable, "-m", "trainer", "train", "--quiet", "--num-processes", str(processes)]
    start = time.perf_counter()
    done = subprocess.run(cmd + [x for s in sets for x in ("--set", s)], cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        return "FAILED", (done.stderr.strip().splitlines() or ["no output"])[-1][:160]
    run_dir = next(p for p in root.iterdir() if p.name.startswith(name + "-"))
    losses = [e.loss for e in read_events(run_dir / "events.jsonl") if isinstance(e, Progress)]
    ok = len(losses) == 20 and all(math.isfinite(v) for v in losses)
    return ("ok" if ok else "FAILED"), f"{seconds:.0f} s, last loss {losses[-1]:.4f}" if losses else "no steps"


def trainings(root: Path) -> list[tuple[str, str, str]]:
    import importlib.util
    rows = []
    for i, (what, extra) in enumerate(TRAININGS):
        if "optimizer.name=adamw8bit" in extra and importlib.util.find_spec("bitsandbytes") is None:
            rows.append((what, "skipped", "bitsandbytes is not installed: pip install 'loradesk[cuda]'"))
            continue
        rows.append((what, *train(f"t{i}", extra, root)))
    return rows


# (bench_memory model, px, gradient checkpointing): SD 1.5 and SDXL at both sizes with and without; SD 3.5 at its
# native 1024 px, Medium both ways, Large (its bf16 transformer alone is 16 GB) as its preset trains it
MEMORY_ROWS = [(model, px, ckpt, False) for model in ("sd15", "sdxl") for px in (512, 1024) for ckpt in (True, False)]
# (the fourth: fp8 base weights, as the sd35-large preset trains on 16 GB)
MEMORY_ROWS += [("sd35m", 1024, True, False), ("sd35m", 1024, False, False), ("sd35l", 1024, True, False),
                ("sd35l", 1024, True, True)]
# FLUX.1-dev (11.9 B parameters: 23.8 GB bf16, 11.9 GB fp8) at its native 1024 px with checkpointing, as the
# flux-dev presets train it (the fp8 row is their setting; bf16 needs a 40 GB+ card)
MEMORY_ROWS += [("flux1", 1024, True, False), ("flux1", 1024, True, True)]
# (model, px, checkpointing, fp8, offloaded blocks): FLUX.1-dev over fp8 weights with 35 of its 57 blocks in CPU
# memory, as the flux-dev-12gb preset trains it (what sd-scripts' --blocks_to_swap 16 moves for 12 GB)
OFFLOAD_ROWS = [("flux1", 1024, True, True, 35)]
# FLUX.2 klein 4B (3.9 B parameters, 7.8 GB in bf16) at 1024 px, as the klein-4b-12gb preset trains it
MEMORY_ROWS += [("klein4b", 1024, True, False)]


def memory() -> list[tuple[str, str, str]]:
    from bench_memory import run_row
    rows = []
    for model, px, checkpointing, fp8, offload in [(*row, 0) for row in MEMORY_ROWS] + OFFLOAD_ROWS:
        what = (f"{model} {px} px, {'with' if checkpointing else 'without'} checkpointing"
                f"{', fp8 base' if fp8 else ''}{f', {offload} blocks offloaded' if offload else ''}")
        try:
            r = run_row(model, px, 1, "cuda", checkpointing, fp8, offload)
        except SystemExit as e:  # run_row's report of a failed child (out of memory, say)
            rows.append((what, "FAILED", str(e).strip().splitlines()[-1][:160]))
            continue
        rows.append((what, "ok", f"weights {r['weights_gb']:.2f} GB, step peak {r['step_peak_gb']:.2f} GB, "
                                 f"step {r['step_s']:.2f} s (forward {r['forward_s']:.2f} s)"))
    return rows


def block_offload(root: Path) -> list[tuple[str, str, str]]:
    """precision.offload_blocks on CUDA (side-stream prefetch, pinned copies): the tiny FLUX.1 of the tests trained
    with 3 of its 4 blocks offloaded against the same run without, in bf16 with checkpointing."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_flux import make_tiny_flux
    from trainer.formats import load_adapter
    model = make_tiny_flux(root / "tiny-flux")
    common = [f"model.path={model}", "dataset.resolution=32", "model.t5_length=16", "precision.mixed=bf16",
              "precision.gradient_checkpointing=true", "network.unet_targets=['attention', 'feed_forward']"]
    results = [train(name, common + extra, root) for name, extra in
               (("flux-plain", []), ("flux-offload", ["precision.offload_blocks=3"]))]
    if any(result != "ok" for result, _ in results):
        return [("tiny FLUX, 3 of 4 blocks offloaded", "FAILED", " / ".join(d for _, d in results))]
    a, b = (load_adapter(str(next(root.glob(f"{n}-*/{n}.safetensors")))) for n in ("flux-plain", "flux-offload"))
    worst = max(float((a.layers[k].up @ a.layers[k].down - b.layers[k].up @ b.layers[k].down).abs().max()
                      / (a.layers[k].up @ a.layers[k].down).abs().max()) for k in a.layers)
    return [("tiny FLUX, 3 of 4 blocks offloaded vs none (bf16)", "ok" if worst < 1e-2 else "FAILED",
             f"largest delta difference {worst:.1e} of the delta; {results[1][1]}")]


def data_parallel(root: Path) -> list[tuple[str, str, str]]:
    import torch
    if torch.cuda.device_count() < 2:
        return [("2-GPU DDP", "skipped", f"{torch.cuda.device_count()} GPU on this machine")]
    one = train("dp1", ["precision.mixed=bf16", "dataset.batch_size=4"], root)
    two = train("dp2", ["precision.mixed=bf16", "dataset.batch_size=2"], root, processes=2)
    return [("1 GPU, batch 4", *one), ("2-GPU DDP (NCCL), batch 2 each", *two)]


def table(rows: list[tuple[str, str, str]]) -> str:
    import torch
    name = torch.cuda.get_device_name(0)
    lines = ["### GPU check (bench/gpu_check.py)", "",
             f"{torch.cuda.device_count()} x {name}, torch {torch.__version__}, CUDA {torch.version.cuda}.", "",
             "| check | result | detail |", "|---|---|---|"]
    lines += [f"| {what} | {result} | {detail} |" for what, result, detail in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", action="store_true", help="put the table into docs/benchmarks.md")
    ap.add_argument("--skip-memory", action="store_true", help="only the trainings and DDP (under a minute)")
    args = ap.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); nothing to check")
        return 0
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        rows = trainings(Path(tmp)) + block_offload(Path(tmp)) + ([] if args.skip_memory else memory()) \
            + data_parallel(Path(tmp))
    text = table(rows)
    print(text)
    if args.write:
        write_section("gpu_check", text)
    return 1 if any(result == "FAILED" for _, result, _ in rows) else 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
