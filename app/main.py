"""The whole app: three tabs and the job queue over trainer's public API. Nothing heavy is imported here (torch
loads on first use)."""
from __future__ import annotations

import os

from .settings import AppSettings

TITLE = "loradesk"
INTRO = ("## loradesk\nTrain a LoRA adapter for Stable Diffusion in three steps: **1. Dataset** (your images and "
         "captions), **2. Train** (watch it learn), **3. Generate** (try it, blend it, export it).")
CSS = """
.ld-progress { position: relative; height: 26px; border-radius: 6px; background: var(--block-background-fill);
               border: 1px solid var(--border-color-primary); overflow: hidden; }
.ld-bar { height: 100%; transition: width .4s ease; }
.ld-label { position: absolute; inset: 0; display: flex; align-items: center; justify-content: center;
            font-weight: 600; font-size: 0.9em; }
.ld-field-error { color: #c0392b; font-size: 0.85em; margin-top: -6px; }
.ld-failure h3 { color: #c0392b; }
.ld-note { font-size: 0.85em; opacity: 0.8; }
footer { display: none !important; }
"""


def build_app(settings: AppSettings | None = None):
    """The Gradio Blocks of the app (not launched)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    from .tabs import dataset, generate, queue, train

    settings = settings or AppSettings.from_env()
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(INTRO)
        with gr.Tabs():
            with gr.Tab("1. Dataset", id="dataset"):
                picker, bucket_resolution = dataset.build(settings, demo)
            with gr.Tab("2. Train", id="train"):
                train.build(settings, demo, picker, bucket_resolution)
            with gr.Tab("3. Generate", id="generate") as generate_tab:
                generate.build(settings, demo, generate_tab)
            with gr.Tab("Queue", id="queue"):  # not a step: trainings (and exports) waiting to run one by one
                queue.build(settings, demo)
    demo.loradesk_settings = settings
    return demo


def launch_options(settings: AppSettings) -> dict:
    """Keyword arguments for Blocks.launch: look, the folders whose files the page may show, the largest file
    Gradio's own upload route stores, and no start-up self-check that a busy machine fails."""
    import gradio as gr

    from .datasets import MAX_UPLOAD_BYTES
    folders = [settings.data_dir, settings.runs_dir, settings.adapters_dir]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    return {"theme": gr.themes.Soft(primary_hue="indigo"), "css": CSS,
            "allowed_paths": [str(f.resolve()) for f in folders], "footer_links": [],
            # Gradio's /upload stores a file before any handler sees it: no file over what one upload may add
            "max_file_size": MAX_UPLOAD_BYTES,
            "show_error": True,  # an unexpected error still shows its message, not just "Error"
            **_no_reachability_check(gr)}


def _no_reachability_check(gr) -> dict:
    """After its server answers Gradio's own start-up request (no timeout), launch() sends one more HEAD to itself
    with a 3 s timeout and, when that times out, dies with "When localhost is not accessible, a shareable link
    must be created": on a machine at load 18, 3 of 3 starts died so (issue 23). That second check is the only
    thing launch's `_frontend` flag controls (gradio 6.31, blocks.py); an older Gradio without it keeps its check."""
    import inspect
    return {"_frontend": False} if "_frontend" in inspect.signature(gr.Blocks.launch).parameters else {}
