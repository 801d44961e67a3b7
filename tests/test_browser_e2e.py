"""The whole loop in a real browser: Playwright drives Debian's Chromium (headless) through the app.

Upload 4 images, caption one, train a few steps on a tiny base model, watch the progress reach the end, generate at
adapter weights 0 and 1 (different images), download the adapter and load it.
"""
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from browser import pick, set_number

pytestmark = pytest.mark.browser
ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def browser_or_skip():
    """Skip where the browser is missing, except in CI (LORADESK_REQUIRE_BROWSER=1), where that is a failure."""
    missing = pytest.fail if os.environ.get("LORADESK_REQUIRE_BROWSER") == "1" else pytest.skip
    if not Path(CHROMIUM).exists():
        missing(f"{CHROMIUM} is missing: apt-get install -y chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("the playwright package is missing: pip install playwright (never `playwright install`)")
    return sync_playwright


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def app_server(tmp_path, tiny_model_dir):
    """launch.py in a subprocess on a free port, with its folders under tmp_path and the tiny test model."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    cmd = [sys.executable, str(ROOT / "launch.py"), "--no-browser", "--port", str(port),
           "--data-dir", str(tmp_path / "datasets"), "--runs-dir", str(tmp_path / "runs"),
           "--adapters-dir", str(tmp_path / "adapters"), "--base-model", str(tiny_model_dir)]
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    start = time.time()
    try:
        url = wait_for_url(tmp_path / "server.log", proc)
        yield url, tmp_path, time.time() - start
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()


def wait_for_url(log_path: Path, proc, timeout: float = 60) -> str:
    end = time.time() + timeout
    while time.time() < end:
        match = re.search(r"Running on local URL:\s+(\S+)", log_path.read_text())
        if match:
            urllib.request.urlopen(match.group(1), timeout=10).read()
            return match.group(1)
        if proc.poll() is not None:
            raise AssertionError(f"the app exited:\n{log_path.read_text()}")
        time.sleep(0.2)
    raise AssertionError(f"the app did not start in {timeout}s:\n{log_path.read_text()}")


def gallery_image_bytes(page, elem_id: str, previous: str | None = None, timeout_ms: int = 90_000) -> tuple[str, bytes]:
    img = page.locator(f"#{elem_id} img").first
    page.wait_for_function(
        """([sel, prev]) => { const i = document.querySelector(sel); return i && i.src && i.src !== prev; }""",
        arg=[f"#{elem_id} img", previous or ""], timeout=timeout_ms)
    src = img.get_attribute("src")
    return src, page.request.get(src).body()


def test_upload_caption_train_generate_download(app_server, image_dir):
    sync_playwright = browser_or_skip()
    url, workdir, startup_s = app_server
    print(f"first page served {startup_s:.1f}s after launch")
    images = sorted(image_dir.glob("*.png"))
    assert len(images) == 4
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
        page.set_default_timeout(30_000)
        page.goto(url)

        # 1. Dataset: create, upload through the file input, caption one image
        page.locator("#new-dataset textarea, #new-dataset input").first.fill("e2e")
        page.locator("#create-dataset").click()
        page.wait_for_function("document.querySelector('#dataset-picker input').value === 'e2e'")
        page.locator("#dataset-upload input[type=file]").set_input_files([str(p) for p in images])
        page.locator("#dataset-gallery .thumbnail-item").nth(3).wait_for()
        assert page.locator("#dataset-gallery .thumbnail-item").count() == 4
        page.locator("#dataset-gallery .thumbnail-item").first.click()
        page.locator("#caption-preview img").wait_for()
        page.locator("#caption-box textarea").fill("zqx, a red square")
        page.locator("#save-caption").click()
        page.get_by_text("Saved the caption of img0.png.").wait_for()
        dataset = workdir / "datasets" / "e2e"
        assert (dataset / "img0.txt").read_text().strip() == "zqx, a red square"
        assert len(list(dataset.glob("*.png"))) == 4

        # 2. Train: pick the dataset, a short run at a tiny resolution, wait for the end
        page.get_by_role("tab", name="2. Train").click()
        pick(page, "train-dataset", "e2e")
        page.wait_for_function("document.querySelector('#field-dataset-path textarea, #field-dataset-path input')"
                               ".value.endsWith('e2e')")
        set_number(page, "field-network-rank", 0)  # a bad value is shown next to its field before anything starts
        page.locator("#error-network-rank").get_by_text("network.rank is 0; it must be at least 1").wait_for()
        for elem_id, value in [("field-dataset-resolution", 32), ("field-schedule-max_steps", 3),
                               ("field-network-rank", 4), ("field-network-alpha", 4),
                               ("field-optimizer-unet_lr", 0.01)]:
            set_number(page, elem_id, value)
        page.get_by_text("Ready to start.").wait_for()
        assert not page.locator("#error-network-rank").is_visible()
        page.locator("#start-btn").click()
        page.locator('#train-progress [aria-valuenow="100"]').wait_for(timeout=120_000)
        page.wait_for_function("document.querySelector('#train-status').innerText.includes('finished')",
                               timeout=30_000)
        run_dir = next((workdir / "runs").iterdir())

        # 3. Generate at weights 0 and 1 with the new adapter
        page.get_by_role("tab", name="3. Generate").click()
        pick(page, "slot-0-adapter", "(final)")
        page.locator("#gen-prompt textarea").fill("zqx, a red square")
        for elem_id, value in [("gen-steps", 2), ("gen-width", 64), ("gen-height", 64), ("slot-0-weight", 0)]:
            set_number(page, elem_id, value)
        page.locator("#gen-btn").click()
        src0, at_zero = gallery_image_bytes(page, "gen-gallery")
        set_number(page, "slot-0-weight", 1)
        page.locator("#gen-btn").click()
        _, at_one = gallery_image_bytes(page, "gen-gallery", previous=src0)
        assert at_zero[:8] == b"\x89PNG\r\n\x1a\n" and at_zero != at_one

        # 4. Download the adapter (kohya, fp16) and load it
        page.get_by_role("tab", name="2. Train").click()
        pick(page, "run-picker", run_dir.name)
        page.locator("#export-btn").click()
        link = page.locator("#run-download a").first
        link.wait_for()
        with page.expect_download() as info:
            link.click()
        saved = workdir / "downloaded.safetensors"
        info.value.save_as(saved)
        browser.close()

    from trainer.formats import load_adapter
    adapter = load_adapter(saved)
    assert adapter.layers and all(layer.rank == 4 for layer in adapter.layers.values())
