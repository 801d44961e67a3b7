"""Save a PNG of each tab (dataset.png, train.png, generate.png) for the README, from a real session.

    python tools/screenshots.py [--out docs/screenshots] [--steps 60]

Copies examples/demo-concept into a scratch workspace, trains a run of the tiny-demo preset on the tiny built-in
model through the engine's public API, starts launch.py there and drives Debian's Chromium headless. The app runs in
the workspace with relative folders, so the pictures show no path of this machine.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from browser import CHROMIUM, CHROMIUM_ARGS, pick, set_number  # noqa: E402  (tools/browser.py)

PROMPT = "a zqx circle on a blue background"


def train(work: Path, model: str, steps: int | None) -> Path:
    """A run of the tiny-demo preset on the demo dataset copied into the workspace, waited for to the end."""
    import trainer as T
    mine = T.default_config(model, str(work / "runs"))
    mine.dataset.path = str(work / "datasets" / "demo-concept")
    mine.sampling.prompts = T.load_preset("tiny-demo").sampling.prompts  # the demo's own, for its own dataset
    cfg, _ = T.apply_preset(mine, "tiny-demo")
    cfg.run.name = "zqx-pink"
    if steps:  # a shorter run than the preset's, for a quick look at the layout
        cfg.schedule.max_steps, cfg.sampling.every_n_steps = steps, max(1, steps // 2)
        cfg.schedule.warmup_steps = min(cfg.schedule.warmup_steps, steps // 2)
    job = T.start_run(cfg)
    job.wait()
    info = T.run_info(job.run_dir)
    if info.state != "finished":
        sys.exit(f"the run {info.state}: {info.error}\n{(job.run_dir / 'train.log').read_text()[-3000:]}")
    T.load_adapter(info.adapter_path)  # the Generate tab will need it: fail here, plainly, if it does not read
    return job.run_dir


def serve(work: Path, model: str) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    log = open(work / "server.log", "w")
    flags = ["--base-model", model] if model else []  # empty: the built-in model, shown as an empty box
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), "--no-browser", "--port", "7870", *flags],
                            cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    for _ in range(300):
        match = re.search(r"Running on local URL:\s+(\S+)", (work / "server.log").read_text())
        if match:
            urllib.request.urlopen(match.group(1), timeout=10).read()
            return proc, match.group(1)
        time.sleep(0.2)
    proc.terminate()
    sys.exit("the app did not start:\n" + (work / "server.log").read_text())


def shoot(url: str, out: Path, run_name: str) -> None:
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1440, "height": 1100}, device_scale_factor=1)
        page.set_default_timeout(60_000)
        try:
            drive(page, url, out, run_name)
        except Exception:
            failed = Path(tempfile.gettempdir()) / "loradesk-screenshots-failed.png"
            page.screenshot(path=str(failed), full_page=True)
            toasts = page.locator(".toast-body").all_inner_texts()
            print(f"failed; the page is in {failed}; messages: {toasts}", file=sys.stderr)
            raise
        finally:
            browser.close()


def drive(page, url: str, out: Path, run_name: str) -> None:
    page.goto(url)
    page.locator("#dataset-gallery .thumbnail-item").nth(3).wait_for()
    page.locator("#dataset-gallery .thumbnail-item").nth(1).click()
    page.locator("#caption-preview img").wait_for()
    page.wait_for_timeout(800)
    page.screenshot(path=str(out / "dataset.png"), full_page=True)

    page.get_by_role("tab", name="2. Train").click()
    pick(page, "train-dataset", "demo-concept")
    pick(page, "preset-picker", "tiny-demo")
    pick(page, "run-picker", run_name)
    page.get_by_role("button", name="Follow").click()
    page.wait_for_function("document.querySelector('#train-status').innerText.includes('finished')")
    page.locator("#train-samples img").first.wait_for()
    page.wait_for_timeout(1500)
    page.screenshot(path=str(out / "train.png"), full_page=True)

    page.get_by_role("tab", name="3. Generate").click()
    pick(page, "slot-0-adapter", "(final)")
    page.locator("#gen-prompt textarea").fill(PROMPT)
    for elem_id, value in [("gen-steps", 20), ("gen-guidance", 4), ("gen-width", 64), ("gen-height", 64),
                           ("gen-count", 4)]:
        set_number(page, elem_id, value)
    page.locator("#gen-btn").click()
    page.wait_for_function("document.querySelectorAll('#gen-gallery img').length >= 4 || "
                           "document.querySelector('.toast-body')", timeout=300_000)
    if page.locator(".toast-body").count():
        raise RuntimeError("generation failed: " + " ".join(page.locator(".toast-body").all_inner_texts()))
    page.wait_for_timeout(1000)
    page.screenshot(path=str(out / "generate.png"), full_page=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    ap.add_argument("--steps", type=int, default=None,
                    help="training steps of the run shown (default: the tiny-demo preset's, so it learns the concept)")
    ap.add_argument("--base-model", default="", help="base model folder (default: the tiny built-in model)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="loradesk-shots-") as tmp:
        work = Path(tmp)
        shutil.copytree(ROOT / "examples" / "demo-concept", work / "datasets" / "demo-concept")
        model = args.base_model
        run_dir = train(work, model, args.steps)
        proc, url = serve(work, model)
        try:
            shoot(url, args.out, run_dir.name)
        except Exception:
            print((work / "server.log").read_text()[-3000:], file=sys.stderr)
            raise
        finally:
            proc.terminate()
            proc.wait(20)
    print(f"wrote {', '.join(p.name for p in sorted(args.out.glob('*.png')))} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
