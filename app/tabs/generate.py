"""Generate tab: the base model with up to four adapters blended at their weights, comparison grids, blend export."""
from __future__ import annotations

from pathlib import Path

import gradio as gr

from .. import generation as G
from ..files import UploadError
from ..settings import AppSettings
from ..training import AppError, runs_table

HELP = ("Try your adapters on the base model. Each slot adds one adapter at its weight (1 = as trained, 0 = off, "
        "negative = the opposite); the enabled ones are blended exactly into the model weights, so the images are "
        "what A1111 or ComfyUI would draw. Generation waits while a training runs: one device, one job.")


def slots_from(values: list) -> list[G.Slot]:
    """[path, weight, enabled] * NUM_SLOTS from the widgets -> Slots."""
    return [G.Slot(values[i] or "", float(values[i + 1] or 0), bool(values[i + 2])) for i in range(0, len(values), 3)]


def build(settings: AppSettings, demo: gr.Blocks, tab: gr.Tab) -> None:
    s = settings
    choices = G.adapter_choices(s)
    size = 512 if s.base_model else G.TINY_SIZE  # the built-in tiny model draws small pictures
    gr.Markdown(HELP)
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=340):
            model = gr.Textbox(s.base_model, label="Base model", elem_id="gen-model",
                               placeholder="empty = the tiny built-in model",
                               info="A diffusers folder or a .safetensors checkpoint; loaded once and kept.")
            slot_widgets = []
            for i in range(G.NUM_SLOTS):
                with gr.Group():
                    with gr.Row():
                        path = gr.Dropdown(choices, value=None, label=f"Adapter {i + 1}", scale=4,
                                           allow_custom_value=True, elem_id=f"slot-{i}-adapter")
                        on = gr.Checkbox(True, label="On", scale=1, min_width=60, elem_id=f"slot-{i}-on")
                    weight = gr.Slider(-1, 2, value=1.0, step=0.05, label="Weight", elem_id=f"slot-{i}-weight")
                slot_widgets += [path, weight, on]
            gr.Markdown("**Add an adapter file** (`.safetensors`, kohya or diffusers layout):")
            upload = gr.File(label="Add an adapter file", file_types=[".safetensors"], height=110,
                             show_label=False, elem_id="adapter-upload")
            refresh_btn = gr.Button("Refresh adapter list", size="sm")
        with gr.Column(scale=2):
            prompt = gr.Textbox(label="Prompt", lines=2, elem_id="gen-prompt")
            negative = gr.Textbox(label="Negative prompt", elem_id="gen-negative")
            with gr.Row():
                seed = gr.Number(0, label="Seed", precision=0, minimum=0, elem_id="gen-seed")
                steps = gr.Slider(1, 100, value=20, step=1, label="Steps", elem_id="gen-steps")
                guidance = gr.Slider(0, 20, value=7.5, step=0.5, label="Guidance", elem_id="gen-guidance")
            with gr.Row():
                width = gr.Slider(64, 1536, value=size, step=8, label="Width", elem_id="gen-width")
                height = gr.Slider(64, 1536, value=size, step=8, label="Height", elem_id="gen-height")
                count = gr.Slider(1, 8, value=1, step=1, label="Images", elem_id="gen-count")
            gen_btn = gr.Button("Generate", variant="primary", elem_id="gen-btn")
            gallery = gr.Gallery(label="Images", columns=4, height=360, elem_id="gen-gallery", format="png")
            with gr.Accordion("Comparison grid", open=False):
                gr.Markdown("Rows: weights of adapter 1 (for example `0, 0.5, 1`), or every checkpoint of a run. "
                            "Columns: seeds.")
                with gr.Row():
                    rows_kind = gr.Radio(["weights of adapter 1", "checkpoints of a run"],
                                         value="weights of adapter 1", label="Rows")
                    weights = gr.Textbox("0, 0.5, 1", label="Weights")
                    run = gr.Dropdown([r[0] for r in runs_table(s)], label="Run", allow_custom_value=False)
                    seeds = gr.Textbox("1, 2, 3", label="Seeds")
                grid_btn = gr.Button("Draw the grid")
                grid = gr.Image(label="Grid", interactive=False, format="png")
            with gr.Accordion("What did the LoRA learn? (analysis)", open=False):
                gr.Markdown("The singular values of each layer's update (how many directions it really uses) and, "
                            "for the adapters in two slots, how much their top directions overlap: the analysis of "
                            "the LoRA paper, section 7.")
                analyze_btn = gr.Button("Analyse the adapters in the first two filled slots", elem_id="analyze-btn")
                analysis_text = gr.Markdown()
                heatmaps = gr.Gallery(label="Subspace similarity per layer", columns=4, height=320, format="png")
            with gr.Accordion("Export the blend", open=False):
                gr.Markdown("Write the enabled adapters at their weights as one adapter file (exact: the ranks "
                            "add up; give a rank to compress it by SVD).")
                with gr.Row():
                    rank = gr.Number(None, label="Rank (empty = exact)", precision=0, minimum=1)
                    blend_btn = gr.Button("Export blend", elem_id="blend-btn")
                blend_file = gr.File(label="Blend file", interactive=False, visible=False)
    inputs = [model, *slot_widgets]

    def guard(fn):
        def wrapper(*args):
            try:
                return fn(*args)
            except (AppError, UploadError, ValueError, OSError) as e:
                raise gr.Error(str(e)) from None
        return wrapper

    def on_generate(model_path, *rest):
        slot_values, (p, n, sd, st, g, w, h, k) = rest[:-8], rest[-8:]
        return G.generate(s, model_path, slots_from(list(slot_values)), p, n, int(sd or 0), st, g, w, h, k)

    gen_btn.click(guard(on_generate), inputs + [prompt, negative, seed, steps, guidance, width, height, count],
                  [gallery], concurrency_limit=1, concurrency_id="device")

    def on_grid(model_path, *rest):
        slot_values, (p, n, st, g, w, h, kind, wts, run_name, sds) = rest[:-10], rest[-10:]
        slots = slots_from(list(slot_values))
        if kind.startswith("weights"):
            if not slots[0].path:
                raise AppError("Pick an adapter in slot 1: the rows are its weights.")
            rows = G.parse_numbers(wts)
        else:
            if not run_name:
                raise AppError("Pick a run: the rows are its checkpoints.")
            rows = G.checkpoint_rows(Path(s.runs_dir) / run_name)
        return G.comparison_grid(s, model_path, slots, p, rows, G.parse_numbers(sds, int), n, st, g, w, h)

    grid_btn.click(guard(on_grid), inputs + [prompt, negative, steps, guidance, width, height, rows_kind, weights,
                                             run, seeds], [grid], concurrency_limit=1, concurrency_id="device")

    def on_blend(model_path, *rest):
        slot_values, r = rest[:-1], rest[-1]
        path = G.export_blend(s, model_path, slots_from(list(slot_values)), int(r) if r else None)
        return gr.update(value=str(path), visible=True)

    blend_btn.click(guard(on_blend), inputs + [rank], [blend_file], concurrency_limit=1, concurrency_id="device")

    def on_analyze(*slot_values):
        return G.analyze_slots(s, slots_from(list(slot_values)))

    analyze_btn.click(guard(on_analyze), slot_widgets, [heatmaps, analysis_text])

    def refresh():
        new = G.adapter_choices(s)
        return [gr.update(choices=new) for _ in range(G.NUM_SLOTS)] + [
            gr.update(choices=[r[0] for r in runs_table(s)])]

    path_widgets = slot_widgets[0::3]

    def on_upload(file):
        if file is None:
            return [gr.update() for _ in range(G.NUM_SLOTS + 1)] + [None]
        saved = G.add_adapter_upload(s, file)
        gr.Info(f"Added {saved.name}.")
        return refresh() + [None]

    upload.upload(guard(on_upload), [upload], path_widgets + [run, upload])
    refresh_btn.click(refresh, None, path_widgets + [run])
    demo.load(refresh, None, path_widgets + [run])
    tab.select(refresh, None, path_widgets + [run])  # runs finished since the page loaded show up
