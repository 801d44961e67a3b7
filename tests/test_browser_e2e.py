"""The whole loop in a real browser: Playwright drives Debian's Chromium (headless) through the app.

Upload images (one broken), caption one, set the trigger, train a few steps with samples on a tiny base model,
watch the progress and the sample history, upload a bad adapter and then a good one (every widget still usable),
generate at adapter weights 0 and 1, export a blend with the fields as the page shows them, download the adapter.
And the job queue: add a training to it from the Train tab, start it from the Queue tab, see the job done.
"""
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

from browser import CHROMIUM, CHROMIUM_ARGS, options, pick, set_number  # noqa: E402

pytestmark = pytest.mark.browser


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


def no_error_pills(page) -> None:
    """A failed action must not turn widgets into Gradio's red 'Error' status pills."""
    assert page.locator(".error").filter(has_text=re.compile(r"^\s*Error\s*$")).count() == 0


def no_errors_shown(page) -> None:
    """No 'Error' pill and no error toast (Gradio's `[data-testid=toast-body]` of class `error`: what a handler
    whose output Gradio could not postprocess shows, e.g. "'list' object has no attribute 'expandtabs'")."""
    no_error_pills(page)
    toasts = page.locator('[data-testid="toast-body"].error')
    assert toasts.count() == 0, toasts.all_inner_texts()
    assert page.get_by_text("Could not postprocess").count() == 0


def press_command(page, button: str, reply: str) -> None:
    """Press one of the run's command buttons; its reply lands in the status line and nothing shows an error."""
    page.locator(f"#{button}").click()
    answered = page.locator("#form-status").get_by_text(reply)
    answered.or_(page.locator('[data-testid="toast-body"].error')).first.wait_for()  # the reply, or an error
    no_errors_shown(page)
    assert answered.is_visible()


def dataset_steps(page, workdir: Path, images: list[Path]) -> None:
    page.locator("#new-dataset textarea, #new-dataset input").first.fill("e2e")
    page.locator("#create-dataset").click()
    page.wait_for_function("document.querySelector('#dataset-picker input').value === 'e2e'")
    broken = workdir / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n but then nothing")
    page.locator("#dataset-upload input[type=file]").set_input_files([str(p) for p in images] + [str(broken)])
    page.get_by_text(re.compile(r"Added 4 image\(s\).*skipped 1: broken\.png")).wait_for()
    page.locator("#dataset-gallery .thumbnail-item").nth(3).wait_for()
    assert page.locator("#dataset-gallery .thumbnail-item").count() == 4, "the broken upload is not a blank tile"
    page.get_by_text("0 captioned, 4 without caption").wait_for()
    page.locator("#dataset-gallery .thumbnail-item").first.click()
    page.locator("#caption-preview img").wait_for()
    page.locator("#caption-box textarea").fill("a red square")
    page.locator("#save-caption").click()
    page.get_by_text("Saved the caption of img0.png.").wait_for()
    page.get_by_text("1 captioned, 3 without caption").wait_for()  # the summary follows the edit
    page.locator("#dataset-trigger textarea, #dataset-trigger input").first.fill("zqx")
    page.locator("#save-trigger").click()
    page.get_by_text("The trigger of e2e is zqx").wait_for()
    dataset = workdir / "datasets" / "e2e"
    assert (dataset / "img0.txt").read_text().strip() == "a red square"
    assert sorted(p.name for p in dataset.glob("*.png")) == [f"img{i}.png" for i in range(4)]


def train_steps(page, workdir: Path) -> Path:
    page.get_by_role("tab", name="2. Train").click()
    pick(page, "train-dataset", "e2e")
    page.wait_for_function("document.querySelector('#field-dataset-path textarea, #field-dataset-path input')"
                           ".value.endsWith('e2e')")
    page.locator("#train-trigger").get_by_text("zqx").wait_for()
    set_number(page, "field-network-rank", 0)  # a bad value is shown next to its field before anything starts
    page.locator("#error-network-rank").get_by_text("network.rank is 0; it must be at least 1").wait_for()
    for elem_id, value in [("field-dataset-resolution", 32), ("field-schedule-max_steps", 400),
                           ("field-network-rank", 4), ("field-network-alpha", 4), ("field-optimizer-unet_lr", 0.01),
                           ("field-sampling-every_n_steps", 3)]:
        set_number(page, elem_id, value)
    page.locator("#field-sampling-prompts textarea").fill("zqx, a red square\na blue square")
    page.locator("#field-sampling-prompts textarea").press("Tab")
    page.get_by_text("Ready to start.").wait_for()
    assert not page.locator("#error-network-rank").is_visible()
    page.locator("#start-btn").click()
    run_dir = command_steps(page, workdir)
    _, grid = gallery_image_bytes(page, "train-samples")  # the sample history: a row per step, labelled
    from io import BytesIO
    from PIL import Image
    from trainer import SampleWritten, read_events
    rows = Image.open(BytesIO(grid)).size[1] // 160
    sampled = {e.step for e in read_events(run_dir / "events.jsonl") if isinstance(e, SampleWritten)}
    assert rows == len(sampled) >= 2, f"each sample set is a row of the history: {rows} rows, steps {sampled}"
    return run_dir


def command_steps(page, workdir: Path) -> Path:
    """Issue 23: the three command buttons pressed while the run trains, each answered in the status line with no
    error shown; Stop ends the run (400 steps planned) with its adapter."""
    status = "document.querySelector('#train-status').innerText"
    page.wait_for_function(f"{status}.includes('is running') && / step [1-9]/.test({status})", timeout=120_000)
    press_command(page, "sample-btn", "Samples will be rendered after the current step.")
    press_command(page, "save-btn", "A checkpoint will be written after the current step.")
    page.wait_for_function(f"{status}.includes('checkpoint at step')", timeout=60_000)  # the save was done
    page.wait_for_function("document.querySelector('#sample-prompts').innerText.includes('a blue square')")
    press_command(page, "stop-btn", "Stopping after the current step; the adapter so far will be saved.")
    page.wait_for_function(f"{status}.includes('is stopped')", timeout=60_000)
    no_errors_shown(page)
    run_dir = next((workdir / "runs").iterdir())
    from trainer import CheckpointWritten, read_events, run_info
    saved = {e.step for e in read_events(run_dir / "events.jsonl") if isinstance(e, CheckpointWritten)}
    info = run_info(run_dir)
    assert info.state == "stopped" and info.step < 400 and info.adapter_path
    assert min(saved) < info.step, f"the save button's checkpoint came before the stop's: {saved}, {info.step}"
    return run_dir


def generate_steps(page, workdir: Path, run_dir: Path) -> None:
    page.get_by_role("tab", name="3. Generate").click()
    junk = workdir / "upload" / "junk.safetensors"
    junk.parent.mkdir()
    junk.write_bytes(b"not an adapter")
    page.locator("#adapter-upload input[type=file]").set_input_files(str(junk))
    page.locator("#gen-status").get_by_text("junk.safetensors could not be used as a LoRA adapter").wait_for()
    assert str(workdir) not in page.locator("#gen-status").inner_text(), "no server paths in messages"
    no_error_pills(page)
    good = workdir / "upload" / "mine.safetensors"
    good.write_bytes((run_dir / "lora.safetensors").read_bytes())
    page.locator("#adapter-upload input[type=file]").set_input_files(str(good))
    page.locator("#gen-status").get_by_text("Added mine.safetensors").wait_for()
    no_error_pills(page)
    assert any("uploaded: mine.safetensors" in o for o in options(page, "slot-1-adapter")), "slots still usable"
    pick(page, "slot-0-adapter", "(stopped at step")
    page.locator("#gen-prompt textarea").fill("zqx, a red square")
    for elem_id, value in [("gen-steps", 2), ("gen-width", 64), ("gen-height", 64), ("slot-0-weight", 0)]:
        set_number(page, elem_id, value)
    page.locator("#gen-btn").click()
    src0, at_zero = gallery_image_bytes(page, "gen-gallery")
    set_number(page, "slot-0-weight", 1)
    page.locator("#gen-btn").click()
    _, at_one = gallery_image_bytes(page, "gen-gallery", previous=src0)
    assert at_zero[:8] == b"\x89PNG\r\n\x1a\n" and at_zero != at_one
    page.get_by_text("Export the blend").click()
    page.locator("#blend-btn").click()  # the rank field as a fresh page shows it
    page.locator("#gen-status").get_by_text(re.compile(r"Wrote blend-.*\.safetensors")).wait_for(timeout=60_000)
    assert list((workdir / "adapters").glob("blend-*.safetensors"))
    assert any(o.startswith("blend: ") for o in options(page, "slot-2-adapter")), "the blend is in the lists"


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
        dataset_steps(page, workdir, images)
        run_dir = train_steps(page, workdir)
        generate_steps(page, workdir, run_dir)

        page.get_by_role("tab", name="2. Train").click()  # download the adapter (kohya, fp16) and load it
        pick(page, "run-picker", run_dir.name)
        page.locator("#export-btn").click()
        link = page.locator("#run-download a").first
        link.wait_for()
        with page.expect_download() as info:
            link.click()
        saved = workdir / "downloaded.safetensors"
        info.value.save_as(saved)
        from trainer import checkpoint_dirs
        assert checkpoint_dirs(run_dir), "the run ends with a checkpoint"
        page.locator("#compare-btn").click()  # every checkpoint side by side, rendered in the app
        page.locator("#compare-grid img").wait_for(timeout=120_000)
        page.locator("#compare-status").get_by_text("Compared the checkpoints").wait_for()
        no_errors_shown(page)
        browser.close()

    from trainer import load_adapter
    adapter = load_adapter(saved)
    assert adapter.layers and all(layer.rank == 4 for layer in adapter.layers.values())
    log = (workdir / "server.log").read_text()
    assert "Traceback" not in log, log[-3000:]
    assert "loradesk: junk.safetensors could not be used" in log, "a user error is one line in the terminal"


def test_add_to_queue_start_the_queue_and_see_the_job_done(app_server, image_dir):
    sync_playwright = browser_or_skip()
    url, workdir, _ = app_server
    import shutil
    shutil.copytree(image_dir, workdir / "datasets" / "queued")  # a dataset the Train tab offers
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(30_000)
        page.goto(url)
        page.get_by_role("tab", name="2. Train").click()
        pick(page, "train-dataset", "queued")
        page.wait_for_function("document.querySelector('#field-dataset-path textarea, #field-dataset-path input')"
                               ".value.endsWith('queued')")
        for elem_id, value in [("field-dataset-resolution", 32), ("field-schedule-max_steps", 3),
                               ("field-network-rank", 2), ("field-network-alpha", 2)]:
            set_number(page, elem_id, value)
        page.locator("#field-run-name textarea, #field-run-name input").first.fill("from-the-queue")
        page.locator("#field-run-name textarea, #field-run-name input").first.press("Tab")
        page.get_by_text("Ready to start.").wait_for()
        page.locator("#queue-add-btn").click()
        page.locator("#form-status").get_by_text(re.compile(r"Queued from-the-queue as job \w+")).wait_for()
        no_errors_shown(page)

        page.get_by_role("tab", name="Queue").click()
        cell = "document.querySelector('#queue-table [data-testid=\"cell-0-%d\"]')"  # first row; columns: HEADERS
        page.wait_for_function(f"{cell % 4}?.innerText.trim() === 'from-the-queue'", timeout=10_000)  # its timer
        assert page.evaluate(f"{cell % 2}.innerText.trim()") == "queued"
        page.locator("#queue-start-btn").click()
        page.locator("#queue-reply").get_by_text("Started the queue").wait_for(timeout=60_000)
        page.wait_for_function(f"{cell % 2}?.innerText.trim() === 'done'", timeout=180_000)
        assert page.evaluate(f"{cell % 5}.innerText.trim()") == "3/3"
        page.locator("#queue-status").get_by_text("no job waits").wait_for(timeout=30_000)
        no_errors_shown(page)
        page.get_by_role("tab", name="2. Train").click()  # the live view shows the run the queue trained
        from trainer import list_queue
        run_name = Path(list_queue(workdir / "runs")[0][0].run_dir).name
        page.wait_for_function(f"document.querySelector('#train-status').innerText.includes('{run_name}')",
                               timeout=30_000)
        browser.close()

    jobs, _ = list_queue(workdir / "runs")
    assert [(j.name, j.state) for j in jobs] == [("from-the-queue", "done")]
    assert (Path(jobs[0].run_dir) / "from-the-queue.safetensors").is_file()
    log = (workdir / "server.log").read_text()
    assert "Traceback" not in log, log[-3000:]
