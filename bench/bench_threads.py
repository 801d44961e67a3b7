#!/usr/bin/env python
"""Benchmark: a CPU training step on a busy machine, with torch's default threads (one per core: what loradesk did
before issue 23) and with the count a run now records when it starts (trainer/threads.py: the cores others leave
free, kept for the run and its resumes).

Each setting runs in a fresh process (OpenMP reads its settings once): the shipped tiny model with the trainer's
default LoRA, one step = UNet forward at 64 px, loss, backward and AdamW, after one warm-up step repeated until 20
steps or 15 s (at least 1). Both settings run twice, first beside nothing this script started ("quiet": other
people's programs may still run; the load average is in the table), then beside `--busy` processes that spin on the
CPU, started and stopped by this script, the settings alternated within each phase. Keep it short: the busy phase
slows everyone on the machine.

    python bench/bench_threads.py             # about 3 minutes on 2 shared cores
    python bench/bench_threads.py --write     # also put the table into docs/benchmarks.md
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from docs_section import write_section  # noqa: E402  (bench/ is the script's folder)

SETTINGS = {"old": "torch's default: one thread per core (before)",
            "new": "the count picked when the run starts (trainer/threads.py)"}

WORKER = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[2])
import torch
from trainer import TrainConfig, load_base_model
from trainer.network import inject_lora
from trainer.threads import pick_cpu_threads, use_cpu_threads
if sys.argv[1] == "new":
    use_cpu_threads(torch, pick_cpu_threads())  # what runs.resolved_config records and the loop applies
base = load_base_model("")
params = inject_lora(base, TrainConfig())
with torch.no_grad():
    cond = base.conditioning(base.encode_text(["a zqx circle"]), [None])
latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
optimizer = torch.optim.AdamW(list(params.named().values()), lr=1e-4)

def step():
    out = base.predict(latents, torch.tensor([500]), cond)
    torch.nn.functional.mse_loss(out, latents).backward()
    optimizer.step()
    optimizer.zero_grad()

step()  # warm-up
used, t0, c0, n = set(), time.perf_counter(), time.process_time(), 0
while n < 1 or (n < 20 and time.perf_counter() - t0 < 15):
    step()
    used.add(torch.get_num_threads())
    n += 1
print(json.dumps({"wall": (time.perf_counter() - t0) / n, "cpu": (time.process_time() - c0) / n, "steps": n,
                  "threads": sorted(used)}))
"""


def run_worker(setting: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", WORKER, setting, str(ROOT)], env=env, capture_output=True, text=True,
                         timeout=600)
    if out.returncode != 0:
        raise SystemExit(f"the {setting} worker failed:\n{out.stderr[-2000:]}")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["load"] = os.getloadavg()[0]
    return row


def phase(busy: int) -> dict[str, dict]:
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    try:
        time.sleep(3 if busy else 0)  # the spinners are running before the first worker starts
        order = list(SETTINGS) if busy else list(SETTINGS)[::-1]
        return {s: run_worker(s) for s in order}
    finally:
        for p in spinners:
            p.kill()
            p.wait()


def cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "CPU"


def table(quiet: dict, busy: dict, n_busy: int, cores: int) -> str:
    head = (f"{platform.machine()}, {cores} usable cores ({cpu_model()}), torch "
            f"{__import__('torch').__version__}; the shipped tiny model, one LoRA step at 64 px (forward, backward, "
            f"AdamW), wall seconds per step (CPU seconds of the process in brackets). Quiet: nothing started by the "
            f"bench (other programs on the machine still ran); busy: {n_busy} spinning processes beside it. Load: the "
            f"1-minute load average after the run.\n\n")
    rows = ["| setting | threads quiet / busy | quiet: s/step | load | busy: s/step | load | busy / quiet |",
            "|---|---|---|---|---|---|---|"]
    for s, what in SETTINGS.items():
        q, b = quiet[s], busy[s]
        rows.append(f"| {what} | {q['threads']} / {b['threads']} | {q['wall']:.3f} ({q['cpu']:.3f}) | "
                    f"{q['load']:.1f} | {b['wall']:.3f} ({b['cpu']:.3f}) | {b['load']:.1f} | "
                    f"{b['wall'] / q['wall']:.1f}x |")
    ratio = busy["old"]["wall"] / busy["new"]["wall"]
    tail = (f"\n\nBusy, the picked count is {ratio:.1f}x faster than the old default. Reading: with one thread per "
            f"core, the threads wait at the end of every operation for one that is off its core, so the process "
            f"burns CPU and gets little done; with the free cores' count it slows about as much as its share of the "
            f"cores shrinks. On an idle machine the pick is every core, as torch's default. The count is picked once "
            f"and kept for the run (a count that followed the load would change the last bits of its sums).")
    return head + "\n".join(rows) + tail


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--busy", type=int, default=None, help="spinning processes in the busy phase (default 2 x cores)")
    p.add_argument("--write", action="store_true", help="put the table into docs/benchmarks.md")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(1))  # `timeout` still stops the spinners (finally)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    n_busy = args.busy if args.busy is not None else 2 * cores
    quiet = phase(0)
    print("quiet:", quiet, flush=True)
    busy = phase(n_busy)
    print("busy:", busy, flush=True)
    text = "### A CPU training step on a busy machine (bench/bench_threads.py)\n\n" + table(quiet, busy, n_busy, cores)
    print(text)
    if args.write:
        write_section("bench_threads", text)


if __name__ == "__main__":
    main()
