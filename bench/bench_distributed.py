#!/usr/bin/env python
"""Benchmark: data-parallel CPU processes against one process with the same cores, on the built-in tiny model.

Three runs of the same global batch, side by side in one session:
  A  1 process  x 2 threads, batch_size 4
  B  2 processes x 1 thread, batch_size 2 each (gloo all-reduce of the LoRA gradients through DDP)
  C  1 process  x 1 thread, batch_size 2 (the work each process of B does, alone)
Step time is the median interval between progress events after a warm-up; B's communication overhead per step is
its step time less C's (same compute per process, no all-reduce, no broadcast of the commands).

    python bench/bench_distributed.py [--steps 40] [--write]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from docs_section import write_section  # noqa: E402  (bench/ is the script's folder)
RUNS = [("A", 1, 2, 4), ("B", 2, 1, 2), ("C", 1, 1, 2)]  # name, processes, threads per process, batch_size


def run(name: str, processes: int, threads: int, batch: int, steps: int, root: Path) -> dict:
    from trainer.events import Progress, read_events
    sets = [f"dataset.batch_size={batch}",
            f"schedule.max_steps={steps}", "precision.device=cpu", f"saving.runs_dir={root}", f"run.name={name}",
            "dataset.cache_latents=memory"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "trainer", "train", "--quiet", "--config", "tiny-demo", "--num-processes",
           str(processes)]
    subprocess.run(cmd + [x for s in sets for x in ("--set", s)], check=True, env=env, cwd=ROOT)
    run_dir = next(p for p in root.iterdir() if p.name.startswith(name + "-"))
    times = [e.time for e in read_events(run_dir / "events.jsonl") if isinstance(e, Progress)]
    gaps = [b - a for a, b in zip(times, times[1:])][5:]  # after a warm-up (latent cache filling)
    step = statistics.median(gaps)
    return {"name": name, "processes": processes, "threads": threads, "batch": batch, "step_s": step,
            "images_per_s": batch * processes / step}


def table(rows: list[dict]) -> str:
    by = {r["name"]: r for r in rows}
    lines = ["### Data parallel on the CPU (bench/bench_distributed.py)", "",
             f"The tiny-demo preset (built-in tiny model, 64 px, UNet and text-encoder LoRA), global batch 4, {os.cpu_count()} cores, medians of the step "
             f"intervals after 5 warm-up steps, one session.", "",
             "| run | processes x threads | batch per process | step | images/s |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['processes']} x {r['threads']} | {r['batch']} | {1000 * r['step_s']:.0f} ms "
                     f"| {r['images_per_s']:.1f} |")
    overhead = by["B"]["step_s"] - by["C"]["step_s"]
    lines += ["", f"B against A (the same cores): {by['A']['step_s'] / by['B']['step_s']:.2f}x the speed. "
                  f"Communication overhead per step (B less C): {1000 * overhead:.0f} ms "
                  f"({100 * overhead / by['B']['step_s']:.0f}% of B's step)."]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--write", action="store_true", help="put the table into docs/benchmarks.md")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-dp-") as tmp:
        rows = [run(*spec, args.steps, Path(tmp)) for spec in RUNS]
    text = table(rows)
    print(text)
    if args.write:
        write_section("bench_distributed", text)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
