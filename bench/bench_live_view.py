#!/usr/bin/env python
"""Benchmark: what an open Train tab costs: app server and browser CPU, and the speed of a training beside it.

Starts launch.py (from --app-root, so an older checkout can be measured the same way, side by side), opens the
Train tab in Debian's Chromium (headless) and reads CPU seconds from /proc:
1. idle: a long finished run in the runs folder (2000 loss points, 4 sample sets), the tab open, then closed;
2. training: a CLI run of the tiny model beside the open tab and with no tab, alternated, its steps per second
   read from its own events.

    python bench/bench_live_view.py [--app-root DIR] [--seconds 20] [--steps 120] [--rounds 2]

Prints a markdown table. Times are shares of one core (CPU seconds per wall second) and medians over rounds.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from browser import CHROMIUM, CHROMIUM_ARGS  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICK


def chromium_pids() -> list[int]:
    out = []
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if "chrom" in comm.read_text():
                out.append(int(comm.parent.name))
        except OSError:
            continue
    return out


def fake_finished_run(runs: Path, samples_from: Path) -> None:
    """A run folder as a long finished run leaves it: 2000 progress events and 4 sample sets."""
    run = runs / "long-20260101-000000"
    (run / "samples").mkdir(parents=True)
    (run / "config.toml").write_text('schema_version = 1\n[run]\nname = "long"\n')
    pictures = sorted(samples_from.glob("*.png"))
    events = [{"type": "started", "run_dir": str(run), "total_steps": 2000, "start_step": 0, "num_images": 12,
               "pid": 0, "time": 1.0}]
    for step in range(1, 2001):
        events.append({"type": "progress", "step": step, "total_steps": 2000, "loss": 0.1 + (step % 7) / 70,
                       "lr": 1e-4, "it_per_s": 2.0, "eta_s": 0.0, "epoch": 0, "time": 1.0 + step})
        if step % 500 == 0:
            paths = []
            for i in range(2):
                shutil.copy(pictures[i], run / "samples" / f"step-{step:06d}-{i}.png")
                paths.append(str(run / "samples" / f"step-{step:06d}-{i}.png"))
            events.append({"type": "sample", "step": step, "paths": paths, "prompts": ["one", "two"],
                           "time": 1.0 + step})
    events.append({"type": "finished", "step": 2000, "adapter_path": str(run / "long.safetensors"),
                   "stopped": False, "time": 2002.0})
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))


def serve(app_root: Path, work: Path, port: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(app_root), HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    log = open(work / "server.log", "w")
    proc = subprocess.Popen([sys.executable, str(app_root / "launch.py"), "--no-browser", "--port", str(port),
                             "--runs-dir", str(work / "runs"), "--data-dir", str(work / "datasets"),
                             "--adapters-dir", str(work / "adapters")], cwd=work, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    for _ in range(600):
        match = re.search(r"Running on local URL:\s+(\S+)", (work / "server.log").read_text())
        if match:
            urllib.request.urlopen(match.group(1), timeout=10).read()
            proc.url = match.group(1)
            return proc
        time.sleep(0.2)
    raise SystemExit("the app did not start:\n" + (work / "server.log").read_text())


def measure(seconds: float, server: int) -> tuple[float, float]:
    """(server, browser) CPU as shares of one core over `seconds`."""
    s0, b0 = cpu_seconds([server]), cpu_seconds(chromium_pids())
    time.sleep(seconds)
    return (cpu_seconds([server]) - s0) / seconds, (cpu_seconds(chromium_pids()) - b0) / seconds


def train(app_root: Path, work: Path, steps: int, tag: str, server: int) -> tuple[float, float, float]:
    """A CLI run of the tiny model: (its steps per second, server CPU share, browser CPU share) while it ran."""
    env = dict(os.environ, PYTHONPATH=str(app_root), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    sets = [f"dataset.path={ROOT / 'examples' / 'demo-concept'}", "dataset.resolution=64", "dataset.batch_size=1",
            f"schedule.max_steps={steps}", f"sampling.every_n_steps={steps // 3}", "sampling.steps=10",
            f"saving.runs_dir={work / 'runs'}", f"run.name=bench-{tag}", "network.rank=4"]
    cmd = [sys.executable, "-m", "trainer", "train", "--quiet"] + [x for s in sets for x in ("--set", s)]
    s0, b0, t0 = cpu_seconds([server]), cpu_seconds(chromium_pids()), time.time()
    subprocess.run(cmd, cwd=app_root, env=env, check=True, capture_output=True)
    wall = time.time() - t0
    run = max((work / "runs").glob(f"bench-{tag}-*"), key=lambda p: p.stat().st_mtime)
    times = [json.loads(line)["time"] for line in (run / "events.jsonl").read_text().splitlines()
             if '"progress"' in line]
    rate = (len(times) - 1) / (times[-1] - times[0])
    return rate, (cpu_seconds([server]) - s0) / wall, (cpu_seconds(chromium_pids()) - b0) / wall


def open_train_tab(browser, url: str):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url)
    page.get_by_role("tab", name="2. Train").click()
    page.wait_for_timeout(5000)  # the first render and its loads
    return page


def run(args) -> dict:
    from playwright.sync_api import sync_playwright
    app_root = Path(args.app_root).resolve()
    with tempfile.TemporaryDirectory(prefix="loradesk-bench-live-") as tmp:
        work = Path(tmp)
        fake_finished_run(work / "runs", ROOT / "examples" / "demo-concept")
        server = serve(app_root, work, args.port)
        result = {"idle_open": [], "idle_closed": [], "train_open": [], "train_closed": []}
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
                for r in range(args.rounds):
                    page = open_train_tab(browser, server.url)
                    result["idle_open"].append(measure(args.seconds, server.pid))
                    result["train_open"].append(train(app_root, work, args.steps, f"open{r}", server.pid))
                    page.close()
                    time.sleep(3)
                    result["idle_closed"].append(measure(args.seconds, server.pid))
                    result["train_closed"].append(train(app_root, work, args.steps, f"closed{r}", server.pid))
                browser.close()
        finally:
            server.terminate()
            server.wait(20)
    return result


def table(label: str, result: dict) -> str:
    def med(key, i):
        return statistics.median(x[i] for x in result[key])
    return (f"| {label} | {med('idle_open', 0):.1%} / {med('idle_open', 1):.1%} | "
            f"{med('idle_closed', 0):.1%} | {med('train_open', 1):.1%} / {med('train_open', 2):.1%} | "
            f"{med('train_open', 0):.2f} | {med('train_closed', 0):.2f} | "
            f"{med('train_open', 0) / med('train_closed', 0):.3f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--app-root", default=str(ROOT), help="the checkout whose app and trainer are measured")
    ap.add_argument("--label", default=None, help="the row's name (default: the checkout's commit)")
    ap.add_argument("--seconds", type=float, default=20.0, help="length of each idle window")
    ap.add_argument("--steps", type=int, default=120, help="steps of each training run")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--port", type=int, default=7931)
    args = ap.parse_args(argv)
    label = args.label or subprocess.run(["git", "-C", args.app_root, "rev-parse", "--short", "HEAD"],
                                         capture_output=True, text=True).stdout.strip()
    result = run(args)
    print("| app | idle, Train tab open: server / browser | idle, no tab: server | training, tab open: server / "
          "browser | it/s, tab open | it/s, no tab | ratio |")
    print("|---|---|---|---|---|---|---|")
    print(table(label, result))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
